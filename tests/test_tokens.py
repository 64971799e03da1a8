"""Token samplers: log q is the filtered, renormalised distribution, and samples follow it.

Frequency tests use a chi-square statistic over bins of expected count >= 5 (so that the
chi-square law applies) against its 1 - 1e-6 quantile: seeded, and a correct sampler fails one
test with probability 1e-6, while a wrong bin by a few standard errors fails it.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from proposals.tokens import (
    NO_TOKEN,
    argmax,
    categorical,
    draw_tokens,
    filtered_logprobs,
    greedy,
    log_softmax,
    sample,
)

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


# --- categorical: exact draws with a few uniforms per row ---------------------------------------


def _chi_square_ok(counts, probs, total):
    """counts [B] of `total` draws vs probabilities [B] (bins of expected count >= 5)."""
    expected = total * probs
    assert np.all(expected >= 5), "bins too small for the chi-square law"
    chi2 = ((counts - expected) ** 2 / expected).sum()
    bound = stats.chi2.isf(1e-6, df=len(probs) - 1)
    assert chi2 < bound, (chi2, bound)


def _draws(logq, num_draws, seed, chunk=50_000):
    """num_draws tokens from one row logq [V]: vmap over keys, the row unbatched (one pass)."""
    draw = jax.jit(jax.vmap(categorical, in_axes=(0, None)))
    keys = jax.random.split(jax.random.key(seed), num_draws)
    return np.concatenate([np.asarray(draw(keys[i:i + chunk], logq))
                           for i in range(0, num_draws, chunk)])


def test_categorical_small_vocabulary_with_a_partial_block():
    # V = 23: blocks of 8 and a last block of 7; a 1e-3 token, masked tokens, one in the tail.
    weights = np.ones(23)
    weights[[0, 5, 17, 22]] = [40.0, 0.0, 12.0, 0.0]
    weights[9] = 1e-3 * (weights.sum() - 1.0) / (1 - 1e-3)  # probability 1e-3
    probs = weights / weights.sum()
    tokens = _draws(jnp.log(jnp.asarray(weights, jnp.float32)), 100_000, seed=0)
    assert tokens.min() >= 0
    counts = np.bincount(tokens, minlength=23)
    assert counts[probs == 0].sum() == 0
    _chi_square_ok(counts[probs > 0], probs[probs > 0], len(tokens))


@pytest.mark.parametrize("vocab_size", [49_152, 49_152 + 77])
def test_categorical_large_vocabulary(vocab_size):
    # Heavy tokens, 150 tokens of probability 1e-4 (some in the heavy tokens' blocks, where one
    # float32 cumulative sum would round them against the heavy mass), masked tokens, and a
    # flat remainder; with V = 49,229 the last block is partial and holds a heavy token.
    rng = np.random.default_rng(1)
    order = rng.permutation(vocab_size)
    heavy, small = order[:3], order[3:153]
    heavy[2] = vocab_size - 5
    small[:3] = heavy[:3] + 1  # next to (so in the block of) each heavy token
    masked = np.setdiff1d(order[153:1153], np.concatenate([heavy, small]))
    probs = np.zeros(vocab_size)
    probs[heavy] = [0.5, 0.2, 0.1]
    probs[small] = 1e-4
    rest = np.setdiff1d(np.arange(vocab_size), np.concatenate([heavy, small, masked]))
    probs[rest] = (1.0 - probs.sum()) / len(rest)
    with np.errstate(divide="ignore"):
        logq = jnp.asarray(np.log(probs) + 3.0, jnp.float32)  # unnormalised, -inf = masked
    num_draws = 200_000
    tokens = _draws(logq, num_draws, seed=2)
    assert tokens.min() >= 0 and not np.isin(tokens, masked).any()
    counts = np.bincount(tokens, minlength=vocab_size)
    # bins: each heavy token, each 1e-4 token (expected 20), the rest in 64 runs of ids
    groups = np.array_split(rest, 64)
    binned = np.concatenate([counts[heavy], counts[small], [counts[g].sum() for g in groups]])
    expected = np.concatenate([probs[heavy], probs[small], [probs[g].sum() for g in groups]])
    _chi_square_ok(binned, expected, num_draws)


def test_categorical_rows_without_a_token_and_edge_cases():
    inf, nan = jnp.inf, jnp.nan
    logq = jnp.asarray([[-inf] * 5, [0.0, nan, 0.0, 0.0, 0.0], [0.0, inf, 0.0, 0.0, 0.0],
                        [-inf, -inf, -inf, 2.0, -inf], [-1e4, -inf, 0.0, -inf, -inf]])
    for seed in range(5):
        tokens = np.asarray(categorical(jax.random.key(seed), logq))
        assert list(tokens) == [NO_TOKEN, NO_TOKEN, NO_TOKEN, 3, 2]
    assert categorical(jax.random.key(0), jnp.asarray([1.5])) == 0  # V = 1, no batch axis
    assert categorical(jax.random.key(0), jnp.zeros((2, 3, 7))).shape == (2, 3)
    with pytest.raises(ValueError, match="logq"):
        categorical(jax.random.key(0), jnp.zeros((4, 0)))
    with pytest.raises(TypeError, match="logq"):
        categorical(jax.random.key(0), jnp.zeros((4, 3), jnp.int32))


def test_categorical_same_key_same_draw_and_jit_vmap_agree():
    logq = jax.random.normal(jax.random.key(0), (8, 1000)) * 2
    keys = jax.random.split(jax.random.key(1), 8)
    batched = np.asarray(jax.jit(jax.vmap(categorical))(keys, logq))
    one_by_one = np.asarray([categorical(keys[i], logq[i]) for i in range(8)])
    np.testing.assert_array_equal(batched, one_by_one)
    first = categorical(jax.random.key(3), logq)
    np.testing.assert_array_equal(first, categorical(jax.random.key(3), logq))
    assert not np.array_equal(first, categorical(jax.random.key(4), logq))


# --- draw_tokens: the same draws from raw logits, with temperature and mask --------------------


def test_draw_tokens_logq_and_normalizer_match_filtered_logprobs():
    logits = jax.random.normal(jax.random.key(5), (4, 300)) * 3
    mask = jax.random.uniform(jax.random.key(6), (4, 300)) < 0.7
    temperature = jnp.asarray([0.5, 1.0, 1.7, 0.9])
    drawn = draw_tokens(jax.random.key(7), logits, temperature, mask)
    logq_all = filtered_logprobs(logits, temperature, mask=mask)
    rows = np.arange(4)
    assert np.all(np.asarray(mask)[rows, np.asarray(drawn.tokens)])
    # float32 rounding of sums of <= 300 terms of size <= 1: a few 1e-6
    np.testing.assert_allclose(drawn.logq, logq_all[rows, drawn.tokens], rtol=0, atol=1e-5)
    expected = jax.nn.logsumexp(jnp.where(mask, logits, -jnp.inf) / temperature[:, None], -1)
    np.testing.assert_allclose(drawn.log_normalizer, expected, rtol=0, atol=1e-5)
    none = draw_tokens(jax.random.key(0), jnp.full((1, 3), -jnp.inf))
    assert none.tokens[0] == NO_TOKEN and np.isnan(none.logq[0])


def test_draw_tokens_frequencies_with_temperature_and_mask():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 0.3, 1.2, -0.4, 0.9, 0.1]])
    mask = np.ones(11, bool)
    mask[[1, 10]] = False
    probs = np.asarray(jnp.exp(filtered_logprobs(logits, 0.6, mask=mask)))[0]
    num_draws = 50_000
    keys = jax.random.split(jax.random.key(8), num_draws)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: draw_tokens(k, logits, 0.6, mask).tokens))(
        keys))[:, 0]
    counts = np.bincount(tokens, minlength=11)
    assert counts[~mask].sum() == 0
    _chi_square_ok(counts[mask], probs[mask], num_draws)


def test_log_softmax_matches_jax():
    x = jax.random.normal(jax.random.key(9), (3, 5000)) * 4
    x = x.at[0, :10].set(-jnp.inf)
    # float32 rounding of a 5000-term sum, relative ~1e-6, on log-probabilities of size ~10
    np.testing.assert_allclose(log_softmax(x), jax.nn.log_softmax(x), rtol=0, atol=2e-5)


@pytest.mark.parametrize("vocab_size", [1, 2, 7, 16, 17, 1000, 49152])
def test_argmax_is_jnp_argmax_ties_infinities_and_nan_included(vocab_size):
    """The first maximum, as jnp.argmax gives it, on rows made to break a blocked search: ties
    (few distinct values), -0.0 against 0.0, a maximum in the partial last block or at its very
    end, rows all -inf, +inf and -inf without NaN (the fast path), and NaN (the fallback)."""
    rng = np.random.default_rng(vocab_size)
    for trial in range(12):
        x = rng.integers(-3, 3, (8, vocab_size)).astype(np.float32)
        x[x == 0] = rng.choice(np.array([0.0, -0.0], np.float32), (x == 0).sum())
        u = rng.random(x.shape)
        x[u < 0.2] = -np.inf
        x[0] = -np.inf
        x[1, -1] = 7.0                                   # the end of a partial last block
        x[2, rng.integers(vocab_size)] = np.inf
        x[3, -(vocab_size // 3 + 1):] = 5.0              # ties inside the last blocks
        if trial % 3 == 1:
            x[4, rng.integers(vocab_size, size=2)] = np.nan
        if trial % 3 == 2:
            x[5] = np.nan
        for values in (x, x[[0, 1, 3, 6, 7]]):           # with and without NaN / +inf rows
            got = np.asarray(argmax(jnp.asarray(values)))
            np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(values), -1)))
    batch = jnp.asarray(rng.standard_normal((2, 3, vocab_size)), jnp.bfloat16)
    np.testing.assert_array_equal(argmax(batch), jnp.argmax(batch, -1))
    assert argmax(batch).dtype == jnp.int32
