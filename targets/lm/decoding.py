"""The decoding layer every language-model algorithm is made of (docs/algorithms.md sections 5-6).

A `SequenceState` is a batch of rows, each a prompt and the tokens generated after it, with
everything the algorithms weigh them by: the model's cache and next-token distribution, the
log-probability of each generated token under the model (``token_logp``) and under the proposal
that produced it (``token_logq``), and a log-potential slot that twisted SMC fills. It is the
particle type of every LM algorithm: its leaves all have the row axis first, so the SMC engine
resamples it (cache included) with one gather, and the gather copies no prompt: the prompt's
cache lives apart, in `Prefilled`, which the algorithms build once and close over.

A row *ends* at its first EOS (any of the ids ``eos_ids``: a model may have several, e.g.
``<|im_end|>`` and ``<|endoftext|>``) or once it holds T = ``max_new_tokens`` tokens; an ended row
is frozen: it is fed at position ``max_len``, which writes nothing to its cache, and its token
slots hold the *fill* token, the first of ``eos_ids``. The few functions below are all the
algorithms need:

- `prefill`: run each prompt through the model once (`Prefilled`: its cache, stored once and
  shared by every row that continues it);
- `start`: rows continuing the prefilled prompts, each with a cache of its own tokens only;
- `append`: add one token to the live rows;
- `rollout`: append until the rows end or reach a length limit, teacher-forcing a given prefix
  (scored, not sampled) and sampling the rest from a proposal;
- `suffix_mh`: one Metropolis-Hastings step that regenerates a suffix from a uniform cut.

A proposal is a function ``proposal(state) -> log q [N, V]`` (normalised over the tokens it
allows, ``-inf`` elsewhere): algorithms keep only their own proposal and weight. Tokens are
drawn from it by `categorical`, an exact inverse-CDF walk with log2(V) uniforms per row (the
Gumbel-max trick would need V), so that sampling stays a small share of a decoding step.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from proposals import tokens as token_proposals
from smc.engine import split_keys
from smc.feynman_kac import group_rows
from smc.validation import check_count, static_int
from targets.lm import distinct
from targets.lm.protocol import LanguageModel, check_language_model

Array = jax.Array
Proposal = Callable[["SequenceState"], Array]
Sampler = Callable[[Array, Array], Array]


class SequenceState(NamedTuple):
    """N rows being decoded (leading axis N on every leaf); T = max_new_tokens."""

    cache: Any               # the per-row cache of generated tokens (None once dropped)
    logprobs: Array          # [N, V] float32 log p(. | prompt, tokens so far)
    tokens: Array            # [N, T] int32 generated tokens, the fill EOS past the length
    length: Array            # [N] int32 generated tokens, the EOS included
    prompt_length: Array     # [N] int32 real prompt tokens (token j sits at prompt_length + j)
    done: Array              # [N] bool: ended (EOS, or T tokens)
    ended_with_eos: Array    # [N] bool: ended by an EOS token
    token_logp: Array        # [N, T] float32 log p(y_j | y_<j), 0 past the length
    token_logq: Array        # [N, T] float32 log q(y_j | y_<j) of the proposal, 0 past the length
    log_potential: Array     # [N] float32 log-potential of the sequence (twisted SMC), else 0

    @property
    def logp(self) -> Array:
        """[N] log p(y_1:length | prompt) of the generated tokens."""
        return jnp.sum(self.token_logp, axis=-1)

    @property
    def body_length(self) -> Array:
        """[N] tokens before the EOS (what potentials see: they never see the EOS)."""
        return self.length - self.ended_with_eos.astype(jnp.int32)


# ----------------------------------------------------------------------------- checks
def resolve_eos(lm: LanguageModel, eos_ids: Any = None, forced_eos: bool = False
                ) -> tuple[int, ...]:
    """The static tuple of token ids that end a row: `eos_ids` if given, else the model's.

    `eos_ids` is an int or a sequence of ints, each in [0, vocab_size); duplicates are dropped
    (order kept). Every id ends a row; the first is the fill token written past a row's end and
    the token `forced_eos` forces. ``-1`` alone means that no token ends a row (every row runs
    ``max_new_tokens``); the result is then ``(-1,)``. ValueError naming ``eos_ids`` otherwise,
    or when it is None and the model has none, or ``-1`` with `forced_eos` (nothing to force).
    """
    if eos_ids is None:
        eos_ids = lm.eos_ids
        if len(eos_ids) == 0:
            raise ValueError("the model has no EOS token (its eos_ids is empty); pass eos_ids "
                             "(-1: no token ends a row)")
    if isinstance(eos_ids, (numbers.Integral, np.integer)) and not isinstance(eos_ids, bool):
        eos_ids = (eos_ids,)
    if isinstance(eos_ids, (str, bytes)) or not hasattr(eos_ids, "__iter__"):
        raise ValueError(f"eos_ids must be an int or a sequence of ints, got "
                         f"{type(eos_ids).__name__} {eos_ids!r}")
    ids = tuple(eos_ids)
    if not ids:
        raise ValueError("eos_ids is empty: name at least one token id (-1: no token ends a row)")
    ids = tuple(dict.fromkeys(check_count(f"eos_ids[{k}]", i, -1) for k, i in enumerate(ids)))
    if ids == (-1,):
        if forced_eos:
            raise ValueError("forced_eos needs an EOS token to force, but eos_ids=-1 says no "
                             "token ends a row")
        return ids
    outside = [i for i in ids if not 0 <= i < lm.vocab_size]
    if outside:
        raise ValueError(f"eos_ids must lie in [0, vocab_size = {lm.vocab_size}) (or be -1 alone: "
                         f"no token ends a row), got {outside} in {eos_ids!r}")
    return ids


def is_eos(tokens: Array, eos_ids: tuple[int, ...]) -> Array:
    """Bool of the shape of `tokens`: which of them end a row (any of the static `eos_ids`)."""
    return jnp.isin(tokens, np.asarray(eos_ids, np.int32))


def split_key(key: Array, num: int, groups: int | None = None) -> Array:
    """`jax.random.split(key, num)`; with `groups` = G, `key` holds G keys (one per group of rows)
    and the result is [num, G]: group g's keys are keys[g] split as its own run would split it."""
    if groups is None:
        return jax.random.split(key, num)
    return split_keys(key, num)


