"""The LM decoding layer's token sampler (`decoding.categorical`): the distribution softmax(log q),
never a masked token, and a valid token id in a row with nothing to draw.

Frequency checks compare a chi-square statistic over the allowed tokens (every expected count is
>= 50 here, so the chi-square law applies) with its 1 - 1e-6 quantile: seeded, a correct sampler
fails with probability 1e-6, and the wrong samplers below (temperature 2, an index shifted by one)
give statistics hundreds of times the threshold, which the last test checks.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from targets.lm import decoding

VOCAB = 37                  # not a power of two: the sampler's last block is partial
MASKED = (0, 5, 36)         # -inf entries: the first, one inside, the last
DRAWS = 100_000


def _log_q():
    """A normalised log q [V] with the MASKED tokens at -inf; smallest allowed p ~ 1e-3."""
    logits = np.linspace(-2.0, 2.0, VOCAB) * np.cos(np.arange(VOCAB))
    logits[list(MASKED)] = -np.inf
    return logits - np.logaddexp.reduce(logits)


def _chi_square(tokens, log_q):
    """(statistic over the allowed tokens, its 1 - 1e-6 quantile, draws of masked tokens)."""
    counts = np.bincount(np.asarray(tokens), minlength=VOCAB)
    allowed = np.isfinite(log_q)
    expected = len(tokens) * np.exp(log_q[allowed])
    assert expected.min() >= 50
    statistic = np.sum((counts[allowed] - expected) ** 2 / expected)
    return statistic, stats.chi2.ppf(1 - 1e-6, allowed.sum() - 1), counts[~allowed].sum()


def _draws(sampler, seed=0):
    log_q = _log_q()
    rows = jnp.broadcast_to(jnp.asarray(log_q, jnp.float32), (DRAWS, VOCAB))
    return jax.jit(sampler)(jax.random.key(seed), rows), log_q


def test_draws_follow_softmax_and_never_a_masked_token():
    tokens, log_q = _draws(decoding.categorical)
    assert tokens.shape == (DRAWS,) and tokens.dtype == jnp.int32
    statistic, threshold, masked = _chi_square(tokens, log_q)
    assert masked == 0
    assert statistic < threshold, (statistic, threshold)


def test_draws_under_vmap_follow_softmax():
    # `draw_token` with groups draws each group with its own key under vmap
    groups = 4

    def by_group(key, rows):
        keys = jax.random.split(key, groups)
        return jax.vmap(decoding.categorical)(keys, rows.reshape(groups, -1, VOCAB)).reshape(-1)

    tokens, log_q = _draws(by_group, seed=1)
    statistic, threshold, masked = _chi_square(tokens, log_q)
    assert masked == 0
    assert statistic < threshold, (statistic, threshold)


def test_a_tiny_token_next_to_masked_ones_is_drawn_and_masked_ones_never():
    # one allowed token of p = 4e-6 among -inf neighbours, the rest on one token: over 5e5 draws
    # it comes up Poisson(2) times (P(0) = 0.14, so only "never masked" is asserted exactly)
    log_q = np.full(VOCAB, -np.inf)
    log_q[[3, 20]] = np.log([4e-6, 1.0 - 4e-6])
    rows = jnp.broadcast_to(jnp.asarray(log_q, jnp.float32), (500_000, VOCAB))
    counts = np.bincount(np.asarray(jax.jit(decoding.categorical)(jax.random.key(2), rows)),
                         minlength=VOCAB)
    assert counts[3] + counts[20] == 500_000
    assert counts[3] <= 12     # P(Poisson(2) > 12) ~ 4e-7


def test_rows_with_nothing_to_draw_get_the_id_jax_random_categorical_gave():
    # every entry -inf: id 0 (log q -inf); a NaN: the first NaN; a +inf: the first +inf; both:
    # the NaN. The id is valid and its log q keeps the row's weight -inf or NaN, as before.
    finite = np.linspace(-3.0, 0.0, VOCAB)
    rows = np.stack([np.full(VOCAB, -np.inf), finite, finite, finite, finite, np.full(VOCAB, np.nan)])
    rows[1, [7, 9]] = np.nan
    rows[2, [4, 30]] = np.inf
    rows[3, 30], rows[3, 4] = np.nan, np.inf
    rows[4, [1, 2]] = -np.inf                       # an ordinary row, for contrast
    rows = jnp.asarray(rows, jnp.float32)
    key = jax.random.key(3)
    tokens = np.asarray(jax.jit(decoding.categorical)(key, rows))
    expected = np.asarray(jax.random.categorical(key, rows[jnp.array([0, 1, 2, 3, 5])], axis=-1))
    np.testing.assert_array_equal(tokens[[0, 1, 2, 3, 5]], expected)
    np.testing.assert_array_equal(tokens[[0, 1, 2, 3, 5]], [0, 7, 4, 30, 0])
    assert 0 <= tokens[4] < VOCAB and tokens[4] not in (1, 2)
    logq = np.asarray(rows)[np.arange(len(tokens)), tokens]
    assert np.isneginf(logq[0]) and np.isnan(logq[[1, 3, 5]]).all() and np.isposinf(logq[2])
    # the same under vmap (the groups path of `draw_token`)
    grouped = jax.vmap(decoding.categorical)(jax.random.split(key, 2),
                                             jnp.stack([rows[:3], rows[3:]]))
    np.testing.assert_array_equal(np.asarray(grouped).reshape(-1)[[0, 1, 2, 3, 5]],
                                  [0, 7, 4, 30, 0])


@pytest.mark.parametrize("wrong", ["temperature 2", "index shifted by one"])
def test_the_frequency_check_catches_a_wrong_sampler(wrong):
    def temperature_2(key, rows):
        return decoding.categorical(key, rows / 2.0)

    def shifted(key, rows):
        return (decoding.categorical(key, rows) + 1) % VOCAB

    sampler = temperature_2 if wrong == "temperature 2" else shifted
    tokens, log_q = _draws(sampler)
    statistic, threshold, masked = _chi_square(tokens, log_q)
    assert statistic > 100 * threshold, (statistic, threshold, masked)
