"""Token proposals: pure samplers over a batch of logits ``[B, V]``.

Every sampler returns ``(tokens [B], logq [B])`` where ``logq`` is the log-probability of the
sampled token under the distribution actually sampled from: temperature-scaled, masked, top-k and
top-p filtered, then renormalised. Importance weights that use ``logq`` therefore stay exact when
filters are on (the filters change the *proposal*, not the target, as long as the weight uses this
``logq`` and the target's support is inside the filtered support).

Filter order: mask -> temperature -> top-k -> top-p (the nucleus is computed on the renormalised
top-k distribution). Ties at the top-k / top-p boundary are broken by token id (stable sort).
``temperature == 0`` means greedy (``logq = 0``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


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
    logp = jax.nn.log_softmax(logits, axis=-1)
    if top_p is not None:
        p = jnp.asarray(top_p, jnp.float32)
        p = p[..., None] if p.ndim == 1 else p
        order = jnp.argsort(-logp, axis=-1, stable=True)
        sorted_lp = jnp.take_along_axis(logp, order, axis=-1)
        cum_before = jnp.cumsum(jnp.exp(sorted_lp), axis=-1) - jnp.exp(sorted_lp)
        keep_sorted = cum_before < p  # smallest prefix whose mass reaches top_p
        keep_sorted = keep_sorted.at[..., 0].set(True)
        keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logp = jax.nn.log_softmax(jnp.where(keep, logp, NEG_INF), axis=-1)
    return logp


def sample(key, logits, temperature=1.0, top_k: int | None = None, top_p: float | None = None,
           mask=None):
    """Sample one token per row; returns ``(tokens [B], logq [B])``."""
    logq_all = filtered_logprobs(logits, temperature, top_k, top_p, mask)
    tokens = jax.random.categorical(key, logq_all, axis=-1)
    logq = jnp.take_along_axis(logq_all, tokens[..., None], axis=-1)[..., 0]
    return tokens, logq


def greedy(logits, mask=None):
    """Argmax token per row (first on ties); ``logq = 0`` (a point mass)."""
    logits = jnp.asarray(logits, jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    tokens = jnp.argmax(logits, axis=-1)
    return tokens, jnp.zeros(tokens.shape, jnp.float32)


def make_sampler(temperature=1.0, top_k: int | None = None, top_p: float | None = None):
    """A ``sampler(key, logits, mask=None) -> (tokens, logq)``; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return lambda key, logits, mask=None: greedy(logits, mask)
    return lambda key, logits, mask=None: sample(key, logits, temperature, top_k, top_p, mask)