def per_group(draw: Callable[..., Any], key: Array, groups: int | None, *rows: Array) -> Any:
    """draw(key, *rows) (an array or a tree of arrays) for rows [N, ...]; with `groups` = G, `key`
    holds G keys and the rows are G consecutive groups, group g drawn with keys[g] as G separate
    calls would (vmap)."""
    if groups is None:
        return draw(key, *rows)
    drawn = jax.vmap(draw)(key, *group_rows(rows, groups))
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape((-1,) + leaf.shape[2:]), drawn)


def check_prompts(lm: LanguageModel, prompts: Any, prompt_lengths: Any, max_new_tokens: int
                  ) -> tuple[Array, Array]:
    """(prompts [B, P] int32, prompt_lengths [B] int32), checked before any work.

    Concrete prompts must hold token ids in [0, vocab_size) and lengths in [1, P]. Under `jit`
    (traced prompts) they cannot be checked here: `start` then gives a row whose prompt holds an
    id outside the vocabulary NaN log-probabilities, so that its weights and log p are NaN and
    the SMC engine counts and flags them (never a silent answer from clamped ids).
    """
    check_language_model(lm)
    static_int("max_new_tokens", max_new_tokens, 1)
    if not hasattr(prompts, "dtype"):
        prompts = np.asarray(prompts)
    if prompts.ndim != 2:
        raise ValueError(f"prompts must be a right-padded [B, P] token array, got shape "
                         f"{prompts.shape}")
    if not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise TypeError(f"prompt must hold integer token ids, got {prompts.dtype}")
    width = prompts.shape[1]
    if width == 0:
        raise ValueError("empty prompt: decoding needs at least one prompt token (e.g. BOS)")
    if width + max_new_tokens > lm.max_len:
        raise ValueError(f"prompt width {width} + max_new_tokens {max_new_tokens} exceeds the "
                         f"cache length max_len {lm.max_len}")
    if not isinstance(prompts, jax.core.Tracer):
        ids = np.asarray(prompts)
        bad = (ids < 0) | (ids >= lm.vocab_size)
        if bad.any():
            raise ValueError(f"prompt holds token ids outside the vocabulary [0, "
                             f"{lm.vocab_size}): {sorted(set(ids[bad].tolist()))[:5]}")
    if not isinstance(prompt_lengths, jax.core.Tracer):
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (prompts.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"prompt_length must be integers of shape ({prompts.shape[0]},), "
                             f"got {lengths.dtype}{list(lengths.shape)}")
        if lengths.size and not (1 <= lengths.min() and lengths.max() <= width):
            raise ValueError(f"prompt_length must lie in [1, {width}], got {prompt_lengths}")
    return jnp.asarray(prompts, jnp.int32), jnp.asarray(prompt_lengths, jnp.int32)


