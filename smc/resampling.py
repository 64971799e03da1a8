"""Resampling schemes: (key, log_weights [N], num_samples M) -> ancestors int32 [M].

Every scheme is unbiased, E[#offspring of i] = M * W_i with W = softmax(log_weights), works under
`jit` (num_samples static) and `vmap`, and never selects a particle whose weight is zero (-inf).

Any log-weights give int32 ancestors in [0, N):
- +inf entries are the limit of one huge weight each: they share all the mass equally, every other
  particle gets none.
- Any NaN, or every entry -inf, leaves no distribution to draw from: the ancestors are then the
  identity, ancestor_j = j mod N (arange(N) when M = N), so particles stay where they are; the
  engine flags such a cloud separately.

Order. The schemes traverse the particles in a fixed order, `traversal_order(N)`, not in array
order: the particles are viewed as a row-major grid of R rows (a power of two near sqrt(N)) and
C columns plus a short last row, and the cumulative weights run down the columns, then along the
last row. Every prefix sum is then a `lax.scan` over the R rows, each step adding a whole
contiguous row at once, plus a chain over the C column totals, about 5x faster on CPU than a
prefix sum in array order (which needs a transpose, or a log-depth scan). The order decides which
particles systematic, stratified and SSP resampling couple (each particle's offspring law is the
same in any order); for multinomial, residual and killing it does not matter at all. The M
offspring slots use the same kind of grid, so with M = N and even weights ancestor_j = j.

Cumulative offspring counts Nc_p = #{draws landing in positions 0..p} are computed per particle
(an O(1) formula for systematic and stratified), and ancestors follow from them by a histogram
and a prefix sum, O(N + M). Because the cumulative weights are a sequential sum per column and the
column offsets a sequential chain, they never decrease and stay flat exactly across zero weights
whatever the float32 rounding, so counts are non-negative, sum to exactly M, and are exactly zero
for zero-weight particles.

Random numbers come from Threefry-2x32 (JAX's own PRNG function) evaluated here as one fused
expression on a pair of words drawn from the caller's key: XLA:CPU runs `jax.random`'s Threefry as
a loop over its rounds, 3x slower, and it dominated the stratified, multinomial and killing
schemes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smc.validation import static_int

Array = jax.Array
Resampler = Callable[..., Array]

_static = functools.partial(jax.jit, static_argnames=("num_samples",))


# ---------------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------------

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k0: Array, k1: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), the hash behind `jax.random`, unrolled
    so that XLA fuses it into one elementwise pass; uint32 key words k0, k1 and counters x0, x1."""
    keys = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for i in range(5):
        for rotation in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << np.uint32(rotation)) | (x1 >> np.uint32(32 - rotation))
            x1 = x0 ^ x1
        x0 = x0 + keys[(i + 1) % 3]
        x1 = x1 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def _key_words(key: Array) -> tuple[Array, Array]:
    """Two uint32 words drawn from `key` (any key type), the key of this module's Threefry calls."""
    words = jax.random.bits(key, (2,), jnp.uint32)
    return words[0], words[1]


def _random_words(key: Array, shape: tuple[int, ...]) -> Array:
    """uint32 random words of the given shape: word 0 of Threefry at counters (i, 0), i the flat
    index (both words of a counter would need a concatenation, which costs more than the hash)."""
    k0, k1 = _key_words(key)
    counters = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
    return _threefry2x32(k0, k1, counters, jnp.zeros((), jnp.uint32))[0]


def _unit_interval(words: Array) -> Array:
    """float32 in [0, 1) from uint32 words, on the 2^-23 grid (as `jax.random.uniform`)."""
    mantissa = (words >> np.uint32(9)) | np.uint32(0x3F800000)
    return jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0


def _exponentials(key: Array, shape: tuple[int, ...]) -> Array:
    """Exp(1) variates -log(1 - U), U uniform on [0, 1)."""
    return -jnp.log1p(-_unit_interval(_random_words(key, shape)))


