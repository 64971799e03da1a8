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
C columns (even) plus a short last row, and the cumulative weights run down the columns, then along the
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

Multinomial draws (the multinomial scheme, residual's remainder, killing's replacements) count
uniform points below each cumulative weight from a table of the points' buckets; a point's place
within its bucket is drawn only where a cumulative weight lands in that bucket
(`_uniform_points`, `_count_below`): no sort and no search.

Speed on CPU. XLA:CPU hands a program its scratch memory as one block, and glibc maps a block above
32 MiB afresh, page faults and all, on every call (a third of the time at N = 10^6 before this
layout): so passes read their values row by row from functions of the row (`Rows`), recomputing
what is cheap (the weights from the log-weights) rather than storing it, and the heavy per-particle
work (`_count_below`) runs as one elementwise expression over a stored grid, as a loop body runs
about 2x slower. Grids have an even number of cells: XLA:CPU ran elementwise work over an odd
number of elements 1.6x slower, and with gathers 5x.

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


# ---------------------------------------------------------------------------------------------
# Grids: prefix sums down the columns of a [rows, cols] view
# ---------------------------------------------------------------------------------------------


class _Grid(NamedTuple):
    """`size` cells: a main block of rows x cols in row-major memory, rows a power of two, then
    a tail of size - rows * cols <= cols cells in one more memory row (zero-padded).

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
    """rows: the largest power of two <= sqrt(size) whose even column count leaves a tail that
    fits one memory row. Even columns make every grid's memory even: XLA:CPU ran elementwise
    work over an odd number of elements 1.6x slower, and with gathers 5x."""
    if size < 4:
        return _Grid(1, min(size, 2), size)
    rows = 1 << (math.isqrt(size).bit_length() - 1)
    while size - rows * (size // rows & ~1) > (size // rows & ~1):
        rows //= 2
    return _Grid(rows, size // rows & ~1, size)


def _cell_of_position(grid: _Grid, position: Array) -> Array:
    """Memory index of the cell at `position` (any position < rows (+ 1) x cols)."""
    shift = grid.rows.bit_length() - 1
    main = (position & (grid.rows - 1)) * grid.cols + jnp.right_shift(position, shift)
    return jnp.where(position < grid.main, main, position)


def _positions(grid: _Grid, r: Array) -> Array:
    """[cols] int32: the positions of memory row r's cells."""
    cols = jnp.arange(grid.cols, dtype=jnp.int32)
    return jnp.where(r < grid.rows, cols * grid.rows + r, grid.main + cols)


def _cells(grid: _Grid, r: Array) -> Array:
    """[cols] int32: the memory indices of memory row r's cells."""
    return r * grid.cols + jnp.arange(grid.cols, dtype=jnp.int32)


# Passes over the memory rows, one contiguous row at a time (a prefix sum needs the sequential
# sums down the columns). A pass reads its values from a function of the memory row r (`Rows`), so
# values that are cheap to recompute are recomputed by each pass rather than stored (module doc).
# What a pass makes per cell is stacked as the loop's output; a per-cell result that feeds a
# scatter or a gather is computed from that output afterwards, on the flat array.

Rows = Callable[[Array], Any]  # memory row r -> a pytree of [cols] arrays


class _MemoryRows(NamedTuple):
    """The rows of a flat array x holding a whole memory grid [rows (+ 1), cols] (and perhaps
    more after it), read in place, as `dtype` (x's by default)."""
    grid: _Grid
    x: Array
    dtype: Any = None

    def __call__(self, r: Array) -> Array:
        row = jax.lax.dynamic_slice(self.x, (r * self.grid.cols,), (self.grid.cols,))
        return row.astype(self.dtype or self.x.dtype)


