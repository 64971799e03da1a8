"""The MH power sampler of Karan and Du (2025): the baseline Power-SMC is compared against.

Target: the power distribution p(y | x)^alpha over the support S_T of `targets.lm.power` (sequences
ending with EOS within T tokens, or cut at T tokens with p(y) their prefix probability).

Algorithm (``num_chains`` independent chains, vectorised): the sequence grows in blocks of
``block_size`` tokens. Stage k has the length limit L_k = min(k B, T) and the intermediate target
p(y)^alpha over S_{L_k}. A stage first extends every unfinished sequence to L_k tokens (or its EOS)
with the proposal q(v | prefix) = p(v | prefix)^alpha / C (temperature 1/alpha), then runs
``mh_steps`` Metropolis-Hastings steps, each:

    pick a cut i uniformly in {0, ..., |y| - 1};  keep y_1:i;  regenerate y'_{i+1:} from q until EOS
    or L_k tokens;  accept with probability min(1, r),
    log r = alpha (log p(y'_{i+1:} | y_1:i) - log p(y_{i+1:} | y_1:i))
            + log q(y_{i+1:} | y_1:i) - log q(y'_{i+1:} | y_1:i) + log |y| - log |y'|

The last term is the index-choice correction: the forward move picks the cut with probability
1/|y|, the reverse move (from y', the same cut) with 1/|y'|, and the lengths differ whenever the
regenerated suffixes do. Both suffixes are in S_{L_k}, so each step leaves p^alpha on S_{L_k}
invariant; the final stage (L = T) therefore targets p^alpha exactly, and the chains converge to it
as the number of steps grows (intermediate stages only provide a good start).

The chains are `decoding.SequenceState` rows and each step is `decoding.suffix_mh` with the log
target alpha log p(y) and the proposal q (the model terms of the ratio above).

Cost: every regeneration is a pass of decode steps that teacher-forces the kept prefix (from the
prompt's cache) and samples the rest (`decoding.rollout`); a cache-reusing implementation would
skip the forced part, so latency measured with this code over-states the MH sampler's cost by at
most that prefix (report it as such).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from proposals.tokens import log_softmax
from smc.validation import static_int, static_positive
from targets.lm import decoding
from targets.lm.decoding import SequenceState

Array = jax.Array


class MHResult(NamedTuple):
    particles: SequenceState   # the chains' final sequences (one sample per chain; no cache)
    acceptance: Array          # [num_blocks] mean acceptance rate of the MH steps of each stage


class MHPowerComponents(NamedTuple):
    """The MH power sampler for one prompt, and its parts (see `mh_power_components`)."""

    from_tokens: Any   # (tokens [C, T], length [C], limit) -> SequenceState (scores the tokens)
    extend: Any        # (key, state, limit) -> state: grow unfinished rows to `limit`
    moves: Any         # (key, state, limit, num_steps) -> (state, acceptance rate)
    run: Any           # (key, num_chains) -> MHResult: the whole block-wise sampler


def mh_power_components(lm, params, prompt, *, alpha: float, max_new_tokens: int,
                        block_size: int, mh_steps: int, prompt_length=None,
                        eos_ids: int | Sequence[int] | None = None) -> MHPowerComponents:
    """Build the MH power sampler for one prompt; checks every argument before generating.

    ``eos_ids``: the tokens that end a sequence, any of them (default the model's; see
    `decoding.resolve_eos`).
    """
    alpha = static_positive("alpha", alpha)
    T = static_int("max_new_tokens", max_new_tokens, 1)
    B = static_int("block_size", block_size, 1)
    K = static_int("mh_steps", mh_steps, 0)
    prompt, prompt_length = decoding.check_prompt(lm, prompt, prompt_length, T)
    eos = decoding.resolve_eos(lm, eos_ids)
    # the prompt runs once, here; every regeneration continues its shared cache
    prefilled = decoding.prefill(lm, params, prompt[None], prompt_length[None])

    def proposal(s: SequenceState) -> Array:          # q = p^alpha / C: temperature 1 / alpha
        return log_softmax(alpha * s.logprobs)

    def log_target(s: SequenceState) -> Array:
        return alpha * s.logp

    def regenerate(key, tokens, keep, limit) -> SequenceState:
        """Teacher-force tokens[:, :keep], then sample from q until EOS or `limit` tokens.

        Chains keep no cache: every regeneration starts again from the prompt's (shared)."""
        start = decoding.start(lm, prefilled, max_new_tokens=T, eos_ids=eos,
                               copies=tokens.shape[0])
        return decoding.without_cache(decoding.rollout(
            key, lm, params, prefilled, start, proposal, eos, limit=limit, teacher=tokens,
            cut=keep))

    def from_tokens(tokens, length, limit: int = T) -> SequenceState:
        """Score given sequences of S_limit (teacher forcing; nothing is sampled)."""
        return regenerate(jax.random.PRNGKey(0), jnp.asarray(tokens, jnp.int32),
                          jnp.asarray(length, jnp.int32), limit)

    def extend(key, state: SequenceState, limit: int) -> SequenceState:
        return regenerate(key, state.tokens, state.length, limit)

    def moves(key, state: SequenceState, limit: int, num_steps: int):
        if num_steps == 0:
            return state, jnp.asarray(jnp.nan, jnp.float32)

        def body(state, key):
            state, accept = decoding.suffix_mh(
                key, state, lambda k, tokens, cut: regenerate(k, tokens, cut, limit), log_target)
            return state, jnp.mean(accept.astype(jnp.float32))
        state, rates = jax.lax.scan(body, state, jax.random.split(key, num_steps))
        return state, rates.mean()

    def run(key, num_chains: int) -> MHResult:
        C = static_int("num_chains", num_chains, 1)
        state = decoding.without_cache(decoding.start(lm, prefilled, max_new_tokens=T,
                                                      eos_ids=eos, copies=C))
        rates = []
        for limit in range(B, T + B, B):
            key, key_extend, key_moves = jax.random.split(key, 3)
            state = extend(key_extend, state, min(limit, T))
            state, rate = moves(key_moves, state, min(limit, T), K)
            rates.append(rate)
        return MHResult(state, jnp.stack(rates))

    return MHPowerComponents(from_tokens=from_tokens, extend=extend, moves=moves, run=run)


def mh_power(key, lm, params, prompt, *, alpha: float, num_chains: int, max_new_tokens: int,
             block_size: int, mh_steps: int, prompt_length=None,
             eos_ids: int | Sequence[int] | None = None) -> MHResult:
    """Run the block-wise MH power sampler; ``num_chains`` independent samples (one per chain)."""
    components = mh_power_components(lm, params, prompt, alpha=alpha,
                                     max_new_tokens=max_new_tokens, block_size=block_size,
                                     mh_steps=mh_steps, prompt_length=prompt_length,
                                     eos_ids=eos_ids)
    return components.run(key, num_chains)