# ---------------------------------------------------------------------------------------------
# Grids: prefix sums down the columns of a [rows, cols] view
# ---------------------------------------------------------------------------------------------


class _Grid(NamedTuple):
    """`size` cells: a main block of rows x cols in row-major memory, rows a power of two, then
    a tail of size - rows * cols < cols cells in one more memory row (zero-padded).

    Cells are ordered ("positions") down the columns of the main block, column after column,
    then along the tail: main cell (r, c) is at position c * rows + r, tail cell t at
    rows * cols + t, which is also its memory index. So the real cells fill memory [0, size).
    """
    rows: int
    cols: int
    size: int

    @property
    def main(self) -> int:
        return self.rows * self.cols

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows + (self.size > self.main), self.cols)


def _grid(size: int) -> _Grid:
    rows = 1 << (math.isqrt(size).bit_length() - 1)  # the largest power of two <= sqrt(size)
    return _Grid(rows, size // rows, size)  # tail = size mod rows < rows <= cols


def _as_grid(grid: _Grid, x: Array, fill=0) -> Array:
    """x [size] -> memory grid [rows (+ 1), cols], padded with `fill`."""
    rows, cols = grid.shape
    return jnp.pad(x, (0, rows * cols - grid.size), constant_values=fill).reshape(rows, cols)


def _cell_of_position(grid: _Grid, position: Array) -> Array:
    """Memory index of the cell at `position` (any position < rows (+ 1) x cols)."""
    shift = grid.rows.bit_length() - 1
    main = (position & (grid.rows - 1)) * grid.cols + jnp.right_shift(position, shift)
    return jnp.where(position < grid.main, main, position)


def _positions(grid: _Grid, r: Array) -> Array:
    """[cols] int32: the positions of memory row r's cells."""
    cols = jnp.arange(grid.cols, dtype=jnp.int32)
    return jnp.where(r < grid.rows, cols * grid.rows + r, grid.main + cols)


# Per-cell work runs inside `lax.scan`s over the memory rows, one contiguous row at a time, so
# that every grid that is later flattened (for a histogram or a gather) is a loop's output:
# XLA:CPU would otherwise fuse the flattening into the elementwise work, which then indexes its
# per-column operands by divisions of a flat index, 3-4x slower than the work itself.


def _map_rows(fn: Callable[..., Any], *grids: Array) -> Any:
    """fn(r, *rows r of grids) for each memory row r, stacked: [rows (+ 1), ...] leaves."""
    _, out = jax.lax.scan(lambda _, xs: (None, fn(*xs)), None,
                          (jnp.arange(grids[0].shape[0], dtype=jnp.int32), *grids))
    return out


def _column_prefix(grid: _Grid, x: Array, finish: Callable[..., Any],
                   *grids: Array) -> tuple[Any, Array]:
    """(finish(cs_r, r, total, *rows r of grids) stacked over memory rows r, total) for the
    inclusive prefix sum cs of x (a memory grid) in position order.

    cs at main cell (r, c) is fl(offset_c + s_rc), with s_rc the sequential sum down column c and
    offset_c chained sequentially, offset_{c+1} = fl(offset_c + s_{rows-1,c}) = the last entry of
    column c; the tail continues the chain cell by cell. So for floats x >= 0 cs never decreases
    along the positions and stays flat exactly where x == 0; integer sums are exact. total = the
    last entry, the sum of x.
    """
    main = x[:grid.rows]
    zeros = jnp.zeros(grid.cols, x.dtype)
    sums, _ = jax.lax.scan(lambda carry, row: (carry + row, None), zeros, main)
    chain = lambda carry, t: (carry + t, carry + t)
    _, ends = jax.lax.scan(chain, jnp.zeros((), x.dtype), sums)  # the last entry of each column
    offsets = jnp.concatenate([jnp.zeros((1,), x.dtype), ends[:-1]])
    total = ends[-1]
    tail = zeros
    if x.shape[0] > grid.rows:
        total, tail = jax.lax.scan(chain, total, x[grid.rows])

    def row_step(within: Array, xs: tuple[Array, ...]) -> tuple[Array, Any]:
        r, row, *others = xs
        within = within + row  # the same sums as above: the last main entry is ends[-1]
        cs = jnp.where(r < grid.rows, offsets + within, tail)
        return within, finish(cs, r, total, *others)

    _, out = jax.lax.scan(row_step, zeros, (jnp.arange(x.shape[0], dtype=jnp.int32), x, *grids))
    return out, total


def _prefix(grid: _Grid, x: Array) -> tuple[Array, Array]:
    """(inclusive prefix sum of x in position order, total), see `_column_prefix`."""
    return _column_prefix(grid, x, lambda cs, r, total: cs)


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------


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
    until the draws are discarded for the identity.
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


def _weights_grid(grid: _Grid, log_weights: Array) -> tuple[Array, Array]:
    """(w as in `_unnormalised` on the particle grid, 0 on padding; degenerate)."""
    w, degenerate = _unnormalised(log_weights)
    return _as_grid(grid, w), degenerate


def _expected_counts_grid(grid: _Grid, log_weights: Array, m: int) -> tuple[Array, Array, Array]:
    """(x = M W, w, degenerate) on the particle grid, 0 on padding."""
    w, degenerate = _unnormalised(log_weights)
    # The sum of the [N] vector, not of the grid: the same rounding under vmap as without.
    x = (w * m) / jnp.sum(w)  # exact integers for equal weights when M is a multiple of N
    return _as_grid(grid, x), _as_grid(grid, w), degenerate


def _slot_bins(cum_counts: Array, m: int) -> Array:
    """The slot-grid cell of each cumulative count Nc < M, or one past the last slot (Nc = M)."""
    slots = _grid(m)
    rows, cols = slots.shape
    return jnp.where(cum_counts < m, _cell_of_position(slots, cum_counts), rows * cols)


def _histogram(bins: Array, length: int) -> Array:
    """#{i : bins_i = b} for b < length; bins (any shape) must lie in [0, length)."""
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,),
                                           scatter_dims_to_operand_dims=(0,))
    flat = bins.reshape(-1)
    return jax.lax.scatter_add(jnp.zeros(length, jnp.int32), flat[:, None],
                               jnp.ones(flat.shape, jnp.int32), dims, mode="promise_in_bounds")


