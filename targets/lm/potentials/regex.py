"""Regular expressions over the decoded text as a token-level DFA (docs/algorithms.md section 8).

A pattern (a small subset, `regex_dfa`) is parsed, built into a Thompson NFA over UTF-8 bytes and
determinised into a `ByteDFA`; `lift_dfa` runs every token's bytes through it to get a
token-level table ``[states, vocab]``, and `regex_constraint` makes that a `dfa_constraint`, so
the constraint is exact and fully in JAX at run time. Everything but `regex_constraint` is host
code (Python and numpy, no JAX), cached per pattern.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from targets.lm.tokenizer import as_token_bytes

if TYPE_CHECKING:
    from targets.lm.potentials.base import Potential


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
        if self.peek() in ("*", "+", "?", "{"):
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
            if self.peek() in ("?", "+"):
                raise self.error("lazy or possessive quantifiers are not supported")
            if self.peek() in ("*", "{"):   # as Python's re: `a**` is an error, not (a*)*
                raise self.error("multiple repeat")
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
    table = as_token_bytes(token_bytes)
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
    # imported here so that the compiler above loads (and is tested) without JAX
    from targets.lm.potentials.tokens import dfa_constraint
    return dfa_constraint(*lift_dfa(regex_dfa(pattern), token_bytes))
