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

A hard constraint may also say which next tokens keep the sequence possible (optional):

    allowed(tokens, length, vocab_size, final) -> bool [vocab_size]

False for a token v (never the EOS, which the SMC code decides from ``complete``) only where
appending v makes the potential -inf: ``prefix(ctx + v)``, or ``complete(ctx + v)`` when ``final``
(a traced bool: the sequence ends right after v). `targets.lm.twisted` then proposes from the
masked, renormalised model (an exact masked proposal); True where the potential is -inf anyway
is still exact, only less efficient.

For the twisted SMC to be exact a prefix potential must be positive wherever some completion has a
positive complete potential (``prefix = -inf`` only when every extension is forbidden); a hard
constraint therefore gives ``-inf`` as soon as a prefix can no longer be completed into the
language.

Text-level potentials see the *decoded text*. A vocabulary is given as ``token_bytes``: the UTF-8
bytes of every token id (``token_bytes_of(tokenizer)`` for a byte-level BPE GGUF tokenizer; any
list of strings for a toy model), and the text of ``tokens[:length]`` is the concatenation of their
bytes, decoded with replacement of invalid UTF-8 (what the tokenizer's ``decode`` gives).

- ``regex_constraint``: a regular expression (a small subset, `regex_dfa`) compiled to a DFA over
  bytes, lifted to a token-level table ``[states, vocab]`` by running every token's bytes through
  it, then `dfa_constraint`: exact and fully in JAX (no host code at run time).
- ``text_reward`` / ``vader_sentiment``: any Python function of the text, run on the HOST through
  ``jax.pure_callback`` (one call per SMC step for all particles, results cached per sequence), so
  it works under ``jit`` and ``vmap`` but not on an accelerator without host round trips.
"""
from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Potential(NamedTuple):
    """``prefix(tokens [T], length) -> log psi``; ``complete(tokens [T], length) -> log phi``;
    optional ``allowed(tokens [T], length, vocab_size, final) -> bool [vocab_size]`` (see above)."""

    prefix: Callable[[Array, Array], Array]
    complete: Callable[[Array, Array], Array]
    allowed: Callable[[Array, Array, int, Array], Array] | None = None


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


def check_allowed(potential: Potential, max_new_tokens: int, vocab_size: int) -> None:
    """Raise ValueError unless ``potential.allowed`` (if any) returns a bool [vocab_size]."""
    if potential.allowed is None:
        return
    tokens = jax.ShapeDtypeStruct((max_new_tokens,), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    final = jax.ShapeDtypeStruct((), bool)
    out = jax.eval_shape(lambda t, n, f: potential.allowed(t, n, vocab_size, f), tokens, scalar,
                         final)
    if getattr(out, "shape", None) != (vocab_size,) or out.dtype != jnp.bool_:
        raise ValueError(f"potential.allowed must return a bool [{vocab_size}] mask, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} "
                         f"{getattr(out, 'shape', '')}")


# ----------------------------------------------------------------------------- combinators
def product(*potentials: Potential) -> Potential:
    """psi = prod psi_k, phi = prod phi_k (sum of the log-potentials)."""
    if not potentials:
        raise ValueError("product needs at least one potential")
    masked = [p.allowed for p in potentials if p.allowed is not None]

    def allowed(tok, n, vocab_size, final):   # -inf in any factor makes the product -inf
        return functools.reduce(jnp.logical_and, [a(tok, n, vocab_size, final) for a in masked])

    return Potential(
        prefix=lambda tok, n: sum(p.prefix(tok, n) for p in potentials),
        complete=lambda tok, n: sum(p.complete(tok, n) for p in potentials),
        allowed=allowed if masked else None)


def terminal(reward: Callable[[Array, Array], Array], lam: float = 1.0) -> Potential:
    """Terminal-only reward: prefix = 0, complete = lam * reward(tokens, length)."""
    lam = _finite("lambda", lam)
    return Potential(prefix=lambda tok, n: jnp.zeros((), jnp.float32),
                     complete=lambda tok, n: lam * jnp.asarray(reward(tok, n), jnp.float32))


# ----------------------------------------------------------------------------- potentials
def banned_tokens(banned: Sequence[int]) -> Potential:
    """Hard constraint: -inf as soon as a banned token id appears, else 0 (prefix and complete);
    ``allowed``: every token but the banned ones (none once one has appeared)."""
    banned_np = np.asarray(banned, np.int32).reshape(-1)
    banned = jnp.asarray(banned_np)

    def hit(tokens, length):
        return jnp.any((tokens[:, None] == banned[None, :]) & _mask(tokens, length)[:, None])

    def log_psi(tokens, length):
        return jnp.where(hit(tokens, length), -jnp.inf, 0.0).astype(jnp.float32)

    def allowed(tokens, length, vocab_size, final):
        del final
        ok = jnp.ones((vocab_size,), bool).at[banned_np[banned_np < vocab_size]].set(False)
        return ok & ~hit(tokens, length)

    return Potential(prefix=log_psi, complete=log_psi, allowed=allowed)


def dfa_constraint(transitions, start: int, accepting) -> Potential:
    """A regular language over token ids as a DFA; -inf when violated.

    ``transitions [S, V]`` int: the next state, or -1 for "rejected forever" (a dead state);
    ``accepting [S]`` bool. prefix = 0 while the DFA is alive and an accepting state is still
    reachable, else -inf (so that the prefix potential is positive exactly where the constraint
    can still be met); complete = 0 iff the run ends in an accepting state. ``allowed``: the tokens
    whose transition reaches a live state (an accepting one when ``final``); token ids past V
    (a model vocabulary wider than the table) are never allowed.
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


# ----------------------------------------------------------------------------- text: vocabulary
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-in character of each byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_bytes_of(tokenizer) -> list[bytes]:
    """UTF-8 bytes of every token id of a byte-level BPE tokenizer (`GGUFTokenizer`).

    Control tokens (``tokenizer.special_ids``) are their literal text, as ``decode`` shows them.
    """
    inverse = _byte_decoder()
    special = set(getattr(tokenizer, "special_ids", ()))
    out = []
    for i, token in enumerate(tokenizer.tokens):
        if i in special or any(c not in inverse for c in token):
            out.append(token.encode("utf-8"))
        else:
            out.append(bytes(inverse[c] for c in token))
    return out


def _as_bytes(token_bytes: Sequence[bytes | str]) -> list[bytes]:
    if isinstance(token_bytes, (str, bytes)) or len(token_bytes) == 0:
        raise ValueError("token_bytes must be a non-empty sequence with one entry per token id")
    out = []
    for i, b in enumerate(token_bytes):
        if isinstance(b, str):
            b = b.encode("utf-8")
        if not isinstance(b, bytes):
            raise TypeError(f"token_bytes[{i}] must be bytes or str, got {type(b).__name__}")
        out.append(b)
    return out


def text_decoder(token_bytes: Sequence[bytes | str]) -> Callable[[Sequence[int]], str]:
    """``decode(ids) -> str``: concatenated token bytes, invalid UTF-8 replaced by U+FFFD."""
    table = _as_bytes(token_bytes)
    return lambda ids: b"".join(table[int(i)] for i in ids).decode("utf-8", "replace")


# ----------------------------------------------------------------------------- text: regex -> DFA
class ByteDFA(NamedTuple):
    """A DFA over bytes: ``transitions [S, 256]`` (-1 = dead), ``start``, ``accepting [S]``."""

    transitions: np.ndarray
    start: int
    accepting: np.ndarray


_ASCII_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_ASCII_CLASSES = {"d": frozenset(b"0123456789"), "w": _ASCII_WORD,
                  "s": frozenset(b" \t\n\r\f\v")}
_ESCAPES = {"n": ord("\n"), "t": ord("\t"), "r": ord("\r"), "f": ord("\f"), "v": ord("\v")}
_META = set("\\.[]()|*+?{}^$")
MAX_DFA_STATES = 4096


class _Parser:
    """Recursive descent over the pattern; builds an AST of ('set' | 'cat' | 'alt' | 'rep') nodes.

    A 'set' node is (ascii_bytes: frozenset, non_ascii: bool): the ASCII bytes it matches and
    whether it matches every non-ASCII character (a negated class, ``.``, ``\\D`` ...).
    """

    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0

    def error(self, message: str):
        return ValueError(f"regex {self.p!r}, position {self.i}: {message}")

    def peek(self):
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self):
        c = self.peek()
        self.i += 1
        return c

    def parse(self):
        node = self.alternation()
        if self.i != len(self.p):
            raise self.error(f"unexpected {self.p[self.i]!r}")
        return node

    def alternation(self):
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.take()
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.repetition())
        return ("cat", items)

    def repetition(self):
        node = self.atom()
        while self.peek() in ("*", "+", "?", "{"):
            c = self.take()
            if c == "*":
                node = ("rep", node, 0, None)
            elif c == "+":
                node = ("rep", node, 1, None)
            elif c == "?":
                node = ("rep", node, 0, 1)
            else:
                end = self.p.find("}", self.i)
                body = self.p[self.i:end] if end >= 0 else ""
                lo, _, hi = body.partition(",")
                if end < 0 or not lo.isdigit() or not (hi.isdigit() or hi == ""):
                    raise self.error("bad repetition, use {m}, {m,} or {m,n}")
                lo_n = int(lo)
                hi_n = lo_n if "," not in body else (None if hi == "" else int(hi))
                if hi_n is not None and hi_n < lo_n:
                    raise self.error(f"bad repetition {{{body}}}")
                self.i = end + 1
                node = ("rep", node, lo_n, hi_n)
            if self.peek() in ("?", "+") and c != "{":
                raise self.error("lazy or possessive quantifiers are not supported")
        return node

    def atom(self):
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise self.error("only (...) and (?:...) groups are supported")
            node = self.alternation()
            if self.take() != ")":
                raise self.error("missing )")
            return node
        if c == ".":
            return ("set", frozenset(range(128)) - {ord("\n")}, True)
        if c == "[":
            return self.char_class()
        if c == "\\":
            return self.escape(in_class=False)
        if c in ("^", "$"):
            raise self.error("anchors are not supported: the whole text must match the pattern")
        if c in _META:
            raise self.error(f"unexpected {c!r}")
        return self.literal(c)

    def literal(self, c: str):
        data = c.encode("utf-8")
        return ("cat", [("set", frozenset([b]), False) for b in data])

    def escape(self, in_class: bool):
        c = self.take()
        if c is None:
            raise self.error("pattern ends with a backslash")
        if c.lower() in _ASCII_CLASSES:
            chars = _ASCII_CLASSES[c.lower()]
            if c.islower():
                return ("set", chars, False)
            return ("set", frozenset(range(128)) - chars, True)
        if c in _ESCAPES:
            return ("set", frozenset([_ESCAPES[c]]), False)
        if c.isalnum():
            raise self.error(f"unsupported escape \\{c}")
        return ("set", frozenset([ord(c)]), False) if ord(c) < 128 else self.literal(c)

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.take()
        chars, first = set(), True
        while True:
            c = self.take()
            if c is None:
                raise self.error("missing ]")
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                node = self.escape(in_class=True)
                if node[0] != "set" or node[2]:
                    raise self.error("negated escapes (\\D, \\W, \\S) inside [] are not supported")
                chars |= node[1]
                continue
            if ord(c) >= 128:
                raise self.error("non-ASCII characters inside [] are not supported")
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.take()
                hi = self.take()
                if hi == "\\" or ord(hi) >= 128 or ord(hi) < ord(c):
                    raise self.error(f"bad range {c}-{hi}")
                chars |= set(range(ord(c), ord(hi) + 1))
            else:
                chars.add(ord(c))
        if negate:
            return ("set", frozenset(range(128)) - chars, True)
        return ("set", frozenset(chars), False)