def check_prompt(lm: LanguageModel, prompt: Any, prompt_length: Any, max_new_tokens: int
                 ) -> tuple[Array, Array]:
    """One prompt [P] (vmap for several) and its real length (default P): `check_prompts`."""
    shape = getattr(prompt, "shape", np.shape(prompt))
    if len(shape) != 1:
        raise ValueError(f"prompt must be a 1-D token array [P] (vmap for several prompts), "
                         f"got shape {tuple(shape)}")
    if prompt_length is None:
        prompt_length = shape[0]
    if not isinstance(prompt_length, jax.core.Tracer) and np.shape(prompt_length) != ():
        raise ValueError(f"prompt_length must be a scalar, got {prompt_length}")
    prompt = prompt if hasattr(prompt, "dtype") else np.asarray(prompt, np.int32)
    prompts, lengths = check_prompts(lm, prompt[None], jnp.reshape(prompt_length, (1,)),
                                     max_new_tokens)
    return prompts[0], lengths[0]


def check_prompt_or_prompts(lm: LanguageModel, prompt: Any, prompt_length: Any,
                            max_new_tokens: int) -> tuple[Array, Array, int | None]:
    """(prompts [B, P], lengths [B], groups): one prompt [P] (`check_prompt`; groups None) or B
    prompts [B, P] with lengths [B], default P (`check_prompts`; groups B, one per prompt)."""
    if len(getattr(prompt, "shape", np.shape(prompt))) != 2:
        prompt, prompt_length = check_prompt(lm, prompt, prompt_length, max_new_tokens)
        return prompt[None], prompt_length[None], None
    if prompt_length is None:
        prompt_length = np.full((prompt.shape[0],), prompt.shape[1], np.int32)
    prompts, lengths = check_prompts(lm, prompt, prompt_length, max_new_tokens)
    return prompts, lengths, prompts.shape[0]


# ----------------------------------------------------------------------------- the state
class Prefilled(NamedTuple):
    """B prompts run through the model once: what every row that continues them shares."""

    prompt_cache: Any        # the model's prompt cache (leading axis B), stored once
    logprobs: Array          # [B, V] float32 next-token log-probabilities after each prompt
    lengths: Array           # [B] int32 real prompt tokens


def prefill(lm: LanguageModel, params: Any, prompts: Array, prompt_lengths: Array) -> Prefilled:
    """Run prompts [B, P] with lengths [B] through the model once. A prompt with a token id
    outside the vocabulary among its real tokens gets NaN log-probabilities (`check_prompts`)."""
    prompt_cache, logprobs = lm.prefill(params, prompts, prompt_lengths)
    real = jnp.arange(prompts.shape[1])[None, :] < prompt_lengths[:, None]
    outside = jnp.any(real & ((prompts < 0) | (prompts >= lm.vocab_size)), axis=1)
    logprobs = jnp.where(outside[:, None], jnp.nan, logprobs.astype(jnp.float32))
    return Prefilled(prompt_cache, logprobs, jnp.asarray(prompt_lengths, jnp.int32))


