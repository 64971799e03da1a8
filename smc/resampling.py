"""Resampling schemes: (key, log_weights [N], num_samples M) -> ancestors int32 [M].

Every scheme is unbiased, E[#offspring of i] = M * W_i with W = softmax(log_weights), works under
`jit` (num_samples static) and `vmap`, and never selects a particle whose weight is zero (-inf).

Any log-weights give int32 ancestors in [0, N):
- +inf entries are the limit of one huge weight each: they share all the mass equally, every other
  particle gets none.
- Any NaN, or every entry -inf, leaves no distribution to draw from: the ancestors are then the
  identity, ancestor_j = j mod N (arange(N) when M = N), so particles stay where they are; the
  engine flags such a cloud separately.

Most schemes are computed through cumulative offspring counts: Nc_i = #{draws landing in particles
0..i}, which for systematic and stratified is an O(N) formula in the scaled cdf M * C_i. Ancestors
then follow from Nc by a bincount and a cumulative sum, which is O(N + M) and faster on CPU than
both `searchsorted` and `jnp.repeat`. Because counts are differences of one monotone sequence whose
last element is forced to M, they are non-negative, sum to exactly M, and are exactly zero for
zero-weight particles, whatever the float32 rounding of the cdf.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from smc.validation import static_int

Array = jax.Array
Resampler = Callable[..., Array]

_static = functools.partial(jax.jit, static_argnames=("num_samples",))


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


def _cumsum(x: Array) -> Array:
    """Inclusive prefix sum of floats x >= 0 [N], non-decreasing and flat exactly where x == 0.

    jnp.cumsum and associative scans sum neighbours along different trees, so in float32 they can
    decrease, and step across a zero weight, which would give negative counts or select a dead
    particle. Here each block of B ~ sqrt(N) entries is summed sequentially (one scan step per row,
    all blocks at once) and the block offsets are chained sequentially, so entry i is always
    fl(entry_{i-1} + x_i) or fl(offset + partial sum) with offset equal to the previous entry.
    It is also 2-3x faster on CPU than jnp.cumsum.
    """
    n = x.shape[0]
    block = math.isqrt(max(n - 1, 0)) + 1
    num_blocks = -(-n // block)
    columns = jnp.pad(x, (0, num_blocks * block - n)).reshape(num_blocks, block).T

    def add(carry: Array, row: Array) -> tuple[Array, Array]:
        carry = carry + row
        return carry, carry

    _, within = jax.lax.scan(add, jnp.zeros(num_blocks, x.dtype), columns)  # [block, num_blocks]
    _, totals_before = jax.lax.scan(
        lambda c, t: (c + t, c), jnp.zeros((), x.dtype), within[-1]
    )  # exclusive offsets, chained so that offset_b == last entry of block b - 1
    return (totals_before[None, :] + within).T.reshape(-1)[:n]


def _int_cumsum(x: Array) -> Array:
    """Inclusive prefix sum of integers [N]: exact in any order, so the faster log-depth scan."""
    return jax.lax.associative_scan(jnp.add, x)


def _num(log_weights: Array, num_samples: int | None) -> tuple[int, int]:
    """(N, M) from log-weights [N] and a static num_samples M >= 1 (default N)."""
    if jnp.ndim(log_weights) != 1 or jnp.shape(log_weights)[0] < 1:
        raise ValueError(f"log_weights must have shape [N], N >= 1, got {jnp.shape(log_weights)}")
    n = log_weights.shape[0]
    m = n if num_samples is None else static_int("num_samples", num_samples, 1)
    return n, m


def _unnormalised(log_weights: Array) -> tuple[Array, Array]:
    """(w [N], degenerate): w = exp(logw - max logw), so max w = 1 and dead particles are exactly 0.

    With +inf entries, w is 1 on them and 0 elsewhere (the module doc's limit). `degenerate` (bool
    scalar) is any NaN or all -inf; w is then uniform, only so that the arithmetic stays finite
    until `_identity_if` discards the draws.
    """
    # Half precision cannot resolve a cdf over many particles.
    log_weights = log_weights.astype(jnp.promote_types(log_weights.dtype, jnp.float32))
    top = jnp.max(log_weights)  # NaN if any entry is: one reduction finds every special case
    # `== top` covers +inf (inf - inf would be NaN) and all -inf; everything else is finite - top.
    shifted = jnp.where((log_weights == top) | jnp.isnan(top), 0.0, log_weights - top)
    return jnp.exp(shifted), jnp.isnan(top) | jnp.isneginf(top)


def _identity_if(degenerate: Array, ancestors: Array, n: int) -> Array:
    """ancestor_j = j mod N [M] where `degenerate`, else `ancestors` [M]."""
    identity = jnp.arange(ancestors.shape[0], dtype=jnp.int32)
    if ancestors.shape[0] > n:
        identity = identity % n
    return jnp.where(degenerate, identity, ancestors)


def _scaled_cdf(w: Array, m: int) -> tuple[Array, Array, Array]:
    """Returns (cs, total, X) with cs = cumsum(w) [N] and X = M * cs / total [N].

    `cs == total` marks the last living particle and the dead tail after it, which is how callers
    pin the final cumulative count to exactly M.
    """
    cs = _cumsum(w)
    total = cs[-1]
    # (cs * m) / total rather than cs * (m / total): exact when the weights are equal and m = N.
    return cs, total, (cs * m) / total


def _ancestors_from_cumulative(cum_counts: Array, m: int) -> Array:
    """Ancestors [M] from cumulative counts Nc [N] (non-decreasing, last = M).

    ancestor_j = #{i : Nc_i <= j}, the unique i with Nc_{i-1} <= j < Nc_i.
    """
    hist = jnp.bincount(cum_counts, length=m + 1)[:m]
    return _int_cumsum(hist).astype(jnp.int32)


def _cumulative_from_counts(counts: Array) -> Array:
    return _int_cumsum(counts).astype(jnp.int32)


def _even(sampler: Callable[..., Array], key: Array, n: int, dtype=jnp.float32) -> Array:
    """sampler(key, (n,)) drawn at an even length: threefry on CPU is much slower on odd ones."""
    return sampler(key, (n + n % 2,), dtype=dtype)[:n]


def _sorted_uniforms(key: Array, m: int, size: Array | int) -> Array:
    """u [M] whose first `size` entries are the sorted uniforms of a sample of that size.

    Exponential spacings: with E_0..E_M i.i.d. Exp(1) and Z = cumsum(E), (Z_0..Z_{k-1}) / Z_k are
    the order statistics of k uniforms; `size` may be traced. Entries from `size` on exceed 1.
    """
    z = _cumsum(_even(jax.random.exponential, key, m + 1))
    return z[:m] / z[size]


def _count_points_le(points: Array, queries: Array, total: Array) -> Array:
    """#{j : points_j <= q} for each q in `queries` [N], all q <= total; points [M] sorted, in
    (0, total] then +inf for unused slots.

    A bucket table over [0, total] narrows each binary search to one bucket; sorted uniforms put
    about one point in each bucket, so a few halvings suffice whatever the weights: O(N + M).
    """
    m = points.shape[0]
    scale = m / total
    bucket = lambda x: jnp.minimum(x * scale, m).astype(jnp.int32)
    # Unused slots get a bucket of their own, past every query's, so they never widen a search.
    point_bucket = jnp.where(points <= total, bucket(jnp.minimum(points, total)), m + 1)
    start = _int_cumsum(jnp.bincount(point_bucket, length=m + 2))  # #{j : bucket_j <= b}
    qb = bucket(queries)
    lo = jnp.where(qb > 0, start[jnp.maximum(qb - 1, 0)], 0)  # monotone buckets: all these <= q
    hi = start[qb]  # and none beyond this is

    # Branchless binary search: try steps 2^(L-1), ..., 1, with 2^L > the widest bucket.
    levels = 32 - jax.lax.clz(jnp.max(hi - lo))

    def step(t: Array, pos: Array) -> Array:
        nxt = pos + jnp.left_shift(1, levels - 1 - t)
        take = (nxt <= hi) & (points[jnp.minimum(nxt - 1, m - 1)] <= queries)
        return jnp.where(take, nxt, pos)

    return jax.lax.fori_loop(0, levels, step, lo).astype(jnp.int32)


def _multinomial_cumulative(
    key: Array, cs: Array, total: Array, m: int, size: Array | int
) -> Array:
    """Cumulative counts [N] of `size` i.i.d. draws from w / total (size <= M may be traced)."""
    u = _sorted_uniforms(key, m, size)
    # Points in (0, total], so a zero-weight particle (cs_i == cs_{i-1}) can never catch one;
    # unused slots go to +inf so they are never counted.
    points = jnp.clip(u * total, jnp.finfo(cs.dtype).tiny, total)
    points = jnp.where(jnp.arange(m) < size, points, jnp.inf)
    return _count_points_le(points, cs, total)


# ---------------------------------------------------------------------------------------------
# Schemes
# ---------------------------------------------------------------------------------------------


@_static
def multinomial(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """M i.i.d. draws from W, returned sorted. log_weights [N] -> ancestors int32 [M]."""
    n, m = _num(log_weights, num_samples)
    w, degenerate = _unnormalised(log_weights)
    cs, total, _ = _scaled_cdf(w, m)
    ancestors = _ancestors_from_cumulative(_multinomial_cumulative(key, cs, total, m, m), m)
    return _identity_if(degenerate, ancestors, n)


@_static
def stratified(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Inverse cdf at u_j = (j + U_j) / M, U_j i.i.d. uniform. [N] -> int32 [M].

    Nc_i = #{j : j + U_j <= M C_i} = k + [U_k <= M C_i - k], k = floor(M C_i): O(N + M).
    """
    n, m = _num(log_weights, num_samples)
    w, degenerate = _unnormalised(log_weights)
    cs, total, x = _scaled_cdf(w, m)
    u = 1.0 - _even(jax.random.uniform, key, m, x.dtype)  # (0, 1]: a point at 0 would hit W_0 = 0
    k = jnp.clip(jnp.floor(x), 0, m - 1)
    # x - k is exact in floating point, so Nc is exactly the count for these points: monotone.
    cum = k.astype(jnp.int32) + (u[k.astype(jnp.int32)] <= x - k).astype(jnp.int32)
    cum = jnp.where(cs == total, m, cum)
    return _identity_if(degenerate, _ancestors_from_cumulative(cum, m), n)


