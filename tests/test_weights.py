"""Weight utilities against direct formulas."""
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from smc import weights

log_weight_vectors = st.lists(st.floats(-30.0, 30.0), min_size=1, max_size=40).map(
    lambda v: np.asarray(v, np.float32))


@settings(max_examples=40, deadline=None)
@given(log_weight_vectors)
def test_against_direct_formulas(log_w):
    w = np.exp(log_w.astype(np.float64) - log_w.max())
    w /= w.sum()
    np.testing.assert_allclose(weights.normalize(jnp.asarray(log_w)), w, rtol=1e-4, atol=1e-7)
    ess = float(weights.ess(jnp.asarray(log_w)))
    np.testing.assert_allclose(ess, 1.0 / np.sum(w ** 2), rtol=1e-4)
    assert 1.0 - 1e-4 <= ess <= log_w.size * (1 + 1e-4)
    np.testing.assert_allclose(weights.log_mean_exp(jnp.asarray(log_w)),
                               np.log(np.mean(np.exp(log_w.astype(np.float64)))), rtol=1e-5,
                               atol=1e-5)


def test_conditional_ess():
    rng = np.random.default_rng(0)
    log_w, g = rng.normal(size=50).astype(np.float32), rng.normal(size=50).astype(np.float32)
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    expected = 50 * np.sum(w * np.exp(g)) ** 2 / np.sum(w * np.exp(2 * g))
    np.testing.assert_allclose(weights.conditional_ess(jnp.asarray(log_w), jnp.asarray(g)),
                               expected, rtol=1e-5)
    # With uniform current weights it is the ESS of the increments.
    np.testing.assert_allclose(weights.conditional_ess(jnp.zeros(50), jnp.asarray(g)),
                               weights.ess(jnp.asarray(g)), rtol=1e-5)


def test_dead_and_single_particles():
    dead = jnp.full(4, -jnp.inf)
    np.testing.assert_array_equal(weights.normalize(dead), 0.0)
    assert float(weights.ess(dead)) == 0.0
    one = jnp.array([-jnp.inf, 2.0, -jnp.inf])
    np.testing.assert_array_equal(weights.normalize(one), [0.0, 1.0, 0.0])
    assert float(weights.ess(one)) == 1.0


def test_batched_weights_normalise_each_row_on_its_own():
    log_w = jnp.array([[0.0, jnp.log(3.0)], [-jnp.inf, -jnp.inf], [1.0, 1.0]])
    w = weights.normalize(log_w)
    np.testing.assert_allclose(w, [[0.25, 0.75], [0.0, 0.0], [0.5, 0.5]], rtol=1e-6)
    np.testing.assert_allclose(weights.ess(log_w), [1.0 / (0.25**2 + 0.75**2), 0.0, 2.0],
                               rtol=1e-6)
    np.testing.assert_allclose(jnp.exp(weights.log_normalize(log_w[::2])).sum(-1), 1.0, rtol=1e-6)