def _flat_rows(grid: _Grid, x: Array) -> Rows:
    """The rows of a flat [size] array laid on the grid, read in place (no padded copy); the
    tail row's padding holds x's last entry, for the caller to mask."""
    if grid.size == grid.main:
        return _MemoryRows(grid, x)
    tail = jnp.pad(x[grid.main:], (0, grid.main + grid.cols - grid.size), mode="edge")

    def row(r: Array) -> Array:
        main = jax.lax.dynamic_slice(x, (jnp.minimum(r, grid.rows - 1) * grid.cols,),
                                     (grid.cols,))
        return jnp.where(r < grid.rows, main, tail)

    return row


def _map_rows(fn: Callable[..., Any], *grids: Array) -> Any:
    """fn(r, *rows r of grids) for each memory row r, stacked: [rows (+ 1), ...] leaves."""
    _, out = jax.lax.scan(lambda _, xs: (None, fn(*xs)), None,
                          (jnp.arange(grids[0].shape[0], dtype=jnp.int32), *grids))
    return out


def _scan_rows(grid: _Grid, step: Callable[[Any, Array], tuple[Any, Any]], init: Any = None):
    """(acc, outs): acc, out_r = step(acc, r) over the memory rows r, outs stacked."""
    return jax.lax.scan(step, init, jnp.arange(grid.shape[0], dtype=jnp.int32))


class _Columns(NamedTuple):
    """The first pass of a prefix sum in position order; each field a pytree like a row's."""
    offsets: Any  # [cols]: the sum of all columns before each one
    tail: Any     # [cols]: the inclusive prefix sums along the tail row (zeros without a tail)
    total: Any    # scalars: the sum of every cell


def _columns(grid: _Grid, rows: Rows) -> _Columns:
    """Sums each main column sequentially down its rows, chains the column sums sequentially,
    then continues the chain cell by cell along the tail. (The second pass, `_fold`, repeats
    the column sums cell by cell, so for floats its last entry of a column is the chained one.)"""
    like = jax.eval_shape(rows, jnp.int32(0))
    add = functools.partial(jax.tree.map, jnp.add)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), like)
    if (isinstance(rows, _MemoryRows) and not jnp.issubdtype(like.dtype, jnp.floating)
            and rows.x.size % grid.cols == 0):
        # Integer sums are exact in any order: one reduction, no loop; less the rows after the
        # main block, as a slice of the main block would be copied.
        memory = rows.x.reshape(-1, grid.cols)
        sums = (jnp.sum(memory, axis=0, dtype=like.dtype)
                - jnp.sum(memory[grid.rows:], axis=0, dtype=like.dtype))
    else:
        sums = jax.lax.fori_loop(0, grid.rows, lambda r, s: add(s, rows(r)), zeros)
    chain = lambda carry, t: (add(carry, t), add(carry, t))
    start = jax.tree.map(lambda a: jnp.zeros((), a.dtype), like)
    _, ends = jax.lax.scan(chain, start, sums)  # the last entry of each column
    offsets = jax.tree.map(lambda e: jnp.concatenate([jnp.zeros((1,), e.dtype), e[:-1]]), ends)
    total = jax.tree.map(lambda e: e[-1], ends)
    tail = zeros
    if grid.size > grid.main:
        total, tail = jax.lax.scan(chain, total, rows(jnp.int32(grid.rows)))
    return _Columns(offsets, tail, total)


