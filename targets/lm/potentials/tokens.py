"""Token-level potentials in pure JAX: hard constraints on token ids (banned tokens, a DFA over
token ids; docs/algorithms.md section 8) and rewards of the ids (docs/algorithms.md section 6)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

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


class TokenDFA(NamedTuple):
    """A DFA over token ids in compact form; ``dfa_constraint(*dfa)`` makes it a potential.

    ``transitions [S, C]`` int32: the next state from each state for each token *class* (-1:
    rejected forever); ``start``; ``accepting [S]`` bool; ``token_class [V]`` int32: the class of
    every token id. Tokens share a class when their columns of next states agree in every state,
    so the table is exact and its size is ``S * C + V`` integers instead of ``S * V``: a regex or
    JSON Schema over a 49k-262k vocabulary has a few hundred states but tens to hundreds of
    classes (a digit, a quote, "any other string character" ...), where a dense table takes
    tens to hundreds of MiB per constraint. Host numpy arrays (read-only when shared through a
    cache).
    """

    transitions: np.ndarray
    start: int
    accepting: np.ndarray
    token_class: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the tables (what `dfa_constraint` puts on the device, give or take a row)."""
        return self.transitions.nbytes + self.accepting.nbytes + self.token_class.nbytes


def sparse_dfa(transitions: Mapping[int, Mapping[int, int]], start: int,
               accepting: Iterable[int], vocab_size: int) -> TokenDFA:
    """The compact `TokenDFA` of a DFA given sparsely, ``{state: {token id: next state}}`` (a
    missing entry: rejected forever), built without a dense ``[S, V]`` table.

    State ids are any ints; token ids at or past ``vocab_size`` are ignored. Only states reachable
    from ``start`` from which an accepting state is reachable are kept (renumbered, ``start``
    first); the others are merged into "rejected". When no accepting state is reachable the result
    has one rejecting state and no allowed token.
    """
    V = static_int("vocab_size", vocab_size, 1)
    accepting = set(accepting)
    rows = {}
    for state, row in transitions.items():
        tokens = np.fromiter(row.keys(), np.int64, len(row))
        nexts = np.fromiter(row.values(), np.int64, len(row))
        inside = (tokens >= 0) & (tokens < V)
        rows[state] = tokens[inside], nexts[inside]
    successors = {s: set(np.unique(n).tolist()) for s, (_, n) in rows.items()}
    reachable, stack = {start}, [start]
    while stack:
        for nxt in successors.get(stack.pop(), ()):
            if nxt not in reachable:
                reachable.add(nxt)
                stack.append(nxt)
    predecessors: dict[int, set] = {}
    for s in reachable:
        for nxt in successors.get(s, ()):
            predecessors.setdefault(nxt, set()).add(s)
    live = accepting & reachable
    stack = list(live)
    while stack:
        for prev in predecessors.get(stack.pop(), ()):
            if prev not in live:
                live.add(prev)
                stack.append(prev)
    if start not in live:
        return TokenDFA(np.full((1, 1), -1, np.int32), 0, np.zeros(1, bool), np.zeros(V, np.int32))
    order = [start] + sorted(live - {start})
    index = {s: i for i, s in enumerate(order)}
    kept = []                                   # (tokens, next index) per kept state, dead dropped
    for s in order:
        tokens, nexts = rows.get(s, (np.zeros(0, np.int64), np.zeros(0, np.int64)))
        mapped = np.array([index.get(n, -1) for n in nexts.tolist()], np.int64)
        kept.append((tokens[mapped >= 0], mapped[mapped >= 0]))
    # Partition refinement, one state at a time: the tokens of a class that move in this state
    # split off by (class, next state); the others keep their class. Touches each transition once.
    label, labels = np.zeros(V, np.int64), 1
    for tokens, nexts in kept:
        if tokens.size:
            keys, split = np.unique(label[tokens] * len(order) + nexts, return_inverse=True)
            label[tokens] = labels + split.reshape(-1)
            labels += keys.size
    _, token_class = np.unique(label, return_inverse=True)
    token_class = token_class.reshape(-1).astype(np.int32)
    table = np.full((len(order), int(token_class.max()) + 1), -1, np.int32)
    for i, (tokens, nexts) in enumerate(kept):
        table[i, token_class[tokens]] = nexts
    accept = np.array([s in accepting for s in order])
    return TokenDFA(table, 0, accept, token_class)