def start(lm: LanguageModel, prefilled: Prefilled, *, max_new_tokens: int,
          eos_ids: tuple[int, ...], copies: int = 1) -> SequenceState:
    """Rows continuing the prefilled prompts, `copies` consecutive rows per prompt (N = B copies;
    row r continues prompt r // copies), nothing generated yet. Each row's cache holds only
    its own tokens: the prompt's stays in `prefilled`, shared."""
    rows = prefilled.lengths.shape[0] * copies
    logprobs, lengths = jax.tree_util.tree_map(
        lambda x: jnp.repeat(x, copies, axis=0, total_repeat_length=rows),
        (prefilled.logprobs, prefilled.lengths))
    zeros = jnp.zeros((rows, max_new_tokens), jnp.float32)
    return SequenceState(
        cache=lm.init_cache(rows, max_new_tokens), logprobs=logprobs,
        tokens=jnp.full((rows, max_new_tokens), eos_ids[0], jnp.int32),
        length=jnp.zeros((rows,), jnp.int32), prompt_length=lengths,
        done=jnp.zeros((rows,), bool), ended_with_eos=jnp.zeros((rows,), bool),
        token_logp=zeros, token_logq=zeros, log_potential=jnp.zeros((rows,), jnp.float32))


def token_logprob(state: SequenceState, tokens: Array) -> Array:
    """[N] log p(tokens | each row's prefix)."""
    return jnp.take_along_axis(state.logprobs, tokens[:, None], axis=-1)[:, 0]


def append(lm: LanguageModel, params: Any, prefilled: Prefilled, state: SequenceState,
           tokens: Array, logq: Array, eos_ids: tuple[int, ...], live: Array | None = None,
           distinct_rows: bool = False) -> SequenceState:
    """Append tokens [N] (with their proposal log q [N]) to the live rows (default: those not
    done); the other rows are frozen: nothing is written to their cache, tokens or scores. A live
    row whose token is any of `eos_ids` ends with it. With `distinct_rows`, the model runs on
    one row per distinct live sequence of each prompt that has not just ended
    (`targets.lm.distinct`); the results are the same except the log-probabilities of a row
    that ended, which are meaningless either way (here: the row's previous ones)."""
    n, max_new = state.tokens.shape
    live = ~state.done if live is None else live
    tokens = jnp.where(live, tokens, eos_ids[0]).astype(jnp.int32)
    position = jnp.where(live, state.prompt_length + state.length, lm.max_len)
    rows = jnp.arange(n)
    slot = jnp.where(live, state.length, max_new)      # out of range: dropped for frozen rows
    length = state.length + live.astype(jnp.int32)
    ends_with_eos = live & is_eos(tokens, eos_ids)

    def write(buffer: Array, values: Array) -> Array:
        return buffer.at[rows, slot].set(values.astype(buffer.dtype), mode="drop")

    sequences = write(state.tokens, tokens)
    done = state.done | ends_with_eos | (live & (length >= max_new))
    if distinct_rows:
        # a row that ends here needs no next distribution: it keeps its last one, and its cache
        # misses only the ending token, which nothing reads (ended rows are frozen)
        evaluate = live & ~done
        groups = prefilled.lengths.shape[0]
        rep = distinct.representatives(sequences, length, evaluate, groups)
        cache, next_logprobs = distinct.decode(lm, params, prefilled.prompt_cache, state.cache,
                                               tokens, position, rep, evaluate, groups)
    else:
        evaluate = live
        cache, next_logprobs = lm.decode(params, prefilled.prompt_cache, state.cache, tokens,
                                         position)
    return SequenceState(
        cache=cache,
        logprobs=jnp.where(evaluate[:, None], next_logprobs.astype(jnp.float32),
                           state.logprobs),
        tokens=sequences, length=length, prompt_length=state.prompt_length,
        done=done,
        ended_with_eos=state.ended_with_eos | ends_with_eos,
        token_logp=write(state.token_logp, token_logprob(state, tokens)),
        token_logq=write(state.token_logq, logq), log_potential=state.log_potential)


