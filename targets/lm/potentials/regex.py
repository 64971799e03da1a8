"""Regular expressions over the decoded text as a token-level automaton (docs/algorithms.md
section 8), compiled by outlines-core.

The language is the one ``re.fullmatch(pattern, text)`` accepts on a ``str``: the pattern is read
by Python's own parser and written out for outlines-core (Rust's regex-automata syntax) with every
character class spelled out as code-point ranges taken from ``re`` itself (Unicode ``\\d \\w \\s``,
``.`` without the newline unless ``(?s)``, ``(?a)`` ...), so no construct means two things.
Constructs outside regular languages, or whose meaning a DFA cannot keep, raise ValueError:
backreferences, lookarounds, ``\\b``, possessive quantifiers and atomic groups, case-insensitive
matching, and anchors anywhere but at the very start / end (where they change nothing). Lazy
quantifiers match what greedy ones do under ``fullmatch``.

outlines-core's `Index` runs every token's bytes through the byte-level DFA and returns the
token-level transitions sparsely; `targets.lm.potentials.tokens.sparse_dfa` folds them into the
compact `TokenDFA` (next state per token class), which `dfa_constraint` runs in JAX. Two details
keep the token automaton exactly the regex's:

- outlines-core (0.2.14) drops a token when the text just before the token's last byte already
  matches and the text with it does not yet (``ab(cd)?`` loses ``abcd`` spelt ``a b c d``), and
  its leftmost-first DFA stops following lower-priority branches after a match (``a|ab`` loses
  ``ab``). We compile the pattern followed by an end marker, U+10FFFF (a Unicode noncharacter), so
  that nothing matches before the marker; a state is accepting when the marker leads to a match.
  Classes exclude U+10FFFF: that one character is never matched (the only difference from
  ``re.fullmatch``).
- Tokens go in as their exact bytes, each id separately (duplicates allowed); a token with no
  bytes and the ids in ``special_ids`` get no transition (never allowed). Every single byte is
  added under an id past the vocabulary, so that outlines-core sees a way out of every state of
  the regex; those ids are dropped again, and liveness is decided over the real tokens.

Compiled automata are cached per (pattern, vocabulary, special ids).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from smc.optional import require
from targets.lm.potentials.tokens import TokenDFA, dfa_constraint, sparse_dfa
from targets.lm.tokenizer import as_token_bytes

try:  # Python's own regex parser: the only way to read a pattern exactly as `re` does
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse

if TYPE_CHECKING:
    from targets.lm.potentials.base import Potential

END_MARKER = 0x10FFFF
_CODE_POINTS = 0x110000
_NEVER = r"[^\x{0}-\x{10FFFF}]"      # an empty class: matches nothing
_CATEGORIES = {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_SPACE": r"\s",
               "CATEGORY_NOT_SPACE": r"\S", "CATEGORY_WORD": r"\w", "CATEGORY_NOT_WORD": r"\W"}
_START_ANCHORS = (sre_parse.AT_BEGINNING, sre_parse.AT_BEGINNING_STRING)
_END_ANCHORS = (sre_parse.AT_END, sre_parse.AT_END_STRING)
_REFUSED = {
    sre_parse.GROUPREF: "backreferences are not regular",
    sre_parse.GROUPREF_EXISTS: "conditional groups (?(1)...) are not regular",
    sre_parse.ASSERT: "lookarounds are not supported",
    sre_parse.ASSERT_NOT: "lookarounds are not supported",
}
for _name in ("POSSESSIVE_REPEAT", "ATOMIC_GROUP"):   # Python >= 3.11
    if hasattr(sre_parse, _name):
        _REFUSED[getattr(sre_parse, _name)] = ("possessive quantifiers and atomic groups change "
                                               "which texts match; not supported")


@functools.cache
def _category_mask(category: str, ascii_only: bool) -> np.ndarray:
    """bool [0x110000]: the code points that ``re`` matches with ``\\d``, ``\\W`` ..."""
    everything = "".join(map(chr, range(_CODE_POINTS)))
    mask = np.zeros(_CODE_POINTS, bool)
    for run in re.finditer(_CATEGORIES[category] + "+", everything, re.ASCII if ascii_only else 0):
        mask[run.start():run.end()] = True
    mask.setflags(write=False)
    return mask


def _as_class(mask: np.ndarray) -> str:
    """A character class of the code points in ``mask``, less surrogates and the end marker."""
    mask = mask.copy()
    mask[0xD800:0xE000] = False     # never in UTF-8 text
    mask[END_MARKER] = False
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.view(np.int8), [0]])))
    if edges.size == 0:
        return _NEVER
    ranges = (f"\\x{{{lo:X}}}" if lo == hi else f"\\x{{{lo:X}}}-\\x{{{hi:X}}}"
              for lo, hi in zip(edges[0::2], edges[1::2] - 1))
    return "[" + "".join(ranges) + "]"


@functools.lru_cache(maxsize=1024)
def _set_class(items: tuple, ascii_only: bool) -> str:
    """The class of a parsed ``[...]`` (or ``\\d`` ..., which the parser reads as one)."""
    mask = np.zeros(_CODE_POINTS, bool)
    negate = bool(items) and items[0][0] is sre_parse.NEGATE
    for op, av in items[negate:]:
        if op is sre_parse.LITERAL:
            mask[av] = True
        elif op is sre_parse.RANGE:
            mask[av[0]:av[1] + 1] = True
        elif op is sre_parse.CATEGORY and str(av) in _CATEGORIES:
            mask |= _category_mask(str(av), ascii_only)
        else:                                     # nothing else comes out of the parser
            raise ValueError(f"unsupported item {op} {av} in a character class")
    return _as_class(~mask if negate else mask)


class _Writer:
    """Writes a parsed Python pattern in regex-automata syntax, with the same language."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def refuse(self, why: str) -> ValueError:
        return ValueError(f"regex {self.pattern!r}: {why}")

    def sequence(self, items, flags: int, at_start: bool, at_end: bool) -> str:
        items = list(items)
        out = []
        for i, (op, av) in enumerate(items):
            # an anchor changes nothing where only anchors stand between it and the text's edge
            start = at_start and all(o is sre_parse.AT and a in _START_ANCHORS
                                     for o, a in items[:i])
            end = at_end and all(o is sre_parse.AT and a in _END_ANCHORS
                                 for o, a in items[i + 1:])
            out.append(self.item(op, av, flags, start, end))
        return "".join(out)

    def item(self, op, av, flags: int, at_start: bool, at_end: bool) -> str:
        if flags & re.IGNORECASE:
            raise self.refuse("case-insensitive matching ((?i), re.IGNORECASE) is not supported; "
                              "spell the cases out, e.g. [aA]")
        ascii_only = bool(flags & re.ASCII)
        if op is sre_parse.LITERAL:
            return _NEVER if 0xD800 <= av < 0xE000 or av == END_MARKER else f"\\x{{{av:X}}}"
        if op is sre_parse.NOT_LITERAL:
            return _as_class(np.arange(_CODE_POINTS) != av)
        if op is sre_parse.ANY:
            return _as_class(np.arange(_CODE_POINTS) != (-1 if flags & re.DOTALL else ord("\n")))
        if op is sre_parse.IN:
            return _set_class(tuple(av), ascii_only)
        if op is sre_parse.BRANCH:
            return "(?:" + "|".join(self.sequence(branch, flags, at_start, at_end)
                                    for branch in av[1]) + ")"
        if op is sre_parse.SUBPATTERN:
            _, add, remove, body = av
            return "(?:" + self.sequence(body, (flags | add) & ~remove, at_start, at_end) + ")"
        if op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT):   # lazy: same language
            low, high, body = av
            count = (f"{{{low},}}" if high == sre_parse.MAXREPEAT
                     else f"{{{low}}}" if high == low else f"{{{low},{high}}}")
            return "(?:" + self.sequence(body, flags, False, False) + ")" + count
        if op is sre_parse.AT:
            if (av in _START_ANCHORS and at_start) or (av in _END_ANCHORS and at_end):
                return ""
            if av in _START_ANCHORS + _END_ANCHORS:
                raise self.refuse("anchors (^ $ \\A \\Z) are only supported at the very start or "
                                  "end of the pattern: the whole text must match anyway")
            raise self.refuse("word boundaries (\\b, \\B) are not supported")
        raise self.refuse(_REFUSED.get(op, f"unsupported construct {op}"))