@_static
def systematic(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Inverse cdf at u_j = (j + U) / M, one shared uniform U. [N] -> int32 [M].

    Nc_i = #{j : j + U <= M C_i} = floor(M C_i - U) + 1, clipped to [0, M]: O(N + M).
    """
    n, m = _num(log_weights, num_samples)
    w, degenerate = _unnormalised(log_weights)
    cs, total, x = _scaled_cdf(w, m)
    u = 1.0 - jax.random.uniform(key, (), dtype=x.dtype)  # (0, 1]: floor(0 - U) + 1 = 0 at C = 0
    cum = jnp.clip(jnp.floor(x - u).astype(jnp.int32) + 1, 0, m)
    cum = jnp.where(cs == total, m, cum)
    return _identity_if(degenerate, _ancestors_from_cumulative(cum, m), n)


@_static
def residual(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """floor(M W_i) copies of i, then R = M - sum floor(M W) multinomial draws on M W - floor(M W).

    [N] -> int32 [M], sorted. R is traced; the draws use a fixed M-length construction.
    """
    n, m = _num(log_weights, num_samples)
    w, degenerate = _unnormalised(log_weights)
    total = jnp.sum(w)
    x = (w * m) / total  # exact integers for equal weights when M is a multiple of N
    whole = jnp.floor(x)
    frac = x - whole
    cum_whole = jnp.minimum(_cumulative_from_counts(whole.astype(jnp.int32)), m)
    remaining = m - cum_whole[-1]
    frac_cs = _cumsum(frac)
    frac_total = frac_cs[-1]
    # When every fraction is 0 (R = 0) the draws are unused; keep their cdf finite.
    frac_total = jnp.where(frac_total > 0, frac_total, 1.0)
    cum_frac = _multinomial_cumulative(key, frac_cs, frac_total, m, remaining)
    return _identity_if(degenerate, _ancestors_from_cumulative(cum_whole + cum_frac, m), n)


def _ssp_counts(key: Array, x: Array, w: Array, m: int) -> Array:
    """Offspring counts [N] of the Srinivasan sampling process on expected counts x = M W [N].

    Each particle keeps floor(x_i) copies plus a Bernoulli whose mean is the fraction xi_i. One pass
    over the particles holds one unresolved fraction a (index p) and meets the next fraction b:
    with d_up = min(1 - a, b), d_down = min(a, 1 - b), move mass d_up from b to a with
    probability d_down / (d_up + d_down), else d_down from a to b. Each fraction keeps its mean,
    the sum is conserved, and one of the two always hits 0 or 1 and is resolved. Gerber, Chopin and
    Whiteley (2019), Section 5.
    """
    n = x.shape[0]
    whole = jnp.floor(x)
    frac = x - whole
    u = _even(jax.random.uniform, key, max(n - 1, 0), x.dtype)

    def meet(carry: tuple[Array, Array], inputs: tuple[Array, Array, Array]):
        p, a = carry
        b, uk, k = inputs
        d_up = jnp.minimum(1.0 - a, b)
        d_down = jnp.minimum(a, 1.0 - b)
        raise_a = uk * (d_up + d_down) < d_down  # False when both are already 0 or 1
        a_full = 1.0 - a <= b  # raising a fills it (else b empties)
        a_empty = a <= 1.0 - b  # lowering a empties it (else b fills)
        resolve_p = jnp.where(raise_a, a_full, a_empty)
        bit = jnp.where(raise_a, a_full, ~a_empty)  # value of the resolved fraction
        carried = jnp.where(
            raise_a,
            jnp.where(a_full, b - (1.0 - a), a + b),
            jnp.where(a_empty, a + b, a - (1.0 - b)),
        )
        resolved = jnp.where(resolve_p, p, k)
        return (jnp.where(resolve_p, k, p), carried), (resolved, bit.astype(jnp.int32))

    indices = jnp.arange(1, n, dtype=jnp.int32)
    (last, _), (resolved, bits) = jax.lax.scan(
        meet, (jnp.int32(0), frac[0]), (frac[1:], u, indices)
    )
    counts = whole.astype(jnp.int32).at[resolved].add(bits)
    # The fractions sum to an integer only up to float32 rounding: the last one takes the rest,
    # but only if alive; any leftover goes to the particle with most offspring (so alive).
    rest = jnp.clip(m - jnp.sum(counts), 0, 1) * (w[last] > 0)
    counts = counts.at[last].add(rest.astype(jnp.int32))
    return counts.at[jnp.argmax(counts)].add(m - jnp.sum(counts))


@_static
def ssp(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Srinivasan sampling process: floor(M W_i) or floor(M W_i) + 1 offspring, summing to M.

    [N] -> int32 [M], sorted. Sequential O(N) scan (lax.scan).
    """
    n, m = _num(log_weights, num_samples)
    w, degenerate = _unnormalised(log_weights)
    x = (w * m) / jnp.sum(w)
    counts = _ssp_counts(key, x, w, m)
    ancestors = _ancestors_from_cumulative(_cumulative_from_counts(counts), m)
    return _identity_if(degenerate, ancestors, n)


@_static
def killing(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Particle i survives with probability W_i / max W, else its slot gets a draw from W.

    [N] -> int32 [N]; M must equal N (raises ValueError otherwise).
    """
    n, m = _num(log_weights, num_samples)
    if m != n:
        raise ValueError(f"killing resampling needs num_samples == N ({n}), got {m}")
    key_survive, key_draw = jax.random.split(key)
    w, degenerate = _unnormalised(log_weights)  # max w = 1: w_i is the survival probability
    killed = _even(jax.random.uniform, key_survive, n, w.dtype) >= w
    rank = _int_cumsum(killed.astype(jnp.int32)) - 1
    num_killed = rank[-1] + 1
    cs, total, _ = _scaled_cdf(w, m)
    draws = _ancestors_from_cumulative(
        _multinomial_cumulative(key_draw, cs, total, m, num_killed), m
    )
    # The draws are sorted, but only their multiset matters for the offspring counts.
    survivors = jnp.where(killed, draws[jnp.maximum(rank, 0)], jnp.arange(n, dtype=jnp.int32))
    return _identity_if(degenerate, survivors, n)


def offspring_counts(ancestors: Array, n: int) -> Array:
    """Number of offspring of each particle: bincount(ancestors) int32 [n].

    ancestors: integers [M] in [0, n), checked when concrete; bincount would silently drop (or,
    under jit, clip) ids outside, so a traced `ancestors` is the caller's to keep in range.
    """
    n = static_int("n", n, 1)
    if not isinstance(ancestors, jax.core.Tracer):
        ancestors = jnp.asarray(ancestors)
    if ancestors.ndim != 1:
        raise ValueError(f"ancestors must be 1-D [M], got shape {ancestors.shape}")
    if not jnp.issubdtype(ancestors.dtype, jnp.integer):
        raise TypeError(f"ancestors must be integers, got {ancestors.dtype}")
    if not isinstance(ancestors, jax.core.Tracer) and ancestors.size:
        values = np.asarray(ancestors)
        low, high = values.min(), values.max()
        if low < 0 or high >= n:
            raise ValueError(f"ancestors must lie in [0, {n}), got values in [{low}, {high}]")
    return _bincount(ancestors, n)


@functools.partial(jax.jit, static_argnames=("n",))
def _bincount(ancestors: Array, n: int) -> Array:
    return jnp.bincount(ancestors, length=n).astype(jnp.int32)


SCHEMES: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
    "ssp": ssp,
    "killing": killing,
}


def get(name: str) -> Resampler:
    """The scheme called `name`; ValueError listing the valid names otherwise."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown resampling scheme {name!r}; valid: {sorted(SCHEMES)}") from None


def resolve(resampling: str | Resampler) -> Resampler:
    """A scheme given by its name (`get`) or as a callable (key, log_weights, num_samples) ->
    ancestors; TypeError naming `resampling` for anything else."""
    if isinstance(resampling, str):
        return get(resampling)
    if not callable(resampling):
        raise TypeError(f"resampling must be a scheme's name or a callable (key, log_weights, "
                        f"num_samples) -> ancestors, got {type(resampling).__name__} "
                        f"{resampling!r}")
    return resampling