def _any_non_ascii():
    """One UTF-8 encoded non-ASCII character (lead byte, then 1-3 continuation bytes)."""
    cont = ("set", frozenset(range(0x80, 0xC0)), False)
    return ("alt", [("cat", [("set", frozenset(range(0xC2, 0xE0)), False), cont]),
                    ("cat", [("set", frozenset(range(0xE0, 0xF0)), False), cont, cont]),
                    ("cat", [("set", frozenset(range(0xF0, 0xF5)), False), cont, cont, cont])])


class _NFA:
    """Thompson NFA: edges[state] = list of (byte set or None for epsilon, target)."""

    def __init__(self):
        self.edges: list[list] = []

    def new(self) -> int:
        self.edges.append([])
        return len(self.edges) - 1

    def build(self, node) -> tuple[int, int]:
        kind = node[0]
        start, end = self.new(), self.new()
        if kind == "set":
            _, chars, non_ascii = node
            if chars:
                self.edges[start].append((chars, end))
            if non_ascii:
                s, e = self.build(_any_non_ascii())
                self.edges[start].append((None, s))
                self.edges[e].append((None, end))
        elif kind == "cat":
            current = start
            for item in node[1]:
                s, e = self.build(item)
                self.edges[current].append((None, s))
                current = e
            self.edges[current].append((None, end))
        elif kind == "alt":
            for item in node[1]:
                s, e = self.build(item)
                self.edges[start].append((None, s))
                self.edges[e].append((None, end))
        else:  # ("rep", node, lo, hi)
            _, item, lo, hi = node
            current = start
            for _ in range(lo):
                s, e = self.build(item)
                self.edges[current].append((None, s))
                current = e
            if hi is None:
                s, e = self.build(item)
                self.edges[current].append((None, s))
                self.edges[e].append((None, s))
                self.edges[e].append((None, end))
            else:
                for _ in range(hi - lo):
                    s, e = self.build(item)
                    self.edges[current].append((None, s))
                    self.edges[current].append((None, end))
                    current = e
            self.edges[current].append((None, end))
        return start, end

    def closure(self, states) -> frozenset:
        stack, seen = list(states), set(states)
        while stack:
            for chars, target in self.edges[stack.pop()]:
                if chars is None and target not in seen:
                    seen.add(target)
                    stack.append(target)
        return frozenset(seen)


