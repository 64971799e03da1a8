"""Batched autoregressive generation in one ``lax.while_loop``.

Works with any model with the language-model interface (``prefill`` / ``decode``, see
:mod:`targets.lm.llama`), including the enumerable toy models. Each row stops at its first EOS or
after ``max_new_tokens`` tokens; the loop stops when every row has stopped. Finished rows are fed
at position ``max_len`` which writes nothing to their cache.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from proposals.tokens import make_sampler


def generate(model, params, key, prompt_tokens, prompt_lengths, *, max_new_tokens: int,
             sampler: Callable | None = None, eos_id: int | None = None):
    """Sample continuations of right-padded prompts ``[B, P]`` with lengths ``[B]``.

    ``sampler(key, logprobs [B, V]) -> (tokens [B], logq [B])`` (default: ancestral, temperature 1).
    Returns a dict: ``tokens [B, max_new_tokens]`` (EOS-padded after a row stops), ``length [B]``
    (generated tokens, the EOS included), ``finished [B]`` (ended with EOS), ``logp [B]`` (model
    log-probability of the generated tokens) and ``logq [B]`` (proposal log-probability).
    ``eos_id=-1`` matches no token: every row runs ``max_new_tokens`` (e.g. for benchmarks).
    """
    sampler = sampler or make_sampler(1.0)
    eos = model.eos_id if eos_id is None else eos_id
    B = prompt_tokens.shape[0]
    if prompt_tokens.shape[1] + max_new_tokens > model.max_len:
        raise ValueError(f"prompt width {prompt_tokens.shape[1]} + max_new_tokens "
                         f"{max_new_tokens} exceeds the model's max_len {model.max_len}")
    cache, logprobs = model.prefill(params, prompt_tokens, prompt_lengths)
    state = {
        "step": jnp.zeros((), jnp.int32), "key": key, "cache": cache, "logprobs": logprobs,
        "tokens": jnp.full((B, max_new_tokens), eos, jnp.int32),
        "done": jnp.zeros((B,), bool), "finished": jnp.zeros((B,), bool),
        "length": jnp.zeros((B,), jnp.int32),
        "logp": jnp.zeros((B,), jnp.float32), "logq": jnp.zeros((B,), jnp.float32)}

    def cond(s):
        return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

    def body(s):
        key, sub = jax.random.split(s["key"])
        tok, lq = sampler(sub, s["logprobs"])
        live = ~s["done"]
        tok = jnp.where(live, tok, eos).astype(jnp.int32)
        lp = jnp.take_along_axis(s["logprobs"], tok[:, None], axis=-1)[:, 0]
        is_eos = live & (tok == eos)
        pos = jnp.where(live, prompt_lengths + s["step"], model.max_len)
        cache, logprobs = model.decode(params, s["cache"], tok, pos)
        return {
            "step": s["step"] + 1, "key": key, "cache": cache, "logprobs": logprobs,
            "tokens": s["tokens"].at[:, s["step"]].set(tok),
            "done": s["done"] | is_eos | (s["step"] + 1 >= max_new_tokens),
            "finished": s["finished"] | is_eos,
            "length": s["length"] + live.astype(jnp.int32),
            "logp": s["logp"] + jnp.where(live, lp, 0.0),
            "logq": s["logq"] + jnp.where(live, lq, 0.0)}

    s = jax.lax.while_loop(cond, body, state)
    return {k: s[k] for k in ("tokens", "length", "finished", "logp", "logq")}


def make_generate(model, *, max_new_tokens: int, sampler: Callable | None = None,
                  eos_id: int | None = None):
    """``jit``-compiled ``fn(params, key, prompt_tokens, prompt_lengths) -> dict``."""
    return jax.jit(functools.partial(generate, model, max_new_tokens=max_new_tokens,
                                     sampler=sampler, eos_id=eos_id))