def _fold(grid: _Grid, rows: Rows, columns: _Columns,
          finish: Callable[[Any, Any, Array], Any], *, real_cells: bool = False) -> Any:
    """The second pass of the prefix sum: finish(cs, values, r) stacked over the memory rows r,
    `values` row r's values and `cs` their inclusive prefix sums in position order; `columns`
    is `_columns(grid, rows)`. With `real_cells`, finish returns one array per row and the
    result is its entries for the real cells, flat [size]: written in place, no copy.

    cs at main cell (r, c) is fl(offset_c + s_rc), with s_rc the sequential sum down column c and
    offset_c chained sequentially, offset_{c+1} = fl(offset_c + s_{rows-1,c}) = the last entry of
    column c; the tail continues the chain cell by cell. So for floats x >= 0 cs never decreases
    along the positions and stays flat exactly where x == 0; integer sums are exact; the last
    entry is `columns.total`.
    """
    add = functools.partial(jax.tree.map, jnp.add)
    zeros = jax.tree.map(jnp.zeros_like, columns.offsets)

    def body(within, r):
        values = rows(r)
        within = add(within, values)  # the first pass's sums, cell by cell
        cs = jax.tree.map(lambda o, s, t: jnp.where(r < grid.rows, o + s, t),
                          columns.offsets, within, columns.tail)
        return within, finish(cs, values, r)

    if not real_cells:
        return _scan_rows(grid, body, zeros)[1]
    like = jax.eval_shape(lambda: body(zeros, jnp.int32(0))[1])

    def write(r, carry):
        within, out = carry
        within, row = body(within, r)
        return within, jax.lax.dynamic_update_slice(out, row, (r * grid.cols,))

    out = jax.lax.fori_loop(0, grid.rows, write, (zeros, jnp.zeros(grid.size, like.dtype)))[1]
    if grid.size > grid.main:
        tail = finish(columns.tail, rows(jnp.int32(grid.rows)), jnp.int32(grid.rows))
        out = jax.lax.dynamic_update_slice(out, tail[:grid.size - grid.main], (grid.main,))
    return out


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


def _top(log_weights: Array) -> tuple[Array, Array]:
    """(log-weights in at least float32, their max): half precision cannot resolve a cdf over
    many particles. The max is NaN if any entry is: one reduction finds every special case."""
    log_weights = log_weights.astype(jnp.promote_types(log_weights.dtype, jnp.float32))
    return log_weights, jnp.max(log_weights)


def _shifted_exp(log_weights: Array, top: Array) -> Array:
    """exp(logw - top), with `== top` covering +inf (inf - inf would be NaN) and all -inf, and
    every entry 0 (so w = 1) when top is NaN."""
    return jnp.exp(jnp.where((log_weights == top) | jnp.isnan(top), 0.0, log_weights - top))


def _is_degenerate(top: Array) -> Array:
    return jnp.isnan(top) | jnp.isneginf(top)


def _weight_rows(grid: _Grid, log_weights: Array) -> tuple[Rows, Array]:
    """(the rows of w = exp(logw - max logw) on the particle grid, 0 on padding; degenerate),
    computed from the log-weights row by row. Max w = 1 and dead particles are exactly 0; with
    +inf entries w is 1 on them and 0 elsewhere (the module doc's limit). `degenerate` (bool
    scalar) is any NaN or all -inf; w is then 1 everywhere, only so that the arithmetic stays
    finite until the draws are discarded for the identity."""
    log_weights, top = _top(log_weights)
    read = _flat_rows(grid, log_weights)
    tail = grid.size - grid.main

    def row(r: Array) -> Array:
        real = (r < grid.rows) | (jnp.arange(grid.cols) < tail)
        return jnp.where(real, _shifted_exp(read(r), top), 0.0)

    return row, _is_degenerate(top)


def _expected_count_rows(grid: _Grid, log_weights: Array, m: int) -> tuple[Rows, Array]:
    """(the rows of x = M W on the particle grid, 0 on padding; degenerate). The scale M / sum w
    is one reduction over the [N] log-weights (no loop, nothing stored; the same rounding under
    vmap as without); it and x are exact for equal weights when N divides M.
    """
    weights, degenerate = _weight_rows(grid, log_weights)
    log_weights, top = _top(log_weights)
    scale = m / jnp.sum(_shifted_exp(log_weights, top))
    return (lambda r: weights(r) * scale), degenerate


def _histogram_cells(grid: _Grid) -> Array:
    """An empty int32 histogram over the grid's memory and one more row: the cells past the
    grid catch what counts for no cell, and whole rows let `_columns` sum it in one reduction."""
    return jnp.zeros((grid.shape[0] + 1) * grid.cols, jnp.int32)


