"""Exactness tests for the MH kernels in proposals/mcmc.py.

Invariance: particles drawn exactly from a Gaussian target stay i.i.d. from it after any number
of steps of a correct kernel (each particle runs its own chain), so their sample mean and
covariance must match the target within a few Monte Carlo standard errors computed from N alone.
A wrong sign or a missing correction term moves them away within a few steps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proposals import mcmc
from proposals.mcmc import (
    MoveInfo,
    adapt_step_size,
    mala,
    pcn,
    pcnl,
    run_adaptive_chain,
    run_chain,
    rwmh,
)

N = 5000
NUM_STEPS = 20
Z = 4.5  # standard errors allowed per statistic; 5 statistics per check

# rwmh / mala target: correlated, anisotropic, off-centre.
MEAN = jnp.array([1.0, -2.0])
COV = jnp.array([[1.0, 0.6], [0.6, 2.0]])
PREC = jnp.linalg.inv(COV)

# pcn / pcnl target: N(0, I) exp(Phi), Phi(x) = -0.5 (x - M)^T P (x - M); posterior Gaussian with
# precision I + P and mean (I + P)^{-1} P M.
LIK_MEAN = jnp.array([1.5, -1.0])
LIK_PREC = jnp.array([[2.0, 0.5], [0.5, 0.5]])
POST_COV = jnp.linalg.inv(jnp.eye(2) + LIK_PREC)
POST_MEAN = POST_COV @ LIK_PREC @ LIK_MEAN


def log_density(x):
    d = x - MEAN
    return -0.5 * d @ PREC @ d


def log_likelihood(x):
    d = x - LIK_MEAN
    return -0.5 * d @ LIK_PREC @ d


def sample_gaussian(key, mean, cov, n=N):
    return mean + jax.random.normal(key, (n, mean.shape[0])) @ jnp.linalg.cholesky(cov).T


def moment_z_scores(x, mean, cov):
    """|sample - exact| / SE for the mean and the upper triangle of the covariance.

    SE(mean_i) = sqrt(S_ii / n); SE(cov_ij) = sqrt((S_ii S_jj + S_ij^2) / n) for a Gaussian.
    """
    x, mean, cov = np.asarray(x, np.float64), np.asarray(mean), np.asarray(cov)
    n = x.shape[0]
    var = np.diag(cov)
    z_mean = np.abs(x.mean(0) - mean) / np.sqrt(var / n)
    se_cov = np.sqrt((np.outer(var, var) + cov**2) / n)
    z_cov = np.abs(np.cov(x.T) - cov) / se_cov
    return np.concatenate([z_mean, z_cov[np.triu_indices(len(mean))]])


def assert_moments(x, mean, cov, z=Z):
    scores = moment_z_scores(x, mean, cov)
    assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(scores < z), f"z-scores (mean, cov upper triangle): {scores}"


@functools.cache
def _jitted_chain(kernel, log_fn, num_steps):
    # One compilation per (kernel, target, length): the step size is a traced argument.
    def run(key, x, step_size):
        kernel_fn = lambda k, z: kernel(k, z, log_fn, step_size)
        return run_chain(key, kernel_fn, x, num_steps)

    return jax.jit(run)


def chain_output(kernel, log_fn, step_size, x, num_steps, seed=1):
    """Final particles and acceptance per particle after num_steps of kernel."""
    step_size = jnp.asarray(step_size, jnp.float32)  # one dtype, so compilations are shared
    result = _jitted_chain(kernel, log_fn, num_steps)(jax.random.key(seed), x, step_size)
    return result.x, result.acceptance_rate


# (kernel, log_fn, step size, exact mean, exact covariance); step sizes are the ones a user would
# tune to (acceptance 0.4-0.9) and large enough that a missing term shows within NUM_STEPS steps.
CASES = {
    "rwmh": (rwmh, log_density, 1.5, MEAN, COV),
    "mala": (mala, log_density, 1.0, MEAN, COV),
    "pcn": (pcn, log_likelihood, 1.0, POST_MEAN, POST_COV),
    "pcnl": (pcnl, log_likelihood, 1.0, POST_MEAN, POST_COV),
}


def invariance_scores(kernel, log_fn, step_size, mean, cov, seed=0):
    """z-scores of the particles after NUM_STEPS steps started exactly at the target."""
    x0 = sample_gaussian(jax.random.key(seed), mean, cov)
    x, _ = chain_output(kernel, log_fn, step_size, x0, NUM_STEPS, seed=seed + 1)
    return moment_z_scores(x, mean, cov)


@pytest.mark.parametrize("name", list(CASES))
def test_invariance(name):
    kernel, log_fn, step_size, mean, cov = CASES[name]
    scores = invariance_scores(kernel, log_fn, step_size, mean, cov)
    assert np.all(scores < Z), f"{name} z-scores: {scores}"


@pytest.mark.parametrize("name", ["mala", "pcnl"])
def test_invariance_per_particle_step_size(name):
    kernel, log_fn, _, mean, cov = CASES[name]
    steps = jax.random.uniform(jax.random.key(7), (N,), minval=0.1, maxval=4.0)
    scores = invariance_scores(kernel, log_fn, steps, mean, cov)
    assert np.all(scores < Z), f"{name} z-scores: {scores}"


@pytest.mark.parametrize(
    "name, start",
    [("rwmh", (5.0, 5.0)), ("mala", (5.0, 5.0)), ("pcn", (-3.0, 3.0)), ("pcnl", (-3.0, 3.0))],
)
def test_converges_from_wrong_start(name, start):
    kernel, log_fn, step_size, mean, cov = CASES[name]
    x = sample_gaussian(jax.random.key(3), jnp.array(start), 0.01 * jnp.eye(2))
    for seed in range(10):  # 10 x NUM_STEPS = 200 steps, one compilation shared with invariance
        x, _ = chain_output(kernel, log_fn, step_size, x, NUM_STEPS, seed=seed)
    assert_moments(x, mean, cov)


def test_acceptance_extremes():
    x0 = sample_gaussian(jax.random.key(0), MEAN, COV)
    _, tiny = chain_output(rwmh, log_density, 1e-3, x0, NUM_STEPS)
    _, huge = chain_output(rwmh, log_density, 1e3, x0, NUM_STEPS)
    assert tiny.mean() > 0.99
    assert huge.mean() < 0.01
    x0 = sample_gaussian(jax.random.key(0), POST_MEAN, POST_COV)
    _, acc = chain_output(pcnl, log_likelihood, 0.5, x0, NUM_STEPS)
    assert acc.mean() > 0.85


# ------------------------------------------------------------------------------------ non-finite


def half_space_log_density(x):
    """Gaussian restricted to x0 > 0 through log(x0): NaN for x0 < 0, -inf at 0."""
    return jnp.log(x[0]) + log_density(x)


def half_space_log_likelihood(x):
    return jnp.where(x[0] > 0.0, log_likelihood(x), -jnp.inf)


@pytest.mark.parametrize(
    "kernel, log_fn",
    [
        (rwmh, half_space_log_density),
        (mala, half_space_log_density),
        (pcn, half_space_log_likelihood),
        (pcnl, half_space_log_likelihood),
    ],
)
def test_non_finite_proposals_are_rejected(kernel, log_fn):
    inside = jnp.abs(sample_gaussian(jax.random.key(0), MEAN, COV, n=500))
    # One particle starts outside the support: it must stay exactly where it is.
    x0 = inside.at[0].set(jnp.array([-1.0, 0.5]))
    x, acc = chain_output(kernel, log_fn, 2.0, x0, 30)
    x = np.asarray(x)
    assert np.all(np.isfinite(x))
    assert np.all(x[1:, 0] > 0.0)
    np.testing.assert_array_equal(x[0], np.asarray(x0[0]))
    assert acc[0] == 0.0 and np.mean(np.asarray(acc[1:])) > 0.05


# ------------------------------------------------------------------------------------ adaptation


def test_adapt_step_size_rule():
    h = adapt_step_size(1.0, 0.5, target=0.234, rate=0.5)
    np.testing.assert_allclose(h, np.exp(0.5 * (0.5 - 0.234)), rtol=1e-6)
    assert adapt_step_size(1.0, 0.1, target=0.234) < 1.0
    per_particle = adapt_step_size(jnp.ones(3), jnp.array([0.0, 0.234, 1.0]), target=0.234)
    assert per_particle[0] < 1.0 and per_particle[1] == 1.0 and per_particle[2] > 1.0


@pytest.mark.parametrize(
    "name, initial_step",
    [("rwmh", 50.0), ("mala", 1e-4), ("pcnl", 1e-3)],
)
def test_adaptation_reaches_target_acceptance(name, initial_step):
    kernel, log_fn, _, mean, cov = CASES[name]
    target = mcmc.TARGET_ACCEPTANCE[kernel]
    x0 = sample_gaussian(jax.random.key(0), mean, cov)
    adapted = jax.jit(lambda key, x: run_adaptive_chain(key, kernel, x, log_fn, initial_step, 40))(
        jax.random.key(1), x0
    )
    assert adapted.step_size.shape == ()
    _, acc = chain_output(kernel, log_fn, adapted.step_size, adapted.x, NUM_STEPS, seed=2)
    assert abs(float(acc.mean()) - target) < 0.1, (float(adapted.step_size), float(acc.mean()))


def test_adaptation_per_particle_keeps_shape():
    x0 = sample_gaussian(jax.random.key(0), MEAN, COV, n=200)
    result = run_adaptive_chain(jax.random.key(1), rwmh, x0, log_density, jnp.full((200,), 50.0), 5)
    assert result.step_size.shape == (200,)
    assert np.all(np.asarray(result.step_size) < 50.0)


# ------------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize("name", list(CASES))
def test_jit_vmap_and_determinism(name):
    kernel, log_fn, step_size, mean, cov = CASES[name]
    x0 = sample_gaussian(jax.random.key(0), mean, cov, n=64)
    step = lambda key: kernel(key, x0, log_fn, step_size)
    keys = jax.random.split(jax.random.key(1), 2)
    eager = [step(k) for k in keys]
    jitted = jax.jit(step)(keys[0])
    batched = jax.vmap(step)(keys)
    np.testing.assert_allclose(jitted[0], eager[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(jitted[1].accepted, eager[0][1].accepted)
    for i, (x, info) in enumerate(eager):
        np.testing.assert_allclose(batched[0][i], x, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(batched[1].accepted[i], info.accepted)
    x, info = eager[0]
    assert isinstance(info, MoveInfo)
    assert info.accepted.shape == (64,) and info.accepted.dtype == jnp.bool_
    assert info.log_accept_ratio.shape == (64,) and np.all(info.log_accept_ratio <= 0.0)
    np.testing.assert_array_equal(np.any(x != x0, axis=1), info.accepted)
    again = step(keys[0])
    np.testing.assert_array_equal(again[0], eager[0][0])
    assert not np.array_equal(eager[1][0], eager[0][0])


def test_run_chain_return_all_matches_manual_loop():
    x0 = sample_gaussian(jax.random.key(0), MEAN, COV, n=50)
    kernel_fn = functools.partial(rwmh, log_density=log_density, step_size=1.0)
    result = run_chain(jax.random.key(1), kernel_fn, x0, 4, return_all=True)
    assert result.states.shape == (4, 50, 2)
    x, probs = x0, []
    for i, key in enumerate(jax.random.split(jax.random.key(1), 4)):
        x, info = jax.jit(kernel_fn)(key, x)
        probs.append(jnp.exp(info.log_accept_ratio))
        np.testing.assert_allclose(result.states[i], x, rtol=1e-6)
    np.testing.assert_allclose(result.x, x, rtol=1e-6)
    np.testing.assert_allclose(result.acceptance_rate, jnp.mean(jnp.stack(probs), 0), rtol=1e-5)
    assert run_chain(jax.random.key(1), kernel_fn, x0, 4).states is None


@pytest.mark.parametrize("kernel", [rwmh, pcnl])
def test_pytree_particles_match_flat_array(kernel):
    flat = sample_gaussian(jax.random.key(0), jnp.zeros(3), jnp.eye(3), n=100)
    tree = {"a": flat[:, :2], "b": flat[:, 2]}  # ravel order: a then b

    def log_flat(z):
        return -0.5 * jnp.sum((z - 1.0) ** 2) + z[0] * z[2]

    def log_tree(p):
        return log_flat(jnp.concatenate([p["a"], p["b"][None]]))

    x_flat, info_flat = jax.jit(lambda x: kernel(jax.random.key(1), x, log_flat, 0.7))(flat)
    x_tree, info_tree = jax.jit(lambda x: kernel(jax.random.key(1), x, log_tree, 0.7))(tree)
    assert x_tree["a"].shape == (100, 2) and x_tree["b"].shape == (100,)
    np.testing.assert_allclose(x_tree["a"], x_flat[:, :2], rtol=1e-6)
    np.testing.assert_allclose(x_tree["b"], x_flat[:, 2], rtol=1e-6)
    np.testing.assert_array_equal(info_tree.accepted, info_flat.accepted)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kernel", [rwmh, mala, pcn, pcnl])
@pytest.mark.parametrize("bad", [-0.1, 0.0, float("nan"), np.array([0.5, -0.5, 0.5])])
def test_bad_step_size_raises(kernel, bad):
    with pytest.raises(ValueError, match="step_size"):
        kernel(jax.random.key(0), jnp.ones((3, 2)), log_density, bad)


def test_bad_shapes_raise():
    key, x = jax.random.key(0), jnp.ones((3, 2))
    with pytest.raises(ValueError, match="2-D"):
        rwmh(key, jnp.ones(3), log_density, 0.1)
    with pytest.raises(ValueError, match="2-D"):
        rwmh(key, jnp.ones((3, 2, 2)), log_density, 0.1)
    with pytest.raises(ValueError, match="step_size"):
        rwmh(key, x, log_density, jnp.ones(4))
    with pytest.raises(ValueError, match="particles"):
        rwmh(key, {"a": jnp.ones((3, 2)), "b": jnp.ones(4)}, lambda p: 0.0, 0.1)
    with pytest.raises(ValueError, match="scalar"):
        rwmh(key, x, lambda z: z, 0.1)
    with pytest.raises(ValueError, match="num_steps"):
        run_chain(key, functools.partial(rwmh, log_density=log_density, step_size=0.1), x, 0)
    with pytest.raises(ValueError, match="target"):
        adapt_step_size(1.0, 0.5, target=1.5)
    with pytest.raises(ValueError, match="target"):
        run_adaptive_chain(key, functools.partial(rwmh), x, log_density, 0.1, 2)


def test_traced_step_size_is_not_checked():
    # Under jit the value is unknown; the kernel must trace, not raise.
    x = jnp.ones((3, 2))
    out, _ = jax.jit(lambda h: rwmh(jax.random.key(0), x, log_density, h))(0.5)
    assert out.shape == (3, 2)


@pytest.mark.parametrize("kernel", [rwmh, mala, pcn, pcnl])
def test_cached_chain_equals_recomputing_chain(kernel):
    # run_chain passes each step's log-density (and gradient) to the next through `cache=`; a
    # wrapper without that argument recomputes them. Same draws, so the same chain.
    def log_fn(z):
        return -0.5 * jnp.sum((z - 1.0) ** 2 / jnp.array([1.0, 2.0]))

    x = jax.random.normal(jax.random.PRNGKey(0), (300, 2))
    key = jax.random.PRNGKey(1)
    cached = run_chain(key, lambda k, z, cache=None: kernel(k, z, log_fn, 0.3, cache=cache), x, 10,
                       return_all=True)
    recomputed = run_chain(key, lambda k, z: kernel(k, z, log_fn, 0.3), x, 10, return_all=True)
    np.testing.assert_allclose(cached.states, recomputed.states, atol=1e-5)
    np.testing.assert_allclose(cached.acceptance_rate, recomputed.acceptance_rate, atol=1e-5)