def _ancestors(bins: Array, particles: _Grid, m: int, degenerate: Array) -> Array:
    """Ancestors [M] from the slot bins (`_slot_bins`, a loop's output) of the cumulative counts
    Nc (non-decreasing along the particle positions, last = M); ancestor_j = j mod N instead
    where `degenerate` (see the module doc).

    Slot j's ancestor is the particle at the first position p with Nc_p > j, and that position is
    #{p : Nc_p <= j}: a histogram of Nc over the slots and a prefix sum. Slot j is the slot grid's
    position j, so the prefix sum is a `_column_prefix`, and the result holds slot j at memory
    index `_cell_of_position(_grid(M), j)` (slots are exchangeable: any fixed order will do).
    """
    slots = _grid(m)
    rows, cols = slots.shape
    hist = _histogram(bins, rows * cols + 1)[:-1].reshape(rows, cols)

    def finish(position: Array, r: Array, total: Array) -> Array:
        memory = r * cols + jnp.arange(cols, dtype=jnp.int32)
        identity = memory % particles.size if m > particles.size else memory
        return jnp.where(degenerate, identity, _cell_of_position(particles, position))

    ancestors, _ = _column_prefix(slots, hist, finish)
    return ancestors.reshape(-1)[:m].astype(jnp.int32)