def draw_token(key: Array, state: SequenceState, logq_all: Array, eos_ids: tuple[int, ...],
               forced_eos: bool = False, groups: int | None = None
               ) -> tuple[Array, Array, Array]:
    """(tokens [N], log q [N], forced [N]): one draw per row from log q [N, V].

    With `groups` = G, `key` holds G keys and the rows G consecutive groups, group g drawn with
    keys[g] (as G separate calls would). With `forced_eos`, a row about to take its T-th token
    gets the first of `eos_ids` from a point mass (log q = 0, `forced` True), so that every
    sequence ends with an EOS.
    """
    tokens = per_group(categorical, key, groups, logq_all).astype(jnp.int32)
    logq = jnp.take_along_axis(logq_all, tokens[:, None], axis=-1)[:, 0]
    if not forced_eos:
        return tokens, logq, jnp.zeros(tokens.shape, bool)
    return force_eos(state, tokens, logq, eos_ids)


def force_eos(state: SequenceState, tokens: Array, logq: Array, eos_ids: tuple[int, ...]
              ) -> tuple[Array, Array, Array]:
    """(tokens, log q, forced): rows about to take their T-th token get the first of `eos_ids`
    from a point mass (log q = 0, `forced` True) in place of the drawn token."""
    forced = state.length == state.tokens.shape[1] - 1
    return (jnp.where(forced, eos_ids[0], tokens), jnp.where(forced, 0.0, logq), forced)


def categorical(key: Array, logq_all: Array) -> Array:
    """[N] int32: one token per row from softmax(log q [N, V]) (`proposals.tokens.categorical`:
    log2(V) uniforms per row, where `jax.random.categorical` needs V of them).

    A row with nothing to draw (every entry -inf, or a NaN or +inf) gets the id that
    `jax.random.categorical` gave it, its argmax: the first NaN, else the first +inf, else 0.
    That id is valid for the model, and its log q is the row's NaN, +inf or -inf, so the weight
    formulas see the same broken row as before (weight -inf or NaN), never a finite log q.
    """
    tokens = token_proposals.categorical(key, logq_all)
    # the argmax of such a row as one integer min (jnp.argmax, a two-operand reduction, costs
    # XLA:CPU three times the draw itself): NaN ranks first, +inf next, then index 0
    vocab_size = logq_all.shape[-1]
    index = jax.lax.broadcasted_iota(jnp.int32, logq_all.shape, logq_all.ndim - 1)
    rank = jnp.where(jnp.isnan(logq_all), index,
                     jnp.where(logq_all == jnp.inf, vocab_size + index, 2 * vocab_size))
    first = jnp.min(rank, axis=-1)
    argmax = jnp.where(first < 2 * vocab_size, first % vocab_size, 0)
    return jnp.where(tokens == token_proposals.NO_TOKEN, argmax, tokens)


