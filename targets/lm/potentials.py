"""Potentials for reward-twisted SMC over token sequences (reference.md section 6).

The contract follows genlm-control's: a potential scores a generated sequence in two ways,

    prefix(tokens, length)   -> log psi(y_1:length)   for an unfinished prefix,
    complete(tokens, length) -> log phi(y_1:length)   for a finished sequence,

where ``tokens`` is one row ``[T]`` of generated token ids (int32, EOS-padded past the sequence;
only ``tokens[:length]`` may matter) and ``length`` an int32 scalar: the number of tokens *before*
the EOS (the EOS itself is never passed; a sequence cut at T has ``length = T``). Both return a
float scalar (``-inf`` = forbidden). They are pure JAX and written for one sequence; the SMC code
``vmap``s them over particles. The log-weight of the next token x after the context ctx is
``prefix(ctx + x) - prefix(ctx)``, and at the end ``complete(y) - prefix(y_<last)``.

For the twisted SMC to be exact a prefix potential must be positive wherever some completion has a
positive complete potential (``prefix = -inf`` only when every extension is forbidden); a hard
constraint therefore gives ``-inf`` as soon as a prefix can no longer be completed into the
language. Text-level rewards (VADER sentiment, regular expressions on characters) need the tokenizer
and host code; they are not here: a regular language over *token ids* is (``dfa_constraint``), and
that is how a format constraint runs inside ``jit``.
"""
from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Potential(NamedTuple):
    """``prefix(tokens [T], length) -> log psi``; ``complete(tokens [T], length) -> log phi``."""

    prefix: Callable[[Array, Array], Array]
    complete: Callable[[Array, Array], Array]


def _finite(name: str, value) -> float:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python number, not a traced value")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _mask(tokens, length):
    return jnp.arange(tokens.shape[-1]) < length


def check_potential(potential: Potential, max_new_tokens: int) -> None:
    """Raise ValueError unless both functions map (int32 [T], int32 scalar) to a float scalar."""
    if not isinstance(potential, Potential):
        raise TypeError(f"potential must be a Potential, got {type(potential).__name__}")
    tokens = jax.ShapeDtypeStruct((max_new_tokens,), jnp.int32)
    length = jax.ShapeDtypeStruct((), jnp.int32)
    for name in ("prefix", "complete"):
        out = jax.eval_shape(getattr(potential, name), tokens, length)
        if not hasattr(out, "shape") or out.shape != ():
            raise ValueError(f"potential.{name} must return a scalar log-potential for one sequence, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise ValueError(f"potential.{name} must return a float, got {out.dtype}")


# ----------------------------------------------------------------------------- combinators
def product(*potentials: Potential) -> Potential:
    """psi = prod psi_k, phi = prod phi_k (sum of the log-potentials)."""
    if not potentials:
        raise ValueError("product needs at least one potential")
    return Potential(
        prefix=lambda tok, n: sum(p.prefix(tok, n) for p in potentials),
        complete=lambda tok, n: sum(p.complete(tok, n) for p in potentials))


def terminal(reward: Callable[[Array, Array], Array], lam: float = 1.0) -> Potential:
    """Terminal-only reward: prefix = 0, complete = lam * reward(tokens, length)."""
    lam = _finite("lambda", lam)
    return Potential(prefix=lambda tok, n: jnp.zeros((), jnp.float32),
                     complete=lambda tok, n: lam * jnp.asarray(reward(tok, n), jnp.float32))


# ----------------------------------------------------------------------------- potentials
def banned_tokens(banned: Sequence[int]) -> Potential:
    """Hard constraint: -inf as soon as a banned token id appears, else 0 (prefix and complete)."""
    banned = jnp.asarray(np.asarray(banned, np.int32).reshape(-1))

    def log_psi(tokens, length):
        hit = jnp.any((tokens[:, None] == banned[None, :]) & _mask(tokens, length)[:, None])
        return jnp.where(hit, -jnp.inf, 0.0).astype(jnp.float32)

    return Potential(prefix=log_psi, complete=log_psi)


def dfa_constraint(transitions, start: int, accepting) -> Potential:
    """A regular language over token ids as a DFA; -inf when violated.

    ``transitions [S, V]`` int: the next state, or -1 for "rejected forever" (a dead state);
    ``accepting [S]`` bool. prefix = 0 while the DFA is alive and an accepting state is still
    reachable, else -inf (so that the prefix potential is positive exactly where the constraint
    can still be met); complete = 0 iff the run ends in an accepting state.
    """
    trans = np.asarray(transitions, np.int64)
    acc = np.asarray(accepting, bool)
    if trans.ndim != 2 or acc.shape != (trans.shape[0],):
        raise ValueError(f"transitions must be [S, V] and accepting [S], got {trans.shape}, "
                         f"{acc.shape}")
    S = trans.shape[0]
    if not 0 <= start < S or trans.min() < -1 or trans.max() >= S:
        raise ValueError("DFA states out of range")
    # co-reachable states (an accepting state can be reached): backward fixed point on the host
    live = acc.copy()
    while True:
        nxt = live | np.array([np.any((trans[s] >= 0) & live[np.maximum(trans[s], 0)])
                               for s in range(S)])
        if (nxt == live).all():
            break
        live = nxt
    # state S is the dead sink
    table = jnp.asarray(np.concatenate([np.where(trans < 0, S, trans),
                                        np.full((1, trans.shape[1]), S)]), jnp.int32)
    alive = jnp.asarray(np.append(live, False))
    accept = jnp.asarray(np.append(acc, False))

    def final_state(tokens, length):
        def body(state, inputs):
            tok, valid = inputs
            return jnp.where(valid, table[state, tok], state), None
        state, _ = jax.lax.scan(body, jnp.asarray(start, jnp.int32),
                                (tokens, _mask(tokens, length)))
        return state

    return Potential(
        prefix=lambda tok, n: jnp.where(alive[final_state(tok, n)], 0.0, -jnp.inf).astype(jnp.float32),
        complete=lambda tok, n: jnp.where(accept[final_state(tok, n)], 0.0, -jnp.inf).astype(jnp.float32))


def length_potential(coefficient: float) -> Potential:
    """exp(coefficient * length) on prefixes and finished sequences alike."""
    c = _finite("coefficient", coefficient)
    f = lambda tok, n: jnp.asarray(c * n, jnp.float32)
    return Potential(prefix=f, complete=f)


def exact_answer(target: Sequence[int], lam: float = 1.0) -> Potential:
    """Terminal reward r(y) = 1 if y (EOS excluded) is exactly ``target``, else 0; weight exp(lam r)."""
    target = np.asarray(target, np.int32).reshape(-1)
    m = target.shape[0]

    def reward(tokens, length):
        if m > tokens.shape[0]:
            return jnp.zeros((), jnp.float32)
        same = jnp.all(tokens[:m] == jnp.asarray(target))
        return (same & (length == m)).astype(jnp.float32)

    return terminal(reward, lam)


def token_count(token: int, lam: float = 1.0) -> Potential:
    """Soft terminal reward r(y) = number of occurrences of ``token`` in y; weight exp(lam r)."""
    return terminal(lambda tok, n: jnp.sum((tok == token) & _mask(tok, n)).astype(jnp.float32), lam)
