"""Potentials built from other potentials or from a reward (docs/algorithms.md section 6)."""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax.numpy as jnp

from smc.validation import static_finite
from targets.lm.potentials.base import Array, Potential


def product(*potentials: Potential) -> Potential:
    """psi = prod psi_k, phi = prod phi_k (sum of the log-potentials)."""
    if not potentials:
        raise ValueError("product needs at least one potential")
    masked = [p.allowed for p in potentials if p.allowed is not None]
    checked = [p.accepts for p in potentials if p.accepts is not None]

    def allowed(tok, n, vocab_size, final):   # -inf in any factor makes the product -inf
        return functools.reduce(jnp.logical_and, [a(tok, n, vocab_size, final) for a in masked])

    def accepts(tok, n, candidate, final):
        return functools.reduce(jnp.logical_and, [c(tok, n, candidate, final) for c in checked])

    return Potential(
        prefix=lambda tok, n: sum(p.prefix(tok, n) for p in potentials),
        complete=lambda tok, n: sum(p.complete(tok, n) for p in potentials),
        allowed=allowed if masked else None,
        accepts=accepts if checked else None)


def terminal(reward: Callable[[Array, Array], Array], lam: float = 1.0) -> Potential:
    """Terminal-only reward: prefix = 0, complete = lam * reward(tokens, length)."""
    lam = static_finite("lambda", lam)
    return Potential(prefix=lambda tok, n: jnp.zeros((), jnp.float32),
                     complete=lambda tok, n: lam * jnp.asarray(reward(tok, n), jnp.float32))