def rollout(key: Array, lm: LanguageModel, params: Any, prefilled: Prefilled,
            state: SequenceState, proposal: Proposal, eos_ids: tuple[int, ...], *, limit: Any = None,
            teacher: Array | None = None, cut: Array | None = None,
            sample: Sampler = categorical, groups: int | None = None,
            distinct_rows: bool = False) -> SequenceState:
    """Append tokens until every row has ended or holds `limit` tokens (default T; may be traced).

    Token j of a row is ``teacher[row, j]`` while j < ``cut[row]`` (teacher forcing: scored
    under the model and the proposal, not sampled), else ``sample(key, proposal(state))``.
    One `lax.while_loop` that stops as soon as no row is live. With `groups` = G, `key` holds G
    keys and the rows G consecutive groups, group g sampled with keys[g] (as G separate calls
    would: a row that has ended is frozen, so the loop running on for other groups changes
    nothing in it). `distinct_rows`: see `append`.
    """
    n, max_new = state.tokens.shape
    limit = max_new if limit is None else limit
    rows = jnp.arange(n)

    def live(s: SequenceState) -> Array:
        return ~s.done & (s.length < limit)

    def cond(carry):
        i, s = carry
        return (i < max_new) & jnp.any(live(s))

    def body(carry):
        i, s = carry
        logq_all = proposal(s)
        tokens = per_group(lambda k, x: sample(jax.random.fold_in(k, i), x), key, groups,
                           logq_all).astype(jnp.int32)
        if teacher is not None:
            forced = teacher[rows, jnp.minimum(s.length, max_new - 1)]
            tokens = jnp.where(s.length < cut, forced, tokens)
        logq = jnp.take_along_axis(logq_all, tokens[:, None], axis=-1)[:, 0]
        return i + 1, append(lm, params, prefilled, s, tokens, logq, eos_ids, live=live(s),
                             distinct_rows=distinct_rows)

    _, state = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), state))
    return state


def suffix_mh(key: Array, state: SequenceState,
              regenerate: Callable[[Array, Array, Array], SequenceState],
              log_target: Callable[[SequenceState], Array], groups: int | None = None
              ) -> tuple[SequenceState, Array]:
    """One MH step per row: cut i uniform in {0, ..., |y| - 1}, keep y_1:i, regenerate the rest
    with ``regenerate(key, tokens, cut)``, accept with

        log r = log_target(y') - log_target(y) + log q(y_i+1: | y_1:i) - log q(y'_i+1: | y_1:i)
                + log |y| - log |y'|

    (the last term corrects for the cut's probability 1/|y|). Returns (state, accepted [N]).
    Rows of length 0 never move. With `groups` = G, `key` holds G keys and the rows G
    consecutive groups: group g's cuts, regeneration (``regenerate`` gets the G keys and must
    use them per group, e.g. `rollout` with `groups`) and accepts use keys[g] as G separate
    calls would.
    """
    length = state.length
    key_cut, key_regenerate, key_accept = split_key(key, 3, groups)

    def uniform(key: Array) -> Array:
        return per_group(lambda k, rows: jax.random.uniform(k, rows.shape), key, groups, length)

    u = uniform(key_cut)
    cut = jnp.clip((u * length).astype(jnp.int32), 0, jnp.maximum(length - 1, 0))
    proposal = regenerate(key_regenerate, state.tokens, cut)
    if state.cache is None:     # rows kept without their cache (results, MH chains)
        proposal = without_cache(proposal)
    suffix = jnp.arange(state.tokens.shape[1])[None, :] >= cut[:, None]

    def suffix_logq(s: SequenceState) -> Array:
        return jnp.sum(jnp.where(suffix, s.token_logq, 0.0), axis=-1)

    def log_length(n: Array) -> Array:
        return jnp.log(jnp.maximum(n, 1).astype(jnp.float32))

    log_r = (log_target(proposal) - log_target(state) + suffix_logq(state) - suffix_logq(proposal)
             + log_length(length) - log_length(proposal.length))
    accept = (length > 0) & (jnp.log(uniform(key_accept)) < log_r)
    moved = jax.tree_util.tree_map(
        lambda new, old: jnp.where(accept.reshape(accept.shape + (1,) * (new.ndim - 1)), new, old),
        proposal, state)
    return moved, accept


# ----------------------------------------------------------------------------- results
def without_cache(state: SequenceState) -> SequenceState:
    """The state with its cache dropped: what results keep (the cache is N x max_new_tokens x layers)."""
    return state._replace(cache=None)


def draw(key: Array, result: Any) -> tuple[Array, Array]:
    """One sequence of a weighted result (`smc.SMCResult` of SequenceState particles) drawn by
    weight: (tokens [T], length), a sample of the target as N grows."""
    index = jax.random.categorical(key, result.log_weights)
    return result.particles.tokens[index], result.particles.length[index]