def dfa_constraint(transitions, start: int, accepting, token_class=None) -> Potential:
    """A regular language over token ids as a DFA; -inf when violated (docs/algorithms.md
    section 8).

    Dense form: ``transitions [S, V]`` int, the next state for every token id, or -1 for
    "rejected forever". Compact form (a `TokenDFA`, ``dfa_constraint(*dfa)``): ``transitions
    [S, C]`` over token classes and ``token_class [V]`` the class of every token id. Either way
    the device holds the compact form: a dense table is folded into classes on the host (its
    distinct columns), so a memory of ``S * C + V`` integers, and ``allowed`` costs one gather of
    ``[C]`` then one of ``[V]``. ``accepting [S]`` bool.

    prefix = 0 while the DFA is alive and an accepting state is still reachable, else -inf (so
    that the prefix potential is positive exactly where the constraint can still be met); complete
    = 0 iff the run ends in an accepting state. ``allowed``: the tokens whose transition reaches a
    live state (an accepting one when ``final``); token ids past V (a model vocabulary wider than
    the table) are never allowed.
    """
    start = static_int("start", start)
    trans = np.asarray(transitions, np.int64)
    acc = np.asarray(accepting, bool)
    if trans.ndim != 2 or acc.shape != (trans.shape[0],):
        raise ValueError(f"transitions must be [S, V] (or [S, C] with token_class) and accepting "
                         f"[S], got {trans.shape}, {acc.shape}")
    S = trans.shape[0]
    if not 0 <= start < S or trans.min() < -1 or trans.max() >= S:
        raise ValueError("DFA states out of range")
    if token_class is None:
        trans, token_class = np.unique(trans, axis=1, return_inverse=True)
        token_class = token_class.reshape(-1)
    token_class = np.asarray(token_class)
    if (token_class.ndim != 1 or token_class.size == 0
            or not np.issubdtype(token_class.dtype, np.integer)
            or token_class.min() < 0 or token_class.max() >= trans.shape[1]):
        raise ValueError(f"token_class must be a non-empty [V] int array of classes in [0, "
                         f"{trans.shape[1]}), one per column of transitions")
    V = token_class.shape[0]
    # co-reachable states (an accepting state can be reached): backward fixed point on the host
    live = acc.copy()
    while True:
        nxt = live | np.any((trans >= 0) & np.append(live, False)[trans], axis=1)
        if (nxt == live).all():
            break
        live = nxt
    # state S is the dead sink and class C its column: where token ids past V go
    table = jnp.asarray(np.block([[np.where(trans < 0, S, trans), np.full((S, 1), S)],
                                  [np.full((1, trans.shape[1] + 1), S)]]), jnp.int32)
    classes = jnp.asarray(token_class, jnp.int32)
    alive = jnp.asarray(np.append(live, False))
    accept = jnp.asarray(np.append(acc, False))

    def final_state(tokens, length):
        def body(state, inputs):
            tok, valid = inputs
            cls = jnp.where(tok < V, classes[jnp.minimum(tok, V - 1)], trans.shape[1])
            return jnp.where(valid, table[state, cls], state), None
        state, _ = jax.lax.scan(body, jnp.asarray(start, jnp.int32),
                                (tokens, _in_sequence(tokens, length)))
        return state

    def allowed(tokens, length, vocab_size, final):
        if vocab_size < V:
            raise ValueError(f"the DFA covers {V} token ids, more than the model's "
                             f"vocabulary ({vocab_size})")
        nxt = table[final_state(tokens, length)]                       # [C + 1]
        ok = jnp.where(final, accept[nxt], alive[nxt])[classes]       # [V]
        return jnp.pad(ok, (0, vocab_size - V))                        # pads with False

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
