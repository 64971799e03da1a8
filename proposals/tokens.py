"""Token proposals: pure samplers over a batch of logits ``[B, V]``.

Every sampler returns ``(tokens [B], logq [B])`` where ``logq`` is the log-probability of the
sampled token under the distribution actually sampled from: temperature-scaled, masked, top-k and
top-p filtered, then renormalised. Importance weights that use ``logq`` therefore stay exact when
filters are on (the filters change the *proposal*, not the target, as long as the weight uses this
``logq`` and the target's support is inside the filtered support).

Filter order: mask -> temperature -> top-k -> top-p (the nucleus is computed on the renormalised
top-k distribution). Ties at the top-k / top-p boundary are broken by token id (stable sort).
``temperature == 0`` means greedy (``logq = 0``).

`categorical` draws from softmax(logq) with log2(V) uniforms per row instead of the Gumbel-max
trick's one random number per vocabulary entry (`jax.random.categorical`), which costs more
than the rest of a decode step at V ~ 50k-260k; `draw_tokens` does the same from raw logits,
with temperature and mask, without writing the normalised ``[B, V]`` log-probabilities.
`log_softmax` and `argmax` (greedy) are `jax.nn.log_softmax` and `jnp.argmax` over the same
blocks, for the same reason.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf
NO_TOKEN = -1  # the token of a row that has none to draw (see `categorical`)


# ---------------------------------------------------------------------------------------------
# Row reductions over blocks of the vocabulary
# ---------------------------------------------------------------------------------------------


def _block_size(vocab_size: int) -> int:
    """A power of two near sqrt(V): the block level and the in-block level are then both small."""
    return 1 << math.ceil(math.log2(math.sqrt(vocab_size))) if vocab_size > 1 else 1


def _block_reduce(reduce, block: int, fn, *arrays):
    """reduce(fn(*arrays)) over consecutive blocks of `block` tokens -> [n, ceil(V / block)].

    arrays: [n, V] arrays and per-row [n, 1] parameters; fn is elementwise. The full blocks are
    reduced as one 2-D [n * V // block, block] array, with fn applied after the reshape (a
    broadcast of the [n, 1] parameters over the 3-D view): XLA:CPU runs that 3-4x faster than
    fn(*arrays) reshaped afterwards, and faster than whole-row reductions. The last, partial
    block is reduced apart, so that nothing is padded (a pad would copy all of [n, V]).
    """
    n, vocab_size = arrays[0].shape[0], max(a.shape[-1] for a in arrays)
    num_full, rest = divmod(vocab_size, block)
    per_row = [a.shape[-1] == 1 and vocab_size > 1 for a in arrays]
    parts = []
    if num_full:
        # The barrier keeps XLA from moving fn's elementwise ops back before the reshape (it
        # does so for a scalar constant such as a Python temperature), the slow form.
        views = [a[:, :, None] if row else jax.lax.optimization_barrier(
            a[:, :num_full * block].reshape(n, num_full, block)) for a, row in zip(arrays, per_row)]
        full = fn(*views).reshape(n * num_full, block)
        parts.append(reduce(full, axis=-1).reshape(n, num_full))
    if rest:
        tails = [a if row else a[:, num_full * block:] for a, row in zip(arrays, per_row)]
        parts.append(reduce(fn(*tails), axis=-1, keepdims=True))
    return jnp.concatenate(parts, axis=-1) if len(parts) > 1 else parts[0]


def _identity(x):
    return x


def _row_max(block: int, fn, *arrays):
    """max over each row of fn(*arrays) -> [n, 1]; NaN where a row holds a NaN."""
    top = jnp.max(_block_reduce(jnp.max, block, fn, *arrays), axis=-1, keepdims=True)
    return jax.lax.stop_gradient(top)


def _exp_block_sums(block: int, fn, top, *arrays):
    """Block sums of exp(fn(*arrays) - top) -> [n, num_blocks], top [n, 1] the row max."""
    sums = _block_reduce(jnp.sum, block, lambda top, *a: jnp.exp(fn(*a) - top), top, *arrays)
    # The barrier keeps XLA from rewriting a later sum of these sums into a second full pass
    # over the exponentials, which it would then write out for the two passes to share.
    return jax.lax.optimization_barrier(sums)


@jax.jit
def log_softmax(logits):
    """`jax.nn.log_softmax` over the last axis, equal up to float rounding, ~15% faster on CPU
    at [64, 262144] (blocked reductions; the rest is writing the result)."""
    x = jnp.asarray(logits)
    batch_shape, vocab_size = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, vocab_size)
    block = _block_size(vocab_size)
    top = _row_max(block, _identity, x)
    sums = _exp_block_sums(block, _identity, top, x)
    return (x - (top + jnp.log(jnp.sum(sums, axis=-1, keepdims=True)))).reshape(*batch_shape,
                                                                               vocab_size)


def filtered_logprobs(logits, temperature=1.0, top_k: int | None = None,
                      top_p: float | None = None, mask=None):
    """Log-probabilities ``[B, V]`` of the filtered, renormalised proposal (``-inf`` off support).

    ``temperature``, ``top_p`` may be scalars or ``[B]`` arrays; ``top_k`` is a static int;
    ``mask`` is a boolean ``[B, V]`` or ``[V]`` (True = allowed).
    """
    logits = jnp.asarray(logits, jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    t = jnp.asarray(temperature, jnp.float32)
    t = t[..., None] if t.ndim == 1 else t
    logits = logits / t
    V = logits.shape[-1]
    if top_k is not None and top_k < V:
        # keep exactly top_k entries: rank by (value desc, id asc)
        rank = jnp.argsort(jnp.argsort(-logits, axis=-1, stable=True), axis=-1)
        logits = jnp.where(rank < top_k, logits, NEG_INF)
    logp = log_softmax(logits)
    if top_p is not None:
        p = jnp.asarray(top_p, jnp.float32)
        p = p[..., None] if p.ndim == 1 else p
        order = jnp.argsort(-logp, axis=-1, stable=True)
        sorted_lp = jnp.take_along_axis(logp, order, axis=-1)
        cum_before = jnp.cumsum(jnp.exp(sorted_lp), axis=-1) - jnp.exp(sorted_lp)
        keep_sorted = cum_before < p  # smallest prefix whose mass reaches top_p
        keep_sorted = keep_sorted.at[..., 0].set(True)
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logp = log_softmax(jnp.where(keep, logp, NEG_INF))
    return logp


# ---------------------------------------------------------------------------------------------
# Exact categorical draws by walking down trees of partial sums
# ---------------------------------------------------------------------------------------------


def _pyramid(leaves):
    """Partial sums [leaves [n, 2^k], sums of pairs [n, 2^(k-1)], ..., root [n, 1]]."""
    levels = [leaves]
    while levels[-1].shape[-1] > 1:
        levels.append(levels[-1].reshape(leaves.shape[0], -1, 2).sum(axis=-1))
    return levels


def _fine_uniforms(key, shape):
    """Uniforms on [0, 1) whose resolution near 0 is relative (2^-24 of the value, down to 2^-48).

    A plain float32 uniform is a multiple of 2^-23 or 2^-24, so `u < r` would round every small
    probability r to that grid; here P(u < r) = r (1 +- 2^-24) +- 2^-48.
    """
    bits = jax.random.bits(key, (*shape, 2), jnp.uint32) >> 8  # two 24-bit integers
    coarse, fine = bits[..., 0].astype(jnp.float32), bits[..., 1].astype(jnp.float32)
    return coarse * 2.0**-24 + fine * 2.0**-48


def _descend(levels, uniforms):
    """Leaf index [n] reached from the root of `levels` (from `_pyramid`), one uniform per level.

    At each node the child of smaller mass is taken with probability small / (left + right),
    tested as u < small / (left + right): the comparison is accurate relative to the smaller
    probability, so a light branch keeps its relative accuracy whatever its heavy sibling weighs.
    A child of zero mass is never taken (u < 0 is false) unless both are zero.
    """
    node = jnp.zeros((levels[0].shape[0], 1), jnp.int32)
    for depth, level in enumerate(reversed(levels[:-1])):
        left = jnp.take_along_axis(level, 2 * node, axis=-1)
        right = jnp.take_along_axis(level, 2 * node + 1, axis=-1)
        take_smaller = uniforms[:, depth, None] < jnp.minimum(left, right) / (left + right)
        go_right = jnp.where(left <= right, ~take_smaller, take_smaller)
        node = 2 * node + go_right.astype(jnp.int32)
    return node[:, 0]


def _walk(key, scores_at, top, block_sums, block: int, vocab_size: int):
    """(tokens int32 [n], their scores [n]): a block by its mass, then a token inside it.

    scores_at(positions [n, block]) gives the scores (logits) there; the block's masses are
    recomputed from them exactly as `block_sums` was, exp(score - top). Rows without a drawable
    token (top not finite) get NO_TOKEN.
    """
    n, num_blocks = block_sums.shape
    padded = 1 << (num_blocks - 1).bit_length()
    leaves = jnp.concatenate([block_sums, jnp.zeros((n, padded - num_blocks), block_sums.dtype)],
                             axis=-1) if padded > num_blocks else block_sums
    block_levels = _pyramid(leaves)
    depth_blocks, depth_tokens = len(block_levels) - 1, block.bit_length() - 1
    uniforms = _fine_uniforms(key, (n, depth_blocks + depth_tokens))
    chosen = _descend(block_levels, uniforms[:, :depth_blocks])

    positions = chosen[:, None] * block + jnp.arange(block, dtype=jnp.int32)
    inside = positions < vocab_size
    scores = scores_at(jnp.minimum(positions, vocab_size - 1))
    masses = jnp.where(inside, jnp.exp(scores - top), 0.0)
    offset = _descend(_pyramid(masses), uniforms[:, depth_blocks:])[:, None]

    drawn = jnp.take_along_axis(masses, offset, axis=-1)[:, 0]
    # drawn > 0 always holds in a row with mass (the walk never enters a zero-mass branch whose
    # sibling has mass); it is tested so that no rounding can ever hand out a masked token.
    ok = (drawn > 0) & jnp.isfinite(top[:, 0])
    tokens = jnp.where(ok, chosen * block + offset[:, 0], NO_TOKEN).astype(jnp.int32)
    return tokens, jnp.take_along_axis(scores, offset, axis=-1)[:, 0]


def _as_rows(name, values):
    values = jnp.asarray(values)
    if values.ndim < 1 or values.shape[-1] < 1:
        raise ValueError(f"{name} must have shape [..., V] with V >= 1, got {values.shape}")
    if not jnp.issubdtype(values.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {values.dtype}")
    x = values.astype(jnp.promote_types(values.dtype, jnp.float32))
    return x.reshape(-1, values.shape[-1]), values.shape[:-1]


@jax.jit
def categorical(key, logq):
    """One draw per row from softmax(logq): logq [..., V] -> tokens int32 [...].

    ``logq`` may be unnormalised (any logits). Entries at -inf (masked tokens) are never drawn. A
    row with no token to draw gives ``NO_TOKEN`` (-1), never a masked token: every entry -inf,
    or any NaN or +inf (softmax is undefined there: `jax.nn.softmax` gives NaN).

    Cost: two reads of ``logq`` (its row max, then block sums of exp(logq - max) over blocks of
    B ~ sqrt(V) tokens), then a walk down binary trees of partial sums, first over the block sums
    to a block, then over that block's masses to a token: log2(V) uniforms per row (18 at V =
    262,144) where the Gumbel-max trick of `jax.random.categorical` needs V.

    Accuracy (float32): each step of the walk compares a uniform with (smaller child) / (both
    children), so its rounding is relative to the branch's own probability, not to the row's
    total as in one long cumulative sum (where every token's interval would be off by up to one
    ulp of the total, ~6e-8, which is all of a 1e-8 token). The product of the steps telescopes
    to (token mass) / (row total), so a token of probability p is drawn with probability
    p (1 + e), |e| <= (2 B + 4 log2 V) 2^-24 + log2(V) 2^-48 / p: at V = 262,144 (B = 512),
    |e| <= 6.5e-5 + 6.4e-14 / p, below 1.5e-4 for every p >= 1e-9 (2 B 2^-24 is the worst
    summation order of XLA's block sums; typically |e| ~ 1e-6). Seeing a bias e on a token of
    probability p takes ~(3 / e)^2 / p draws: 2e13 at p = 1e-4. Tokens with logq < max - 87
    (relative weight < 1.6e-38) underflow and are never drawn.
    """
    x, batch_shape = _as_rows("logq", logq)
    vocab_size = x.shape[-1]
    block = _block_size(vocab_size)
    top = _row_max(block, _identity, x)
    sums = _exp_block_sums(block, _identity, top, x)
    tokens, _ = _walk(key, lambda at: jnp.take_along_axis(x, at, axis=-1), top, sums, block,
                      vocab_size)
    return tokens.reshape(batch_shape)


class TokenDraw(NamedTuple):
    tokens: jax.Array          # int32 [...], NO_TOKEN where the row has none to draw
    logq: jax.Array            # [...] log q(token), q = softmax(where(mask, logits, -inf) / t)
    log_normalizer: jax.Array  # [...] logsumexp(where(mask, logits, -inf) / t)


@jax.jit
def draw_tokens(key, logits, temperature=1.0, mask=None) -> TokenDraw:
    """One token per row from q = softmax(where(mask, logits, -inf) / temperature), as
    `categorical(key, filtered_logprobs(logits, temperature, mask=mask))` gives it (same
    distribution, same rules), but from the raw logits [..., V]: two reads of them and no
    [..., V] result, where the two-step route reads them five times and writes log q once.

    ``temperature`` (> 0) is a scalar or one per row [...]; ``mask`` is boolean [..., V] or [V]
    (True = allowed). ``logq`` is NaN where the token is NO_TOKEN. ``log_normalizer`` is what
    Power-SMC calls log C_t when logits are log p and temperature = 1 / alpha_t.
    """
    raw, batch_shape = _as_rows("logits", logits)
    n, vocab_size = raw.shape
    t = jnp.broadcast_to(jnp.asarray(temperature, raw.dtype), batch_shape).reshape(n, 1)
    allowed = None if mask is None else jnp.broadcast_to(
        jnp.asarray(mask, bool), (*batch_shape, vocab_size)).reshape(n, vocab_size)

    def scores(values, temperature, allowed_here=None):
        values = values if allowed_here is None else jnp.where(allowed_here, values, NEG_INF)
        return values / temperature

    def scores_at(at):
        here = None if allowed is None else jnp.take_along_axis(allowed, at, axis=-1)
        return scores(jnp.take_along_axis(raw, at, axis=-1), t, here)

    block = _block_size(vocab_size)
    # max(x / t) = max(x) / t (t > 0; up to rounding, harmless in a shift): the max pass reads the
    # raw logits, and XLA then has no reason to write x / t out for both passes to share.
    masks = () if allowed is None else (allowed,)
    top = _row_max(block, lambda x, *a: scores(x, 1.0, *a), raw, *masks) / t
    sums = _exp_block_sums(block, scores, top, raw, t, *masks)
    tokens, drawn_scores = _walk(key, scores_at, top, sums, block, vocab_size)
    log_normalizer = top[:, 0] + jnp.log(jnp.sum(sums, axis=-1))
    logq = jnp.where(tokens == NO_TOKEN, jnp.nan, drawn_scores - log_normalizer)
    return TokenDraw(*(a.reshape(batch_shape) for a in (tokens, logq, log_normalizer)))


def sample(key, logits, temperature=1.0, top_k: int | None = None, top_p: float | None = None,
           mask=None):
    """Sample one token per row; returns ``(tokens [B], logq [B])`` (`categorical`'s rules)."""
    if top_k is None and top_p is None:
        drawn = draw_tokens(key, logits, temperature, mask)
        return drawn.tokens, drawn.logq
    logq_all = filtered_logprobs(logits, temperature, top_k, top_p, mask)
    tokens = categorical(key, logq_all)
    logq = jnp.take_along_axis(logq_all, tokens[..., None], axis=-1)[..., 0]
    return tokens, jnp.where(tokens == NO_TOKEN, jnp.nan, logq)


def _first(hit):
    """Index of the first True in each row of ``hit [n, m]`` (``m`` where none is), as one
    integer min."""
    index = jax.lax.broadcasted_iota(jnp.int32, hit.shape, 1)
    return jnp.min(jnp.where(hit, index, hit.shape[1]), axis=-1)


@jax.jit
def argmax(values):
    """int32 [...]: the index of the first maximum of each row of ``values [..., V]``, the first
    NaN in a row that holds one, as `jnp.argmax` gives it.

    The row's block maxima (one read of it), the first block that holds the row's maximum, then
    the first index inside it: XLA:CPU ran `jnp.argmax`, a two-operand reduction, ~7x slower
    (64 rows of 262,144: 28 vs 4 ms), more than the rest of a greedy step's sampling. XLA:CPU's
    max need not propagate NaN, so the rows' sums are taken too: where one is NaN (a NaN in the
    row, or both infinities) the call falls back to `jnp.argmax`.
    """
    x, batch_shape = _as_rows("values", values)
    vocab_size = x.shape[-1]
    block = _block_size(vocab_size)
    maxima = _block_reduce(jnp.max, block, _identity, x)
    top = jnp.max(maxima, axis=-1, keepdims=True)
    no_nan = ~jnp.any(jnp.isnan(jnp.sum(_block_reduce(jnp.sum, block, _identity, x), -1)))
    chosen = jnp.minimum(_first(maxima == top), maxima.shape[1] - 1)
    # a partial last block repeats the row's last entry past its end: a first hit is never there
    positions = jnp.minimum(chosen[:, None] * block + jnp.arange(block, dtype=jnp.int32),
                            vocab_size - 1)
    inside = _first(jnp.take_along_axis(x, positions, axis=-1) == top)
    tokens = jnp.take_along_axis(positions, jnp.minimum(inside, block - 1)[:, None], axis=-1)
    tokens = jax.lax.cond(no_nan, lambda: tokens[:, 0],
                          lambda: jnp.argmax(x, axis=-1).astype(jnp.int32))
    return tokens.reshape(batch_shape)


def greedy(logits, mask=None):
    """Argmax token per row (first on ties); ``logq = 0`` (a point mass)."""
    logits = jnp.asarray(logits, jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    tokens = argmax(logits)
    return tokens, jnp.zeros(tokens.shape, jnp.float32)


def make_sampler(temperature=1.0, top_k: int | None = None, top_p: float | None = None):
    """A ``sampler(key, logits, mask=None) -> (tokens, logq)``; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return lambda key, logits, mask=None: greedy(logits, mask)
    return lambda key, logits, mask=None: sample(key, logits, temperature, top_k, top_p, mask)
