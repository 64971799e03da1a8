"""Batched autoregressive generation: plain sampling, the baseline every LM algorithm is
compared with (docs/algorithms.md section 7).

One `decoding.rollout`: each row stops at its first EOS or after ``max_new_tokens`` tokens, and the
loop stops as soon as every row has stopped. Works with any `targets.lm.protocol.LanguageModel`.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from proposals.tokens import argmax, filtered_logprobs
from smc.validation import static_finite, static_int
from targets.lm import decoding
from targets.lm.decoding import SequenceState


def generate(key, lm, params, prompts, prompt_lengths, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_ids: int | Sequence[int] | None = None, num_samples: int = 1) -> SequenceState:
    """Sample ``num_samples`` continuations of each right-padded prompt ``[B, P]`` with lengths
    ``[B]``: rows ``[B * num_samples]``, prompt b's at b * num_samples onwards, each prompt run
    through the model once and its cache shared by its rows.

    Tokens come from the model at ``temperature`` (0: greedy, a point mass with log q = 0),
    optionally top-k / top-p filtered (`proposals.tokens.filtered_logprobs`). Returns the rows as
    a `decoding.SequenceState` without its cache: ``tokens [B, T]`` (EOS past a row's end),
    ``length`` (the EOS included), ``ended_with_eos``, ``logp`` (model log-probability of the
    generated tokens) and ``token_logq`` (the proposal's). ``eos_ids``: the tokens that end a row
    (default the model's; `decoding.resolve_eos`); ``eos_ids=-1`` matches no token: every row runs
    ``max_new_tokens`` (e.g. for benchmarks).
    """
    T = static_int("max_new_tokens", max_new_tokens, 1)
    num_samples = static_int("num_samples", num_samples, 1)
    temperature = static_finite("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    prompts, prompt_lengths = decoding.check_prompts(lm, prompts, prompt_lengths, T)
    eos = decoding.resolve_eos(lm, eos_ids)
    prefilled = decoding.prefill(lm, params, prompts, prompt_lengths)
    state = decoding.start(lm, prefilled, max_new_tokens=T, eos_ids=eos, copies=num_samples)
    if temperature == 0.0:
        # the argmax of log p; its proposal is a point mass, so log q = 0 (set once at the end
        # rather than building a one-hot [N, V] table at every step)
        state = decoding.rollout(key, lm, params, prefilled, state, lambda s: s.logprobs, eos,
                                 sample=lambda key, logp: argmax(logp))
        state = state._replace(token_logq=jnp.zeros_like(state.token_logq))
    else:
        state = decoding.rollout(
            key, lm, params, prefilled, state,
            lambda s: filtered_logprobs(s.logprobs, temperature, top_k, top_p), eos)
    return decoding.without_cache(state)


def make_generate(lm, *, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, eos_ids: int | Sequence[int] | None = None):
    """``jit``-compiled ``fn(key, params, prompts, prompt_lengths) -> SequenceState``."""
    return jax.jit(lambda key, params, prompts, lengths: generate(
        key, lm, params, prompts, lengths, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, eos_ids=eos_ids))