def rust_regex(pattern: str) -> str:
    """``pattern`` (Python syntax, whole-text match) in regex-automata syntax with the same
    language, the end marker excluded; ValueError naming the pattern if Python rejects it or it
    uses a construct that has no such equivalent."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f"regex {pattern!r} is not a valid Python regular expression: "
                         f"{error}") from None
    parsed = sre_parse.parse(pattern)
    return _Writer(pattern).sequence(parsed, parsed.state.flags, True, True)


@functools.lru_cache(maxsize=32)
def _compile(pattern: str, token_bytes: tuple[bytes, ...], special_ids: frozenset) -> TokenDFA:
    V = len(token_bytes)
    marker, eos = V, V + 1             # ids past the vocabulary, dropped by sparse_dfa
    ids: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes):
        if b and i not in special_ids:
            ids.setdefault(b, []).append(i)
    ids.setdefault(chr(END_MARKER).encode(), []).append(marker)
    for byte in range(256):            # a way out of every state of the regex, see above
        ids.setdefault(bytes([byte]), []).append(V + 2 + byte)
    automaton = f"(?:{rust_regex(pattern)})\\x{{{END_MARKER:X}}}"
    outlines_core = require("outlines_core", "lm", "a regex or JSON Schema constraint")
    try:
        index = outlines_core.Index(automaton, outlines_core.Vocabulary(eos, ids))
    except ValueError as error:
        raise ValueError(f"regex {pattern!r}: no text matches it, or outlines-core cannot "
                         f"compile it ({error})") from None
    transitions = index.get_transitions()
    finals = index.get_final_states()
    accepting = [s for s, row in transitions.items() if row.get(marker) in finals]
    dfa = sparse_dfa(transitions, index.get_initial_state(), accepting, V)
    for array in (dfa.transitions, dfa.accepting, dfa.token_class):
        array.setflags(write=False)    # shared through the cache
    return dfa


def clear_cache() -> None:
    """Forget the compiled automata (benchmarks time compilation with it)."""
    _compile.cache_clear()


def regex_token_dfa(pattern: str, token_bytes: Sequence[bytes | str],
              special_ids: Iterable[int] = ()) -> TokenDFA:
    """The compact token-level DFA (`TokenDFA`) of ``re.fullmatch(pattern, text)``, where text
    is the UTF-8 decoding of the tokens' bytes; ``special_ids`` (e.g. a `Tokenizer`'s
    ``special_ids``) are not text and never allowed. Host code; cached."""
    table = as_token_bytes(token_bytes)
    special = frozenset(int(i) for i in special_ids)
    if any(not 0 <= i < len(table) for i in special):
        raise ValueError(f"special_ids must be token ids in [0, {len(table)})")
    return _compile(pattern, tuple(table), special)


def regex_constraint(pattern: str, token_bytes: Sequence[bytes | str], *,
                     special_ids: Iterable[int] = ()) -> Potential:
    """Hard constraint: the decoded text must match ``pattern`` as ``re.fullmatch`` does (Python
    syntax; the module docstring lists what is refused).

    prefix = 0 while some continuation of tokens can still complete a match, else -inf; complete
    = 0 iff the text matches. Exact and pure JAX at run time (`dfa_constraint` on `regex_token_dfa`).
    ``special_ids``: token ids that are not text (control tokens), never allowed; the EOS is
    decided by the SMC code from ``complete``. ValueError naming the pattern when no sequence of
    these tokens matches it.
    """
    dfa = regex_token_dfa(pattern, token_bytes, special_ids)
    if not dfa.accepting.any():
        raise ValueError(f"regex {pattern!r}: no sequence of these tokens matches it")
    return dfa_constraint(*dfa)