def _add_ones(hist: Array, bins: Array) -> Array:
    """hist with 1 added at each of `bins` (any shape), which must lie in [0, len(hist))."""
    dims = jax.lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,),
                                           scatter_dims_to_operand_dims=(0,))
    # Flat indices: XLA:CPU copied a grid of indices given as [rows, cols, 1] (and flattened it
    # anyway); promise_in_bounds: it runs a bounds-checked scatter slower.
    return jax.lax.scatter_add(hist, bins.reshape(-1, 1), jnp.ones(bins.size, hist.dtype), dims,
                               mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _slot_bins(cum_counts: Array, m: int) -> Array:
    """The slot-grid cell of each cumulative count Nc; Nc = M lands on a cell past every slot's
    position (padding, or the one after the grid)."""
    return _cell_of_position(_grid(m), cum_counts)


def _ancestors(bins: Array, particles: _Grid, m: int, degenerate: Array) -> Array:
    """Ancestors [M] from the slot bins (`_slot_bins`, any shape) of the cumulative counts
    Nc (non-decreasing along the particle positions, last = M); ancestor_j = j mod N instead
    where `degenerate` (see the module doc).

    Slot j's ancestor is the particle at the first position p with Nc_p > j, and that position is
    #{p : Nc_p <= j}: a histogram of Nc over the slots and its prefix sum. Slot j is the slot
    grid's position j, so the prefix sum runs in position order, and the result holds slot j at
    memory index `_cell_of_position(_grid(M), j)` (slots are exchangeable: any fixed order will do).
    """
    slots = _grid(m)
    # One scatter after the loop that made the bins: XLA:CPU ran a scatter inside a loop body ~3x
    # slower whenever a select fed its indices. A row past the grid holds Nc = M.
    hist = _add_ones(_histogram_cells(slots), bins)
    rows = _MemoryRows(slots, hist)  # the last cells, Nc = M without padding, are never read

    def finish(position: Array, values: Array, r: Array) -> Array:
        memory = _cells(slots, r)
        identity = memory % particles.size if m > particles.size else memory
        return jnp.where(degenerate, identity, _cell_of_position(particles, position))

    return _fold(slots, rows, _columns(slots, rows), finish, real_cells=True)


class _Points(NamedTuple):
    """`size` i.i.d. uniform points on [0, 1), as counts in K = 2^bits equal buckets."""
    words: tuple[Array, Array]  # the Threefry key of the points and of their places in buckets
    bits: int
    below: Array  # [K], at the bucket grid's cell of b: #{points in buckets 0..b}
    fullest: Array  # the most points in one bucket
    size: Array | int


def _uniform_points(key: Array, m: int, size: Array | int) -> _Points:
    """`size` <= M (may be traced) i.i.d. uniform points, drawn as their buckets.

    Point j's bucket is the top `bits` bits of a Threefry word, so the bucket counts are
    Multinomial(size, equal); given them, the points' places within their buckets are i.i.d.
    uniform and independent of everything else, so they are drawn only where a query needs them
    (`_count_below`). K = 2^bits is between M / 4 and M / 2 (about 3 points a bucket: a smaller
    table makes the histogram's scatter and prefix sum cheaper, more points a bucket cost more
    places per query; this balance measured fastest at M = 10^6), at least 2^12 and at most 2^24
    (so float32 resolves a bucket exactly).
    """
    bits = min(max((m - 1).bit_length() - 2, 12), 24)
    buckets = _grid(1 << bits)
    k0, k1 = _key_words(key)
    j = jnp.arange(m + (m & 1), dtype=jnp.uint32)  # any `size` distinct counters; even: `_grid`
    b = jnp.right_shift(_threefry2x32(k0, k1, j, jnp.uint32(0))[0], np.uint32(32 - bits))
    # Unused counters go to bucket K, the histogram's first cell after the grid.
    b = jnp.where(j < size, b.astype(jnp.int32), 1 << bits)
    hist = _add_ones(_histogram_cells(buckets), _cell_of_position(buckets, b))
    rows = _MemoryRows(buckets, hist)
    below = _fold(buckets, rows, _columns(buckets, rows), lambda cs, values, r: cs)
    return _Points((k0, k1), bits, below.reshape(-1), jnp.max(hist[:1 << bits]), size)


# Places drawn for every query: they hold a bucket's first 24 points. With about 3 points a
# bucket, a fuller bucket turns up in about one call in 10^6 at M = 10^6 (one in 10^5 at 10^7),
# and then a loop draws the places it needs.
_PLACES = 24


def _place_bits(bits: int) -> int:
    """Bits of a place within a bucket: enough that a place resolves the unit interval to 2^-24
    (float32's resolution of the cdf near 1) with K = 2^bits buckets, 8 or 16."""
    return 8 if bits >= 16 else 16


def _count_below(points: _Points, cs: Array, total: Array) -> Array:
    """#{points < cs / total} for cdf values cs (flat, 0 <= cs <= total): all `size` where
    cs = total. Non-decreasing in cs, so cumulative counts made of it are consistent.

    For u = cs / total in bucket b = floor(K u), the count is the points in buckets below b plus
    those of bucket b whose place is below K u - b. The places are w-bit fields of Threefry at
    counters (b, c) (`_place_bits`), 64 / w to a call c = 1, 2, ... (the buckets' own counters
    are (j, 0)), the i-th field the place of the bucket's i-th point: queries in one bucket see
    the same places.
    """
    k0, k1 = points.words
    k = 1 << points.bits
    buckets = _grid(k)
    width = _place_bits(points.bits)
    per_call = 64 // width
    mask = np.uint32((1 << width) - 1)

    def bucket(cs: Array) -> tuple[Array, Array]:
        """(b, the place of u = cs / total within bucket b on the 2^width scale)."""
        f = cs * np.float32(k) / total  # scaling by 2^bits: the same rounding as cs / total
        b = jnp.minimum(jnp.floor(f), k - 1)
        return b.astype(jnp.int32), (f - b) * np.float32(1 << width)  # exact; 2^width at u = 1

    def hits(call: Array, cs: Array) -> Array:
        """#{the bucket's points per_call (call - 1) .. per_call call - 1 below u} (none where
        u = 1)."""
        b, place = bucket(cs)
        count = points.below[_cell_of_position(buckets, b)] - below_bucket(b)
        words = _threefry2x32(k0, k1, b.astype(jnp.uint32), call.astype(jnp.uint32))
        fields = [(word >> np.uint32(shift)) & mask for word in words
                  for shift in range(0, 32, width)]
        found = jnp.zeros(cs.shape, jnp.int32)
        for i, field in enumerate(fields):
            found = found + ((per_call * (call - 1) + i < count)
                             & (field.astype(jnp.float32) < place))
        return jnp.where(cs == total, 0, found)

    def below_bucket(b: Array) -> Array:
        return jnp.where(b > 0, points.below[_cell_of_position(buckets, jnp.maximum(b - 1, 0))], 0)

    counted = jnp.where(cs == total, points.size, below_bucket(bucket(cs)[0]))
    calls = -(-_PLACES // per_call)
    for call in range(1, calls + 1):
        counted = counted + hits(jnp.int32(call), cs)

    def more(call: Array, counted: Array) -> Array:
        # The barrier ties cs to the loop's counter: otherwise XLA hoists the buckets out of the
        # loop as invariants and stores them, for a loop that almost never runs.
        return counted + hits(*jax.lax.optimization_barrier((call, cs)))

    needed = (points.fullest + per_call - 1) // per_call
    return jax.lax.fori_loop(calls + 1, needed + 1, more, counted)


# ---------------------------------------------------------------------------------------------
# Schemes
# ---------------------------------------------------------------------------------------------


def _resample_by_cdf(log_weights: Array, m: int,
                     cum_counts: Callable[[Array, Array], Array]) -> Array:
    """Ancestors [M] from cum_counts(cs, total) -> Nc, the cumulative offspring counts at the
    cdf of w (`_weight_rows`), a memory grid: two passes over the weights, the second storing
    only the cdf."""
    grid = _grid(log_weights.shape[0])
    rows, degenerate = _weight_rows(grid, log_weights)
    columns = _columns(grid, rows)
    # Flat: the gathers and the scatter that follow index flat arrays.
    cs = _fold(grid, rows, columns, lambda cs, w, r: cs).reshape(-1)
    return _ancestors(_slot_bins(cum_counts(cs, columns.total), m), grid, m, degenerate)


@_static
def multinomial(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """M i.i.d. draws from W. log_weights [N] -> ancestors int32 [M].

    Nc_i = #{uniform points below C_i}, counted from a bucket table of the points
    (`_uniform_points`): O(N + M).
    """
    _, m = _num(log_weights, num_samples)
    points = _uniform_points(key, m, m)
    return _resample_by_cdf(log_weights, m, functools.partial(_count_below, points))


@_static
def stratified(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Inverse cdf at u_j = (j + U_j) / M, U_j i.i.d. uniform. [N] -> int32 [M].

    Nc_i = #{j : j + U_j <= M C_i} = k + [U_k <= M C_i - k], k = floor(M C_i): O(N + M). U_k is
    Threefry of the counter k, evaluated where it is needed, so no [M] array of uniforms is made.
    """
    _, m = _num(log_weights, num_samples)
    k0, k1 = _key_words(key)

    def cum_counts(cs: Array, total: Array) -> Array:
        x = (cs * m) / total  # rather than cs * (m / total): exact for equal weights and m = N
        k = jnp.clip(jnp.floor(x), 0, m - 1).astype(jnp.int32)
        # (0, 1]: a point at 0 would hit W_0 = 0
        u = 1.0 - _unit_interval(_threefry2x32(k0, k1, k.astype(jnp.uint32), jnp.uint32(0))[0])
        # x - k is exact in floating point, so Nc is exactly the count for these points.
        cum = k + (u <= x - k).astype(jnp.int32)
        # cs == total: the last living particle and the dead tail after it take the rest.
        return jnp.where(cs == total, m, cum)

    return _resample_by_cdf(log_weights, m, cum_counts)


@_static
def systematic(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Inverse cdf at u_j = (j + U) / M, one shared uniform U. [N] -> int32 [M].

    Nc_i = #{j : j + U <= M C_i} = floor(M C_i - U) + 1, clipped to [0, M]: O(N + M).
    """
    _, m = _num(log_weights, num_samples)
    # (0, 1]: floor(0 - U) + 1 = 0 at C = 0
    u = 1.0 - jax.random.uniform(key, (), dtype=jnp.promote_types(log_weights.dtype,
                                                                   jnp.float32))

    def cum_counts(cs: Array, total: Array) -> Array:
        x = (cs * m) / total  # exact for equal weights and m = N
        cum = jnp.clip(jnp.floor(x - u).astype(jnp.int32) + 1, 0, m)
        return jnp.where(cs == total, m, cum)

    return _resample_by_cdf(log_weights, m, cum_counts)


@_static
def residual(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """floor(M W_i) copies of i, then R = M - sum floor(M W) multinomial draws on M W - floor(M W).

    [N] -> int32 [M]. R is traced; the draws use a fixed M-length construction.
    """
    n, m = _num(log_weights, num_samples)
    grid = _grid(n)
    expected, degenerate = _expected_count_rows(grid, log_weights, m)

    def rows(r: Array) -> tuple[Array, Array]:
        x = expected(r)
        whole = jnp.floor(x)
        return whole.astype(jnp.int32), x - whole

    columns = _columns(grid, rows)
    whole_total, frac_total = columns.total
    # When every fraction is 0 (R = 0) no point is drawn; keep the fractions' cdf finite.
    frac_total = jnp.where(frac_total > 0, frac_total, 1.0)
    points = _uniform_points(key, m, m - jnp.minimum(whole_total, m))

    whole_columns, frac_columns = (_Columns(*(field[i] for field in columns)) for i in (0, 1))
    whole_rows, frac_rows = (lambda r: rows(r)[0]), (lambda r: rows(r)[1])
    frac_cs = _fold(grid, frac_rows, frac_columns, lambda cs, values, r: cs)
    # The draws' counts are made from the stored fractions' cdf; a second pass adds the whole
    # copies' counts, recomputed rather than stored.
    drawn = _MemoryRows(grid, _count_below(points, frac_cs, frac_total).reshape(-1))
    bins = _fold(grid, whole_rows, whole_columns,
                 lambda whole_cs, values, r: _slot_bins(jnp.minimum(whole_cs, m) + drawn(r), m))
    return _ancestors(bins, grid, m, degenerate)


def _fraction(v: Array) -> Array:
    """v - floor(v) for 0 <= v < 2: exact (v - 1 is exact there)."""
    return jnp.where(v >= 1.0, v - 1.0, v)


def _ssp_counts(key: Array, x: Array, m: int, grid: _Grid) -> Array:
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
    shape, counts = counts.shape, counts.reshape(-1)
    last = _cell_of_position(grid, jnp.max(carrier_positions))
    # The fractions sum to an integer only up to float32 rounding: the last carrier takes the
    # rest, but only if alive; any leftover goes to the particle with most offspring (so alive).
    rest = jnp.clip(m - jnp.sum(counts), 0, 1) * (x.reshape(-1)[last] > 0)
    counts = counts.at[last].add(rest.astype(jnp.int32))
    counts = counts.at[jnp.argmax(counts)].add(m - jnp.sum(counts))
    return counts.reshape(shape)


@_static
def ssp(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
    """Srinivasan sampling process: floor(M W_i) or floor(M W_i) + 1 offspring, summing to M.

    [N] -> int32 [M]. O(N) in a few vectorised scans (see `_ssp_counts`).
    """
    n, m = _num(log_weights, num_samples)
    grid = _grid(n)
    expected, degenerate = _expected_count_rows(grid, log_weights, m)
    x = _scan_rows(grid, lambda _, r: (None, expected(r)))[1]
    counts = _MemoryRows(grid, _ssp_counts(key, x, m, grid).reshape(-1))
    bins = _fold(grid, counts, _columns(grid, counts), lambda cum, values, r: _slot_bins(cum, m))
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
    weights, degenerate = _weight_rows(grid, log_weights)  # max w = 1: the survival probability
    k0, k1 = _key_words(key_survive)

    def killed_row(r: Array) -> Array:
        cells = _cells(grid, r)
        u = _unit_interval(_threefry2x32(k0, k1, cells.astype(jnp.uint32), jnp.uint32(0))[0])
        return (u >= weights(r)) & (cells < n)

    killed_grid = _scan_rows(grid, lambda _, r: (None, killed_row(r)))[1]  # 1 byte a cell
    killed = _MemoryRows(grid, killed_grid.reshape(-1), jnp.int32)
    kill_columns = _columns(grid, killed)
    points = _uniform_points(key_draw, m, kill_columns.total)
    draws = _resample_by_cdf(log_weights, m, functools.partial(_count_below, points))

    # Draw k sits in slot k of the slot grid (the particle grid, as M = N); only the multiset of
    # draws matters for the offspring counts.
    def survivor(killed_cs: Array, killed: Array, r: Array) -> Array:
        rank = jnp.maximum(killed_cs - 1, 0)
        survives = (killed == 0) | degenerate  # degenerate: the identity (module doc)
        return jnp.where(survives, _cells(grid, r), draws[_cell_of_position(grid, rank)])

    return _fold(grid, killed, kill_columns, survivor, real_cells=True)


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