@functools.lru_cache(maxsize=64)
def regex_dfa(pattern: str) -> ByteDFA:
    """Compile a regular expression to a DFA over UTF-8 bytes (whole-text match).

    The subset: literals, ``.``, ``[...]`` / ``[^...]`` with ASCII ranges, ``\\d \\w \\s`` (ASCII,
    as with ``re.ASCII``) and their negations, escapes, ``(...)``, ``(?:...)``, ``|``, ``* + ?``,
    ``{m}``, ``{m,}``, ``{m,n}``. ``.`` and negated sets match any non-ASCII character (all its
    bytes). It matches the text exactly as ``re.fullmatch(pattern, text, re.ASCII)`` would.
    Anchors, lazy quantifiers, backreferences and lookarounds raise ValueError.
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    nfa = _NFA()
    nfa_start, nfa_end = nfa.build(_Parser(pattern).parse())
    start = nfa.closure([nfa_start])
    index, order, rows = {start: 0}, [start], []
    while len(rows) < len(order):
        current = order[len(rows)]
        row = np.full(256, -1, np.int64)
        targets: dict[int, set] = {}
        for state in current:
            for chars, target in nfa.edges[state]:
                if chars is not None:
                    for b in chars:
                        targets.setdefault(b, set()).add(target)
        for b, states in targets.items():
            nxt = nfa.closure(states)
            if nxt not in index:
                if len(order) >= MAX_DFA_STATES:
                    raise ValueError(f"regex {pattern!r} needs more than {MAX_DFA_STATES} DFA "
                                     f"states; simplify it")
                index[nxt] = len(order)
                order.append(nxt)
            row[b] = index[nxt]
        rows.append(row)
    transitions, accepting = np.stack(rows), np.array([nfa_end in s for s in order])
    transitions.setflags(write=False)   # shared through the cache
    accepting.setflags(write=False)
    return ByteDFA(transitions, 0, accepting)


def lift_dfa(dfa: ByteDFA, token_bytes: Sequence[bytes | str]) -> tuple[np.ndarray, int,
                                                                         np.ndarray]:
    """The token-level DFA ``(transitions [S, V], start, accepting [S])`` of a byte DFA: the
    transition of token v from state s runs v's bytes through the byte DFA (-1 once dead)."""
    table = _as_bytes(token_bytes)
    S = dfa.transitions.shape[0]
    lengths = np.array([len(b) for b in table])
    width = max(1, int(lengths.max()))
    data = np.zeros((len(table), width), np.int64)
    for v, b in enumerate(table):
        data[v, :len(b)] = np.frombuffer(b, np.uint8)
    sink = np.concatenate([np.where(dfa.transitions < 0, S, dfa.transitions),
                           np.full((1, 256), S)])            # state S: dead, absorbing
    state = np.repeat(np.arange(S)[:, None], len(table), axis=1)   # [S, V]
    for i in range(width):
        state = np.where(i < lengths[None, :], sink[state, data[None, :, i]], state)
    return np.where(state == S, -1, state), dfa.start, dfa.accepting


