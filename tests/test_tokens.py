"""Token samplers: log q is the filtered, renormalised distribution, and samples follow it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proposals.tokens import filtered_logprobs, greedy, sample

LOGITS = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0],
                      [0.0, 0.1, 0.2, 3.0, 0.3, 0.4]])


def _expected(logits, temperature, top_k, top_p, mask):
    """Straightforward numpy filter, row by row."""
    out = []
    for b, row in enumerate(np.asarray(logits, np.float64)):
        row = np.where(mask[b], row, -np.inf) if mask is not None else row.copy()
        row = row / temperature
        order = sorted(range(len(row)), key=lambda i: (-row[i], i))
        keep = set(order[:top_k]) if top_k else set(range(len(row)))
        row = np.array([row[i] if i in keep else -np.inf for i in range(len(row))])
        p = np.exp(row - np.logaddexp.reduce(row))
        if top_p is not None:
            order = sorted(range(len(p)), key=lambda i: (-p[i], i))
            mass, kept = 0.0, []
            for i in order:
                if mass >= top_p:
                    break
                kept.append(i)
                mass += p[i]
            p = np.array([p[i] if i in kept else 0.0 for i in range(len(p))])
            p = p / p.sum()
        out.append(p)
    return np.array(out)


CASES = [(1.0, None, None, None), (0.7, None, None, None), (1.0, 3, None, None),
         (1.0, None, 0.8, None), (1.3, 4, 0.9, None),
         (1.0, None, None, np.array([[1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 1, 1]], bool)),
         (0.5, 2, 0.95, np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool))]


@pytest.mark.parametrize("temperature,top_k,top_p,mask", CASES)
def test_logq_matches_filtered_distribution(temperature, top_k, top_p, mask):
    expected = _expected(LOGITS, temperature, top_k, top_p, mask)
    got = np.exp(np.asarray(filtered_logprobs(LOGITS, temperature, top_k, top_p, mask),
                            np.float64))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    toks, logq = sample(jax.random.PRNGKey(0), LOGITS, temperature, top_k, top_p, mask)
    np.testing.assert_allclose(np.exp(np.asarray(logq)),
                               expected[np.arange(2), np.asarray(toks)], rtol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p,mask", CASES[2:5] + CASES[6:])
def test_sample_frequencies_match(temperature, top_k, top_p, mask):
    expected = _expected(LOGITS, temperature, top_k, top_p, mask)
    N = 20000
    keys = jax.random.split(jax.random.PRNGKey(1), N)
    toks, _ = jax.jit(jax.vmap(lambda k: sample(k, LOGITS, temperature, top_k, top_p, mask)))(keys)
    toks = np.asarray(toks)
    for b in range(2):
        counts = np.bincount(toks[:, b], minlength=LOGITS.shape[1])
        assert np.all(counts[expected[b] == 0] == 0)  # never outside the filtered support
        sup = expected[b] > 0
        e = N * expected[b][sup]
        chi2 = ((counts[sup] - e) ** 2 / e).sum()
        dof = max(sup.sum() - 1, 1)
        assert chi2 < dof + 5 * np.sqrt(2 * dof), (b, chi2)


def test_per_row_temperature_and_greedy():
    lp = filtered_logprobs(LOGITS, jnp.asarray([1.0, 0.5]))
    np.testing.assert_allclose(lp[1], jax.nn.log_softmax(LOGITS[1] / 0.5), atol=1e-6)
    toks, logq = greedy(LOGITS)
    assert list(np.asarray(toks)) == [0, 3] and np.all(np.asarray(logq) == 0)