def _multinomial_cumulative(key: Array, cs: Array, total: Array, m: int,
                            size: Array | int) -> Array:
    """Cumulative counts of `size` i.i.d. draws from the increments of the cdf cs (a loop's
    output, last entry total): #{j < size : point_j < cs} (all `size` where cs = total), cs's
    shape; size <= M may be traced.

    The points are sorted uniforms by exponential spacings: with E_0..E_M i.i.d. Exp(1) and
    Z = cumsum(E), (Z_0..Z_{k-1}) / Z_k are the order statistics of k uniforms, here compared
    with cs scaled to [0, Z_size] rather than scaled themselves. A bucket table over
    [0, Z_size] (K = ceil(M / 2) buckets) narrows each query's binary search to one bucket;
    sorted uniforms put about two points in each bucket, so a few halvings suffice whatever the
    weights: O(N + M). (With two points a bucket the widest bucket of a million is about as wide
    as with one: the same number of halvings for half the table.)
    """
    points = _grid(m + 1)  # Z_0..Z_M at positions 0..M
    rows, cols = points.shape
    cells = jnp.arange(rows * cols, dtype=jnp.int32).reshape(rows, cols)
    # 0 on padding (after the last position), so Z at position j sums exactly j + 1 spacings
    spacings = jnp.where(cells < points.size, _exponentials(key, (rows, cols)), 0.0)
    z, z_total = _prefix(points, spacings)
    flat_z = z.reshape(-1)
    static_size = isinstance(size, int)
    z_size = z_total if static_size and size == m else flat_z[
        _cell_of_position(points, jnp.asarray(size))]
    # Compared on Z's scale: query q = cs / total * Z_size <= Z_size, equal for equal cs.
    q = cs / total * z_size
    k = (m + 1) // 2
    scale = k / jnp.maximum(z_size, jnp.finfo(z.dtype).tiny)  # Z_size = 0 when size = 0, E_0 = 0
    bucket = lambda x: jnp.minimum(x * scale, k).astype(jnp.int32)
    buckets = _grid(k + 2)
    # Unused positions (>= size) go to bucket K + 1, past every query's.
    point_bins = _map_rows(lambda r, z_row: _cell_of_position(buckets, jnp.where(
        _positions(points, r) < size, bucket(z_row), k + 1)), z)
    hist = _histogram(point_bins, math.prod(buckets.shape))
    start, _ = _prefix(buckets, hist.reshape(buckets.shape))  # #{j : bucket_j <= b} at b
    start = start.reshape(-1)
    at_bucket = lambda b: start[_cell_of_position(buckets, b)]
    qb = bucket(q)
    # Monotone buckets: every point in a bucket below q's is < q, and every point in a bucket
    # above q's is > q, so the count lies in [lo, lo + widest bucket]; the sorted points bound
    # the search on their own (Z_j >= Z_size >= q for the unused ones).
    lo = jnp.where(qb > 0, at_bucket(jnp.maximum(qb - 1, 0)), 0)

    # Branchless binary search: try steps 2^(L-1), ..., 1, with 2^L > the widest bucket.
    unused = _cell_of_position(buckets, jnp.int32(k + 1))  # the bucket of the unused points
    levels = 32 - jax.lax.clz(jnp.max(hist.at[unused].set(0)))

    def step(t: Array, pos: Array) -> Array:
        nxt = pos + jnp.left_shift(1, levels - 1 - t)
        last = jnp.minimum(nxt - 1, m)
        # strict: a dead first particle (q = 0) catches no Z_j = 0
        return jnp.where(flat_z[_cell_of_position(points, last)] < q, nxt, pos)

    found = jax.lax.fori_loop(0, levels, step, lo)
    # cs == total: the last living particle and the dead tail after it take every draw, whatever
    # the rounding of q.
    return jnp.where(cs == total, size, found).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Schemes
# ---------------------------------------------------------------------------------------------


