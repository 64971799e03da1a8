"""Token-level potentials in pure JAX: hard constraints on token ids (banned tokens, a DFA over
token ids; docs/algorithms.md section 8) and rewards of the ids (docs/algorithms.md section 6)."""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from smc.validation import static_finite, static_int
from targets.lm.potentials.base import Potential
from targets.lm.potentials.combinators import terminal


def _in_sequence(tokens, length):
    """bool [T]: the positions before the EOS (the ones a potential may look at)."""
    return jnp.arange(tokens.shape[-1]) < length


def banned_tokens(banned: Sequence[int]) -> Potential:
    """Hard constraint: -inf as soon as a banned token id appears, else 0 (prefix and complete);
    ``allowed``: every token but the banned ones (none once one has appeared)."""
    banned_np = np.asarray(banned, np.int32).reshape(-1)
    banned = jnp.asarray(banned_np)

    def hit(tokens, length):
        return jnp.any((tokens[:, None] == banned[None, :]) & _in_sequence(tokens, length)[:, None])

    def log_psi(tokens, length):
        return jnp.where(hit(tokens, length), -jnp.inf, 0.0).astype(jnp.float32)

    def allowed(tokens, length, vocab_size, final):
        del final
        ok = jnp.ones((vocab_size,), bool).at[banned_np[banned_np < vocab_size]].set(False)
        return ok & ~hit(tokens, length)

    return Potential(prefix=log_psi, complete=log_psi, allowed=allowed)


def dfa_constraint(transitions, start: int, accepting) -> Potential:
    """A regular language over token ids as a DFA; -inf when violated (docs/algorithms.md
    section 8).

    ``transitions [S, V]`` int: the next state, or -1 for "rejected forever" (a dead state);
    ``accepting [S]`` bool. prefix = 0 while the DFA is alive and an accepting state is still
    reachable, else -inf (so that the prefix potential is positive exactly where the constraint
    can still be met); complete = 0 iff the run ends in an accepting state. ``allowed``: the tokens
    whose transition reaches a live state (an accepting one when ``final``); token ids past V
    (a model vocabulary wider than the table) are never allowed.
    """
    start = static_int("start", start)
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
                                (tokens, _in_sequence(tokens, length)))
        return state

    def allowed(tokens, length, vocab_size, final):
        if vocab_size < trans.shape[1]:
            raise ValueError(f"the DFA has {trans.shape[1]} token columns, more than the model's "
                             f"vocabulary ({vocab_size})")
        nxt = table[final_state(tokens, length)]                       # [V]
        ok = jnp.where(final, accept[nxt], alive[nxt])
        return jnp.pad(ok, (0, vocab_size - trans.shape[1]))           # pads with False

    def zero_or_minus_inf(ok):
        return jnp.where(ok, 0.0, -jnp.inf).astype(jnp.float32)

    return Potential(prefix=lambda tok, n: zero_or_minus_inf(alive[final_state(tok, n)]),
                     complete=lambda tok, n: zero_or_minus_inf(accept[final_state(tok, n)]),
                     allowed=allowed)


def length_potential(coefficient: float) -> Potential:
    """exp(coefficient * length) on prefixes and finished sequences alike."""
    c = static_finite("coefficient", coefficient)
    f = lambda tok, n: jnp.asarray(c * n, jnp.float32)
    return Potential(prefix=f, complete=f)


def exact_answer(target: Sequence[int], lam: float = 1.0) -> Potential:
    """Terminal reward r(y) = 1 if y (EOS excluded) is exactly ``target``, else 0;
    weight exp(lam r)."""
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
    token = static_int("token", token)
    return terminal(
        lambda tok, n: jnp.sum((tok == token) & _in_sequence(tok, n)).astype(jnp.float32), lam)
