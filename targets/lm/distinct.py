"""Decode only the distinct live rows (docs/algorithms.md section 5, "Distinct rows").

After resampling many particles are copies of one sequence, and copies have the same next-token
distribution and the same cache; rows that have ended, or end with the token being appended,
need no distribution at all. `decode` runs the model on one row per distinct live sequence and
hands each row its representative's cache and log-probabilities, which is exact: a row's cache
and distribution are functions of its sequence alone.

Shapes stay static (one compilation): the number of distinct rows K varies, so the model runs
on the smallest of a few fixed batch sizes that holds every prompt's K (`bucket_sizes`: the
copies per prompt C, C/2, C/4, C/8, rounded up, or no call when no row needs one), chosen by
`lax.switch`. Each size is its own compiled decode. Under `jax.vmap` (over seeds or prompts)
the switch becomes a select that runs every branch: give several prompts as groups instead (the
algorithms' [B, P] prompts).

Copies are found by sorting each prompt's rows on two 32-bit hashes of their tokens and
comparing neighbours exactly: a hash collision can only leave two copies apart (less saving),
never merge two different sequences.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from targets.lm.protocol import LanguageModel

Array = jax.Array

FRACTIONS = (1, 2, 4, 8)


def bucket_sizes(copies: int) -> tuple[int, ...]:
    """The batch sizes per prompt the model may run on, ascending: 0 (no row to run) and
    ceil(copies / f)."""
    return (0,) + tuple(sorted({-(-copies // f) for f in FRACTIONS}))


def hash_weights(length: int) -> tuple[np.ndarray, np.ndarray]:
    """Two fixed vectors of odd uint32 multipliers, one per token slot."""
    rng = np.random.default_rng(0x5EED)
    draw = lambda: (rng.integers(0, 2 ** 31, length, dtype=np.uint32) * 2 + 1).astype(np.uint32)
    return draw(), draw()


def representatives(sequences: Array, length: Array, live: Array, groups: int) -> Array:
    """[N] int32: each live row's representative, the first row of its prompt's group holding
    the same tokens and length; a row that is not live represents itself.

    sequences [N, T] int32 (equal past each row's length, e.g. the fill token), length [N],
    live [N] bool; the N rows are `groups` consecutive groups, one per prompt.
    """
    n, width = sequences.shape
    copies = n // groups
    w1, w2 = hash_weights(width)

    def one_group(seq, lengths, alive):
        as_u32 = seq.astype(jnp.uint32)
        h1 = jnp.sum(as_u32 * w1, axis=-1, dtype=jnp.uint32)
        h2 = jnp.sum(as_u32 * w2, axis=-1, dtype=jnp.uint32)
        order = jnp.lexsort((h2, h1, lengths, ~alive))      # last key sorts first
        s_seq, s_len, s_alive = seq[order], lengths[order], alive[order]
        same = (s_alive[1:] & s_alive[:-1] & (s_len[1:] == s_len[:-1])
                & jnp.all(s_seq[1:] == s_seq[:-1], axis=-1))
        same = jnp.concatenate([jnp.zeros((1,), bool), same])
        index = jnp.arange(copies)
        run_start = jax.lax.cummax(jnp.where(same, 0, index))
        # the run's first row in sorted order; lexsort is stable, so it is the lowest index
        rep = jnp.zeros((copies,), jnp.int32).at[order].set(order[run_start].astype(jnp.int32))
        return rep

    rep = jax.vmap(one_group)(sequences.reshape(groups, copies, width),
                              length.reshape(groups, copies), live.reshape(groups, copies))
    return (rep + (jnp.arange(groups) * copies)[:, None]).reshape(n)


def decode(lm: LanguageModel, params: Any, prompt_cache: Any, cache: Any, tokens: Array,
           positions: Array, rep: Array, live: Array, groups: int) -> tuple[Any, Array]:
    """``lm.decode`` for rows [N] (`groups` consecutive groups of rows, one per prompt), run on
    the distinct live rows only: row i gets the cache and log-probabilities of ``rep[i]``
    (`representatives`). Rows that are not live keep their cache; their log-probabilities are
    to be ignored, as `lm.decode`'s are for frozen rows."""
    n = tokens.shape[0]
    copies = n // groups
    group = jnp.arange(n) // copies
    unique = live & (rep == jnp.arange(n))
    rank = (jnp.cumsum(unique.reshape(groups, copies), axis=1) - 1).reshape(n)
    count = jnp.sum(unique.reshape(groups, copies), axis=1)
    slot = rank[rep]                                        # the row's place in its group's batch
    sizes = bucket_sizes(copies)

    def run(size: int):
        def branch(operands):
            cache, tokens, positions = operands
            if size == 0:
                return cache, jnp.zeros((n, lm.vocab_size), jnp.float32)
            if size == copies:
                return lm.decode(params, prompt_cache, cache, tokens, positions)
            # the group's distinct rows first; the rest of the batch re-runs its first row
            # frozen (position max_len writes nothing), its output unused
            table = jnp.broadcast_to((jnp.arange(groups) * copies)[:, None], (groups, size))
            table = table.at[group, jnp.where(unique, rank, size)].set(
                jnp.arange(n, dtype=table.dtype), mode="drop").reshape(-1)
            valid = (jnp.arange(size)[None, :] < count[:, None]).reshape(-1)
            picked = jax.tree_util.tree_map(lambda leaf: leaf[table], cache)
            picked, logprobs = lm.decode(params, prompt_cache, picked, tokens[table],
                                         jnp.where(valid, positions[table], lm.max_len))
            source = group * size + jnp.where(live, slot, 0)

            def scatter_back(new: Array, old: Array) -> Array:
                keep = live.reshape((n,) + (1,) * (old.ndim - 1))
                return jnp.where(keep, new[source], old)

            return jax.tree_util.tree_map(scatter_back, picked, cache), logprobs[source]
        return branch

    index = jnp.searchsorted(jnp.asarray(sizes), jnp.max(count))
    return jax.lax.switch(index, [run(s) for s in sizes], (cache, tokens, positions))