@_static
def multinomial(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """M i.i.d. draws from W. log_weights [N] -> ancestors int32 [M]."""
    n, m = _num(log_weights, num_samples)
    grid = _grid(n)
    w, degenerate = _weights_grid(grid, log_weights)
    cs, total = _prefix(grid, w)
    cum = _multinomial_cumulative(key, cs, total, m, m)
    bins = _map_rows(lambda r, cum_row: _slot_bins(cum_row, m), cum)
    return _ancestors(bins, grid, m, degenerate)


@_static
def stratified(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Inverse cdf at u_j = (j + U_j) / M, U_j i.i.d. uniform. [N] -> int32 [M].

    Nc_i = #{j : j + U_j <= M C_i} = k + [U_k <= M C_i - k], k = floor(M C_i): O(N + M). U_k is
    Threefry of the counter k, evaluated where it is needed, so no [M] array of uniforms is made.
    """
    n, m = _num(log_weights, num_samples)
    grid = _grid(n)
    w, degenerate = _weights_grid(grid, log_weights)
    k0, k1 = _key_words(key)

    def bins(cs: Array, r: Array, total: Array) -> Array:
        x = (cs * m) / total  # rather than cs * (m / total): exact for equal weights and m = N
        k = jnp.clip(jnp.floor(x), 0, m - 1).astype(jnp.int32)
        # (0, 1]: a point at 0 would hit W_0 = 0
        u = 1.0 - _unit_interval(_threefry2x32(k0, k1, k.astype(jnp.uint32), jnp.uint32(0))[0])
        # x - k is exact in floating point, so Nc is exactly the count for these points.
        cum = k + (u <= x - k).astype(jnp.int32)
        # cs == total: the last living particle and the dead tail after it take the rest.
        return _slot_bins(jnp.where(cs == total, m, cum), m)

    return _ancestors(_column_prefix(grid, w, bins)[0], grid, m, degenerate)


@_static
def systematic(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Inverse cdf at u_j = (j + U) / M, one shared uniform U. [N] -> int32 [M].

    Nc_i = #{j : j + U <= M C_i} = floor(M C_i - U) + 1, clipped to [0, M]: O(N + M).
    """
    n, m = _num(log_weights, num_samples)
    grid = _grid(n)
    w, degenerate = _weights_grid(grid, log_weights)
    u = 1.0 - jax.random.uniform(key, (), dtype=w.dtype)  # (0, 1]: floor(0 - U) + 1 = 0 at C = 0

    def bins(cs: Array, r: Array, total: Array) -> Array:
        x = (cs * m) / total  # exact for equal weights and m = N
        cum = jnp.clip(jnp.floor(x - u).astype(jnp.int32) + 1, 0, m)
        return _slot_bins(jnp.where(cs == total, m, cum), m)

    return _ancestors(_column_prefix(grid, w, bins)[0], grid, m, degenerate)


@_static
def residual(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """floor(M W_i) copies of i, then R = M - sum floor(M W) multinomial draws on M W - floor(M W).

    [N] -> int32 [M]. R is traced; the draws use a fixed M-length construction.
    """
    n, m = _num(log_weights, num_samples)
    grid = _grid(n)
    x, _, degenerate = _expected_counts_grid(grid, log_weights, m)
    whole = jnp.floor(x)
    cum_whole, whole_total = _prefix(grid, whole.astype(jnp.int32))
    remaining = m - jnp.minimum(whole_total, m)
    frac_cs, frac_total = _prefix(grid, x - whole)
    # When every fraction is 0 (R = 0) the draws are unused; keep their cdf finite.
    frac_total = jnp.where(frac_total > 0, frac_total, 1.0)
    cum_frac = _multinomial_cumulative(key, frac_cs, frac_total, m, remaining)
    bins = _map_rows(lambda r, whole_row, frac_row: _slot_bins(
        jnp.minimum(whole_row, m) + frac_row, m), cum_whole, cum_frac)
    return _ancestors(bins, grid, m, degenerate)


def _fraction(v: Array) -> Array:
    """v - floor(v) for 0 <= v < 2: exact (v - 1 is exact there)."""
    return jnp.where(v >= 1.0, v - 1.0, v)


def _ssp_counts(key: Array, x: Array, w: Array, m: int, grid: _Grid) -> Array:
    """Offspring counts (a memory grid) of the Srinivasan sampling process on x = M W.

    Each particle keeps floor(x_i) copies plus a Bernoulli whose mean is the fraction xi_i. The
    process walks the particles in position order holding one unresolved fraction a (at the
    "carrier") and meets the next fraction b: with d_up = min(1 - a, b), d_down = min(a, 1 - b),
    it moves mass d_up from b to a with probability d_down / (d_up + d_down), else d_down from a
    to b. Each fraction keeps its mean, the sum is conserved, and one of the two always hits 0 or
    1 and is resolved. Gerber, Chopin and Whiteley (2019), Section 5.

    Computed without a sequential pass: the carried fraction before step k is frac(xi_0 + ... +
    xi_{k-1}) whichever particle carries it, the fraction resolved at step k gets the bit
    [a + b >= 1] = the integer crossed by the running sum, and the carrier moves to k with
    probability b / (a + b) (a + b < 1) or (1 - b) / (2 - a - b) (a + b >= 1), independently of
    where it is. So a particle that never carries takes its own step's bit, and one that does
    takes the bit of the next step at which the carrier moves on: scans down and up the columns.
    """
    whole = jnp.floor(x)
    fractions = x - whole
    has_tail = x.shape[0] > grid.rows
    zeros = jnp.zeros(grid.cols, x.dtype)
    add = lambda a, b: (_fraction(a + b), a)  # carry: the fraction before this cell
    column_sums, _ = jax.lax.scan(lambda a, b: (_fraction(a + b), None), zeros,
                                  fractions[:grid.rows])
    main_end, column_start = jax.lax.scan(add, jnp.zeros((), x.dtype), column_sums)
    tail_a = jax.lax.scan(add, main_end, fractions[grid.rows])[1] if has_tail else zeros
    u = _unit_interval(_random_words(key, x.shape))

    def meet(a_within: Array, xs: tuple[Array, Array, Array]):
        r, b, u_row = xs
        # the carried fraction before this step
        a = jnp.where(r < grid.rows, _fraction(column_start + a_within), tail_a)
        # When the running sum hits an integer (a + b = 1, which the last fraction always does),
        # float rounding decides the branch; testing 1 - u in the upper one makes both branches
        # give the unit to the same particle for the same u (the carrier w.p. a, this one w.p. b).
        moves = jnp.where(a + b < 1.0,
                          u_row < jnp.where(a + b > 0.0, b / (a + b), 1.0),
                          1.0 - u_row < (1.0 - b) / (2.0 - a - b))
        moves = moves | (_positions(grid, r) == 0)  # particle 0 carries from the start
        return _fraction(a_within + b), (moves, (a + b >= 1.0).astype(jnp.int32))

    rows = jnp.arange(x.shape[0], dtype=jnp.int32)
    _, (moves, crossing) = jax.lax.scan(meet, zeros, (rows, fractions, u))

    # For each cell, the bit resolved at the next move after it (-1: none, the last carrier).
    none = jnp.full(grid.cols, -1, jnp.int32)
    later = lambda carry, xs: (jnp.where(xs[0], xs[1], carry), carry)
    tail_first, tail_next = none[0], none
    if has_tail:
        tail_first, tail_next = jax.lax.scan(later, none[0], (moves[-1], crossing[-1]),
                                             reverse=True)
    first, below = jax.lax.scan(later, none, (moves[:grid.rows], crossing[:grid.rows]),
                                reverse=True)
    _, after_column = jax.lax.scan(later, tail_first, (first >= 0, first), reverse=True)
    if has_tail:
        below = jnp.concatenate([below, tail_next[None]])

    def resolve(r, move, bit, next_bit, whole_row):
        next_bit = jnp.where((r < grid.rows) & (next_bit < 0), after_column, next_bit)
        bit = jnp.where(move, next_bit, bit)
        return (whole_row.astype(jnp.int32) + jnp.maximum(bit, 0),
                jnp.where(move, _positions(grid, r), -1))

    counts, carrier_positions = _map_rows(resolve, moves, crossing, below, whole)
    counts, w = counts.reshape(-1), w.reshape(-1)
    last = _cell_of_position(grid, jnp.max(carrier_positions))
    # The fractions sum to an integer only up to float32 rounding: the last carrier takes the
    # rest, but only if alive; any leftover goes to the particle with most offspring (so alive).
    rest = jnp.clip(m - jnp.sum(counts), 0, 1) * (w[last] > 0)
    counts = counts.at[last].add(rest.astype(jnp.int32))
    counts = counts.at[jnp.argmax(counts)].add(m - jnp.sum(counts))
    return counts.reshape(x.shape)


@_static
def ssp(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Srinivasan sampling process: floor(M W_i) or floor(M W_i) + 1 offspring, summing to M.

    [N] -> int32 [M]. O(N) in a few vectorised scans (see `_ssp_counts`).
    """
    n, m = _num(log_weights, num_samples)
    grid = _grid(n)
    x, w, degenerate = _expected_counts_grid(grid, log_weights, m)
    counts = _ssp_counts(key, x, w, m, grid)
    bins, _ = _column_prefix(grid, counts, lambda cum, r, total: _slot_bins(cum, m))
    return _ancestors(bins, grid, m, degenerate)


@_static
def killing(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Particle i survives with probability W_i / max W, else its slot gets a draw from W.

    [N] -> int32 [N]; M must equal N (raises ValueError otherwise).
    """
    n, m = _num(log_weights, num_samples)
    if m != n:
        raise ValueError(f"killing resampling needs num_samples == N ({n}), got {m}")
    key_survive, key_draw = jax.random.split(key)
    grid = _grid(n)
    w, degenerate = _weights_grid(grid, log_weights)  # max w = 1: w_i is the survival probability
    rows, cols = grid.shape
    cell = jnp.arange(rows * cols, dtype=jnp.int32).reshape(rows, cols)
    u = _unit_interval(_random_words(key_survive, (rows, cols)))
    killed = (u >= w) & (cell < n)
    rank, num_killed = _column_prefix(grid, killed.astype(jnp.int32), lambda k, r, t: k - 1)
    cs, total = _prefix(grid, w)
    cum = _multinomial_cumulative(key_draw, cs, total, m, num_killed)
    draws = _ancestors(_map_rows(lambda r, cum_row: _slot_bins(cum_row, m), cum), grid, m,
                       jnp.asarray(False))
    # Draw r sits in slot r of the slot grid (the particle grid, as M = N); only the multiset of
    # draws matters for the offspring counts.
    survivors = _map_rows(lambda r, killed_row, rank_row, cell_row: jnp.where(
        killed_row, draws[_cell_of_position(grid, jnp.maximum(rank_row, 0))], cell_row),
        killed, rank, cell)
    return _identity_if(degenerate, survivors.reshape(-1)[:n], n)


def traversal_order(n: int) -> np.ndarray:
    """The particle indices [N] in the order the schemes traverse them (see the module doc): the
    cumulative weights of systematic and stratified resampling, and SSP's pairing, follow it."""
    grid = _grid(static_int("n", n, 1))
    main = np.arange(grid.main).reshape(grid.rows, grid.cols).T.reshape(-1)
    return np.concatenate([main, np.arange(grid.main, n)]).astype(np.int32)


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
