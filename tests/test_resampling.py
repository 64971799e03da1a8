"""Resampling schemes: unbiased offspring counts, variance ordering, bounds, shapes, degenerate weights.

Tolerances come from Monte Carlo error: over K seeded replicates the mean offspring count of each
particle must be within Z_MAX standard errors (empirical SE) of M * W_i. The weights are chosen so
that every fraction M * W_i - floor(M * W_i) lies in [0.05, 0.95]: a count that is floor or ceil
then varies visibly over K runs, so a zero sample variance can only come from an exact expectation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from smc import resampling

SCHEMES = sorted(resampling.SCHEMES)
FLEXIBLE = [s for s in SCHEMES if s != "killing"]  # those that take num_samples != N
K = 2000
Z_MAX = 5.0
WEIGHTS = np.array(
    [3.86, 1.41, 0.31, 0.83, 0.0, 0.8, 1.82, 0.28, 2.63, 0.32, 0.83, 2.43, 1.94, 0.5, 5.86, 1.44]
)
N = WEIGHTS.size
M_OTHER = 37  # a num_samples != N
LOG_WEIGHTS = jnp.log(jnp.asarray(WEIGHTS, dtype=jnp.float32))  # one -inf
W = WEIGHTS / WEIGHTS.sum()


def _fractions_are_away_from_integers(m: int) -> bool:
    frac = (m * W)[W > 0] % 1.0
    return bool(np.all((frac > 0.05) & (frac < 0.95)))


assert _fractions_are_away_from_integers(N) and _fractions_are_away_from_integers(M_OTHER)


KEYS = jax.random.split(jax.random.key(2024), K)


@functools.cache
def replicate_ancestors(scheme: str, m: int) -> np.ndarray:
    """Ancestors [K, m] of K seeded runs, in one jit of a vmap over keys and log-weights."""
    fn = resampling.get(scheme)
    batched_log_weights = jnp.tile(LOG_WEIGHTS, (K, 1))
    return np.asarray(jax.jit(jax.vmap(lambda key, lw: fn(key, lw, m)))(KEYS, batched_log_weights))


def replicate_counts(scheme: str, m: int) -> np.ndarray:
    """Offspring counts [K, N] of the runs above."""
    ancestors = replicate_ancestors(scheme, m)
    return (ancestors[:, :, None] == np.arange(N)).sum(axis=1)


def assert_unbiased(counts: np.ndarray, expected: np.ndarray) -> None:
    """|mean - expected| <= Z_MAX * SE per particle; exact where the counts never vary."""
    mean = counts.mean(axis=0)
    se = counts.std(axis=0, ddof=1) / np.sqrt(counts.shape[0])
    constant = se == 0
    np.testing.assert_allclose(mean[constant], expected[constant], rtol=0, atol=1e-6)
    z = (mean[~constant] - expected[~constant]) / se[~constant]
    assert np.all(np.abs(z) < Z_MAX), f"z-scores {np.round(z, 2)}"


# --- unbiasedness and bounds -----------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unbiased(scheme: str) -> None:
    counts = replicate_counts(scheme, N)
    assert np.all(counts.sum(axis=1) == N)
    assert_unbiased(counts, N * W)


@pytest.mark.parametrize("scheme", FLEXIBLE)
def test_unbiased_other_num_samples(scheme: str) -> None:
    counts = replicate_counts(scheme, M_OTHER)
    assert np.all(counts.sum(axis=1) == M_OTHER)
    assert_unbiased(counts, M_OTHER * W)


def test_unbiasedness_check_catches_a_shifted_weight() -> None:
    # The check must be strong enough: raising the largest weight by 5% has to fail it.
    shifted = LOG_WEIGHTS.at[14].add(jnp.log(1.05))
    ancestors = np.asarray(jax.vmap(lambda key: resampling.systematic(key, shifted))(KEYS))
    counts = (ancestors[:, :, None] == np.arange(N)).sum(axis=1)
    with pytest.raises(AssertionError):
        assert_unbiased(counts, N * W)


@pytest.mark.parametrize("m", [N, M_OTHER])
@pytest.mark.parametrize("scheme", ["systematic", "ssp"])
def test_counts_are_floor_or_ceil(scheme: str, m: int) -> None:
    counts = replicate_counts(scheme, m)
    expected = m * W
    assert np.all((counts == np.floor(expected)) | (counts == np.ceil(expected)))


@pytest.mark.parametrize("m", [N, M_OTHER])
def test_stratified_counts_within_one_of_floor_ceil(m: int) -> None:
    counts = replicate_counts("stratified", m)
    expected = m * W
    assert np.all(counts >= np.floor(expected) - 1) and np.all(counts <= np.ceil(expected) + 1)
    assert np.all(counts[:, W == 0] == 0)


@pytest.mark.parametrize("m", [N, M_OTHER])
def test_residual_keeps_the_integer_part(m: int) -> None:
    counts = replicate_counts("residual", m)
    assert np.all(counts >= np.floor(m * W))


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "residual", "ssp"])
def test_variance_below_multinomial(scheme: str) -> None:
    multinomial = replicate_counts("multinomial", N).var(axis=0, ddof=1).sum()
    assert replicate_counts(scheme, N).var(axis=0, ddof=1).sum() < multinomial


# --- degenerate weights ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_single_dominant_weight(scheme: str) -> None:
    log_weights = jnp.full(N, -jnp.inf).at[5].set(-3.0)
    sizes = [N] if scheme == "killing" else [N, M_OTHER]
    for m in sizes:
        ancestors = resampling.get(scheme)(jax.random.key(1), log_weights, m)
        np.testing.assert_array_equal(ancestors, np.full(m, 5))


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "residual", "ssp"])
def test_equal_weights_keep_every_particle_once(scheme: str) -> None:
    for seed in range(3):
        ancestors = resampling.get(scheme)(jax.random.key(seed), jnp.full(N, 0.7))
        np.testing.assert_array_equal(resampling.offspring_counts(ancestors, N), np.ones(N))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_all_dead_does_not_crash(scheme: str) -> None:
    ancestors = resampling.get(scheme)(jax.random.key(0), jnp.full(N, -jnp.inf))
    assert ancestors.shape == (N,) and np.all((ancestors >= 0) & (ancestors < N))


# --- shapes, dtypes, transformations --------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_shape_dtype_and_determinism(scheme: str) -> None:
    fn = resampling.get(scheme)
    sizes = [N] if scheme == "killing" else [N, M_OTHER]
    for m in sizes:
        first = fn(jax.random.key(3), LOG_WEIGHTS, m)
        assert first.shape == (m,) and first.dtype == jnp.int32
        np.testing.assert_array_equal(first, fn(jax.random.key(3), LOG_WEIGHTS, m))
    assert fn(jax.random.key(3), LOG_WEIGHTS).shape == (N,)  # default num_samples = N


def test_raw_uint32_keys() -> None:
    ancestors = resampling.systematic(jax.random.PRNGKey(3), LOG_WEIGHTS)
    assert ancestors.shape == (N,) and ancestors.dtype == jnp.int32


@pytest.mark.parametrize("scheme", SCHEMES)
def test_jit_vmap_and_eager_agree(scheme: str) -> None:
    fn = resampling.get(scheme)
    sizes = [N] if scheme == "killing" else [N, M_OTHER]
    for m in sizes:
        batched = replicate_ancestors(scheme, m)  # jit(vmap(...))
        for i in range(3):
            np.testing.assert_array_equal(batched[i], fn(KEYS[i], LOG_WEIGHTS, m))
    np.testing.assert_array_equal(
        resampling.offspring_counts(batched[0], N), np.bincount(batched[0], minlength=N)
    )


def test_killing_needs_num_samples_equal_to_n() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        resampling.killing(jax.random.key(0), LOG_WEIGHTS, N + 1)


def test_get_lists_valid_names() -> None:
    assert resampling.get("ssp") is resampling.ssp
    with pytest.raises(ValueError, match="systematic"):
        resampling.get("sytematic")


def test_systematic_at_a_million_particles() -> None:
    # float32 cdf at N = 1e6: counts must still be non-negative, sum to N and skip dead particles.
    n = 1_000_000
    log_weights = 3.0 * jax.random.normal(jax.random.key(0), (n,))
    dead = jax.random.uniform(jax.random.key(1), (n,)) < 0.2
    log_weights = jnp.where(dead, -jnp.inf, log_weights).at[-1].set(-jnp.inf)
    counts = np.asarray(
        resampling.offspring_counts(resampling.systematic(jax.random.key(2), log_weights), n)
    )
    assert counts.sum() == n and counts.min() >= 0
    assert counts[np.asarray(dead)].sum() == 0 and counts[-1] == 0


# --- property test ---------------------------------------------------------------------------

_log_weight = st.one_of(st.just(-np.inf), st.floats(-30.0, 5.0, width=32))


@settings(max_examples=12, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    n=st.sampled_from([1, N]),
    m_choice=st.sampled_from(["n", "other"]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_indices_valid_for_random_weights(scheme, n, m_choice, seed, data) -> None:
    log_weights = np.array(data.draw(st.lists(_log_weight, min_size=n, max_size=n)), np.float32)
    if np.all(np.isneginf(log_weights)):
        log_weights[data.draw(st.integers(0, n - 1))] = 0.0
    m = n if (m_choice == "n" or scheme == "killing") else M_OTHER
    ancestors = np.asarray(
        resampling.get(scheme)(jax.random.key(seed), jnp.asarray(log_weights), m)
    )
    assert ancestors.shape == (m,)
    assert np.all((ancestors >= 0) & (ancestors < n))
    assert np.all(np.isfinite(log_weights[ancestors]))
    assert resampling.offspring_counts(jnp.asarray(ancestors), n).sum() == m


@pytest.mark.parametrize("scheme", SCHEMES)
def test_infinite_log_weights_share_every_draw_unbiasedly(scheme: str) -> None:
    # +inf is the limit of a huge weight: the infinite ones split the mass equally, others get 0.
    infinite = [2, 9, 14]
    log_weights = LOG_WEIGHTS.at[jnp.asarray(infinite)].set(jnp.inf)
    share = np.isin(np.arange(N), infinite) / len(infinite)
    fn = resampling.get(scheme)
    for m in [N] if scheme == "killing" else [N, M_OTHER]:
        draw = functools.partial(fn, log_weights=log_weights, num_samples=m)
        ancestors = np.asarray(jax.jit(jax.vmap(draw))(KEYS))
        counts = (ancestors[:, :, None] == np.arange(N)).sum(axis=1)
        assert np.all(counts.sum(axis=1) == m)
        assert_unbiased(counts, m * share)


# --- grids with a short last row, SSP against its sequential definition, large N -------------
# The schemes walk the particles in `traversal_order(N)`, a grid of R columns plus a short last
# row; N = 16 fills the grid exactly, so these cover the short row (N = 37: a 4 x 9 grid + 1).

WEIGHTS_37 = np.random.default_rng(37).uniform(0.2, 3.0, 37)
WEIGHTS_37[[3, 36]] = 0.0  # dead particles, one in the short last row
LOG_WEIGHTS_37 = jnp.log(jnp.asarray(WEIGHTS_37, dtype=jnp.float32))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unbiased_with_a_short_last_row(scheme: str) -> None:
    fn = resampling.get(scheme)
    w = WEIGHTS_37 / WEIGHTS_37.sum()
    ancestors = np.asarray(jax.jit(jax.vmap(lambda k: fn(k, LOG_WEIGHTS_37)))(KEYS))
    counts = (ancestors[:, :, None] == np.arange(37)).sum(axis=1)
    assert np.all(counts.sum(axis=1) == 37) and np.all(counts[:, WEIGHTS_37 == 0] == 0)
    assert_unbiased(counts, 37 * w)
    if scheme in ("systematic", "ssp"):
        assert np.all((counts == np.floor(37 * w)) | (counts == np.ceil(37 * w)))


def _sequential_ssp_law(x: np.ndarray, order: np.ndarray) -> dict[tuple, float]:
    """Exact law of the offspring counts of the sequential SSP (Gerber, Chopin and Whiteley 2019,
    Section 5) on expected counts x, walking the particles in `order`: every branch enumerated."""
    whole, frac = np.floor(x), x - np.floor(x)
    laws = {(order[0], frac[order[0]], ()): 1.0}  # (carrier, carried fraction, resolved bits)
    for k in order[1:]:
        nxt = {}
        for (p, a, bits), prob in laws.items():
            b = frac[k]
            up, down = min(1 - a, b), min(a, 1 - b)  # raise a by up (w.p. down / (up + down))
            branches = ([(down / (up + down), a + up, b - up), (up / (up + down), a - down,
                                                                  b + down)]
                        if up + down > 0 else [(1.0, a, b)])
            for q, a_new, b_new in branches:
                if q == 0:
                    continue
                if np.isclose(a_new, 0) or np.isclose(a_new, 1):  # p resolved, k carries
                    state = (k, b_new, bits + ((p, round(a_new)),))
                else:  # k resolved, p carries
                    state = (p, a_new, bits + ((k, round(b_new)),))
                nxt[state] = nxt.get(state, 0.0) + prob * q
        laws = nxt
    out = {}
    for (p, a, bits), prob in laws.items():
        counts = whole.copy()
        for i, bit in bits + ((p, round(a)),):
            counts[i] += bit
        key = tuple(counts.astype(int))
        out[key] = out.get(key, 0.0) + prob
    return out


def test_ssp_matches_the_sequential_process_exactly() -> None:
    # The vectorised SSP (carrier moves drawn independently) must have the sequential process's
    # joint law, not only its marginals. 6 particles: 2^5 branches, 20000 draws, chi-square over
    # the outcomes against the 1 - 1e-6 quantile.
    weights = np.array([0.7, 1.3, 0.45, 2.1, 0.9, 0.55])
    x = 6 * weights / weights.sum()
    law = _sequential_ssp_law(x, resampling.traversal_order(6))
    keys = jax.random.split(jax.random.key(6), 20_000)
    log_weights = jnp.log(jnp.asarray(weights, jnp.float32))
    ancestors = np.asarray(jax.jit(jax.vmap(lambda k: resampling.ssp(k, log_weights)))(keys))
    counts = (ancestors[:, :, None] == np.arange(6)).sum(axis=1)
    seen = {}
    for row in map(tuple, counts):
        seen[row] = seen.get(row, 0) + 1
    assert set(seen) <= set(law), set(seen) - set(law)
    outcomes = sorted(law)
    expected = np.array([law[o] for o in outcomes]) * len(keys)
    observed = np.array([seen.get(o, 0) for o in outcomes])
    big = expected >= 5
    observed = np.append(observed[big], observed[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    chi2 = ((observed - expected) ** 2 / np.maximum(expected, 1e-12)).sum()
    assert chi2 < stats.chi2.isf(1e-6, df=len(expected) - 1), (chi2, len(expected))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_large_n_counts_are_valid(scheme: str) -> None:
    # N = 100003 (prime: a short last row), a fifth of the particles dead, weights over 12 orders
    # of magnitude: counts sum to M, dead particles get none, indices stay in range.
    n = 100_003
    log_weights = 4.0 * jax.random.normal(jax.random.key(0), (n,))
    dead = jax.random.uniform(jax.random.key(1), (n,)) < 0.2
    log_weights = jnp.where(dead, -jnp.inf, log_weights)
    ancestors = np.asarray(resampling.get(scheme)(jax.random.key(2), log_weights))
    assert ancestors.shape == (n,) and ancestors.min() >= 0 and ancestors.max() < n
    counts = np.bincount(ancestors, minlength=n)
    assert counts.sum() == n and counts[np.asarray(dead)].sum() == 0
    if scheme in ("systematic", "ssp"):
        expected = n * np.asarray(jax.nn.softmax(log_weights), np.float64)
        # float32 cumulative weights: within one of floor/ceil (the README states the precision)
        assert np.all(np.abs(counts - expected) < 1.0 + 1e-3 * np.maximum(expected, 1))


def test_traversal_order_is_a_permutation_and_even_weights_keep_every_slot() -> None:
    for n in [1, 2, 6, 37, 1000]:
        order = resampling.traversal_order(n)
        np.testing.assert_array_equal(np.sort(order), np.arange(n))
        ancestors = resampling.systematic(jax.random.key(0), jnp.zeros(n))
        np.testing.assert_array_equal(ancestors, np.arange(n))


def test_last_living_particle_takes_every_draw_at_large_m() -> None:
    # M = 2^22 multinomial draws on three particles, the last one dead, where float32 resolves
    # neither the draws near the top of the cdf (2^20 buckets, 8-bit places) nor a count near
    # 2^22 finely: the last living particle (cdf = total) must still take every remaining draw,
    # so the counts sum to M and the dead one gets none (deterministic: no tolerance). (Written
    # for the former sorted-uniforms construction, where the last spacing was lost to rounding.)
    m = 1 << 22
    log_weights = jnp.log(jnp.asarray([1.0, 2.0, 0.0]))
    draw = jax.jit(lambda key: resampling.offspring_counts(
        resampling.multinomial(key, log_weights, m), 3))
    keys = jax.random.split(jax.random.key(5), 24)[9:13]
    counts = np.stack([np.asarray(draw(key)) for key in keys])
    assert np.all(counts.sum(axis=1) == m) and np.all(counts[:, 2] == 0), counts


@pytest.mark.parametrize("places", [resampling._PLACES, 4])
def test_multinomial_joint_law_where_draws_and_particles_share_buckets(
        places: int, monkeypatch) -> None:
    # M = 2^13 draws in K = 2^12 buckets (about 2 points a bucket) on particles of which three
    # consecutive ones (in traversal order) are so light that their cdf steps fall inside one
    # bucket: their counts then come from the places drawn inside a bucket. The joint law of
    # (n_1, n_2, n_3) is multinomial; chi-square over the outcomes of 4000 runs against the
    # 1 - 1e-6 quantile. With places for 4 points instead of 24, every call has a fuller bucket,
    # so the loop that draws the rest is what is tested.
    monkeypatch.setattr(resampling, "_PLACES", places)
    jax.clear_caches()
    m, n = 1 << 13, 6
    tiny = np.array([6e-5, 1e-4, 8e-5])
    weights = np.empty(n)
    order = resampling.traversal_order(n)
    weights[order] = [0.3, 0.2, *tiny, 0.5 - tiny.sum()]
    probs = weights / weights.sum()
    log_weights = jnp.log(jnp.asarray(weights, jnp.float32))
    draw = lambda key: resampling.offspring_counts(resampling.multinomial(key, log_weights, m), n)
    keys = jax.random.split(jax.random.key(14), 4000)
    counts = np.asarray(jax.jit(lambda ks: jax.lax.map(draw, ks, batch_size=250))(keys))
    jax.clear_caches()
    assert np.all(counts.sum(axis=1) == m)
    sub = counts[:, order[2:5]]
    p = probs[order[2:5]]
    cap = 6  # outcomes with every count <= cap, the rest pooled
    observed, expected = {}, {}
    for row in map(tuple, np.minimum(sub, cap + 1)):
        observed[row] = observed.get(row, 0) + 1
    grid = np.stack(np.meshgrid(*[np.arange(cap + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for row in grid:
        rest = m - row.sum()
        expected[tuple(row)] = len(keys) * stats.multinomial.pmf(
            [*row, rest], m, [*p, 1.0 - p.sum()])
    pooled_expected = len(keys) - sum(expected.values())
    pooled_observed = sum(v for k, v in observed.items() if max(k) > cap)
    obs = np.array([observed.get(k, 0) for k in expected] + [pooled_observed])
    exp = np.array(list(expected.values()) + [pooled_expected])
    big = exp >= 5
    obs, exp = np.append(obs[big], obs[~big].sum()), np.append(exp[big], exp[~big].sum())
    chi2 = ((obs - exp) ** 2 / exp).sum()
    assert chi2 < stats.chi2.isf(1e-6, df=len(exp) - 1), (chi2, len(exp))


@pytest.mark.parametrize("m, places", [(1 << 14, resampling._PLACES), (1 << 14, 4),
                                       (1 << 18, resampling._PLACES), (1 << 18, 8)])
def test_points_below_a_query_match_a_count_of_the_same_points(
        m: int, places: int, monkeypatch) -> None:
    # Deterministic: the bucket-table count of the uniform points below each query equals a plain
    # count over every point, its bucket from the table and its place from the same Threefry
    # fields (16-bit at M = 2^14, 8-bit at 2^18). Queries sit in every bucket, the fullest one
    # included; with places for one Threefry call only, the loop that draws the places of fuller
    # buckets is what is checked.
    monkeypatch.setattr(resampling, "_PLACES", places)
    size = m - m // 10
    points = resampling._uniform_points(jax.random.key(3), m, size)
    k = 1 << points.bits
    width = resampling._place_bits(points.bits)
    per_call = 64 // width
    cells = np.asarray(resampling._cell_of_position(resampling._grid(k), jnp.arange(k)))
    below = np.asarray(points.below)[cells]  # #{points in buckets 0..b}, in bucket order
    counts = np.diff(below, prepend=0)
    assert below[-1] == size and counts.max() == int(points.fullest)
    assert places > per_call or points.fullest > per_call  # some buckets need the loop
    k0, k1 = (np.uint32(w) for w in points.words)
    calls = (counts + per_call - 1) // per_call  # Threefry calls of places per bucket
    first_call = np.cumsum(calls) - calls
    bucket_of_call = np.repeat(np.arange(k), calls)
    call = np.arange(bucket_of_call.size) - np.repeat(first_call, calls) + 1
    words = [np.asarray(w, np.int64) for w in resampling._threefry2x32(
        k0, k1, jnp.asarray(bucket_of_call, jnp.uint32), jnp.asarray(call, jnp.uint32))]
    fields = np.stack([(w >> shift) & ((1 << width) - 1) for w in words
                       for shift in range(0, 32, width)], axis=1) / (1 << width)
    places_of = {b: fields[first_call[b]:first_call[b] + calls[b]].reshape(-1)[:counts[b]]
                 for b in np.flatnonzero(counts)}
    rng = np.random.default_rng(0)
    queries = np.concatenate([(np.arange(k) + rng.uniform(size=k)) / k,
                              (np.argmax(counts) + np.linspace(0, 1, 64, endpoint=False)) / k])
    queries = np.float32(queries)
    got = np.asarray(jax.jit(lambda q: resampling._count_below(points, q, jnp.float32(1.0)))(
        jnp.asarray(queries)))
    f = queries.astype(np.float64) * k
    b = np.minimum(np.floor(f), k - 1).astype(int)
    want = [below[q - 1] * (q > 0) + int(np.sum(places_of.get(q, np.zeros(0)) < f_q - q))
            for q, f_q in zip(b, f)]
    np.testing.assert_array_equal(got, want)