def regex_constraint(pattern: str, token_bytes: Sequence[bytes | str]) -> Potential:
    """Hard constraint: the decoded text must match ``pattern`` (whole text, `regex_dfa` subset).

    prefix = 0 while some continuation can still complete a match, else -inf; complete = 0 iff the
    text matches. Exact and pure JAX (`dfa_constraint` on the lifted token-level DFA).
    """
    return dfa_constraint(*lift_dfa(regex_dfa(pattern), token_bytes))


# ----------------------------------------------------------------------------- text: host rewards
def text_reward(score: Callable[[str], float], token_bytes: Sequence[bytes | str],
                lam: float = 1.0, prefix: bool = True, cache_size: int = 1 << 16) -> Potential:
    """Reward of the decoded text, computed on the HOST: ``lam * score(text)``.

    complete = lam * score(text of y); prefix = lam * score(text of the prefix) when ``prefix``,
    else 0 (a terminal reward). ``score`` runs in Python through ``jax.pure_callback`` (one call
    per batch of sequences; results cached per token sequence); a NaN score is passed on to the
    SMC engine, which counts it (``nan_increments``).
    """
    lam = _finite("lambda", lam)
    decode = text_decoder(token_bytes)

    @functools.lru_cache(maxsize=cache_size)
    def cached(ids: tuple) -> float:
        return float(score(decode(ids)))

    def host(tokens, length):
        tokens, length = np.asarray(tokens), np.asarray(length)
        flat_tok = tokens.reshape(-1, tokens.shape[-1])
        flat_len = np.broadcast_to(length, tokens.shape[:-1]).reshape(-1)
        out = np.array([cached(tuple(int(x) for x in t[:n])) for t, n in zip(flat_tok, flat_len)],
                       np.float32)
        return (lam * out).reshape(tokens.shape[:-1]).astype(np.float32)

    def log_phi(tokens, length):
        return jax.pure_callback(host, jax.ShapeDtypeStruct((), jnp.float32), tokens,
                                 jnp.asarray(length, jnp.int32), vmap_method="broadcast_all")

    return Potential(prefix=log_phi if prefix else (lambda tok, n: jnp.zeros((), jnp.float32)),
                     complete=log_phi)


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # ships its lexicon
    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound sentiment of ``text``, in [-1, 1]."""
    return _vader().polarity_scores(text)["compound"]


def vader_sentiment(token_bytes: Sequence[bytes | str], lam: float = 1.0,
                    prefix: bool = True) -> Potential:
    """Sentiment steering: ``lam * VADER compound(text)`` (host code, see `text_reward`)."""
    return text_reward(vader_compound, token_bytes, lam, prefix)
