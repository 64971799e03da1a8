"""The host-only regex compiler (`targets.lm.potentials.regex`) against the `regex` package:
``fullmatch`` for complete, ``partial=True`` for "can this prefix still be extended to a match",
on random strings, non-ASCII included; unsupported syntax raises."""
import numpy as np
import pytest

from targets.lm.potentials.regex import regex_dfa

regex = pytest.importorskip("regex")

# ----------------------------------------------------------------------------- regex -> DFA
PATTERNS = [r"[0-9]+\.", r"(ab|a)*c?", r"\d{2,3}(\.\d)?", r"[^a-c]+x", r"h.{1,2}é",
            r"(?:\w+ )*\w+\.", r"[a-z ]*", r"a|bc|", r"\S\s\D\W", r"x{2,}"]
ALPHABET = ["a", "b", "c", "h", "x", "1", "2", ".", " ", "é", "\n"]


def byte_dfa_verdicts(dfa, text):
    """(matches, can still be extended to a match) from the byte DFA, walked in numpy."""
    live = dfa.accepting.copy()    # states from which an accepting state is reachable
    while True:
        step = np.array([np.any((row >= 0) & live[np.maximum(row, 0)]) for row in dfa.transitions])
        if np.all(live | step == live):
            break
        live |= step
    state = dfa.start
    for b in text.encode("utf-8"):
        state = dfa.transitions[state, b] if state >= 0 else -1
    return state >= 0 and bool(dfa.accepting[state]), state >= 0 and bool(live[state])


def test_regex_dfa_agrees_with_the_regex_package():
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(ALPHABET, rng.integers(0, 7))) for _ in range(300)]
    for pattern in PATTERNS:
        dfa = regex_dfa(pattern)
        for text in texts:
            full = regex.fullmatch(pattern, text, flags=regex.ASCII) is not None
            alive = regex.fullmatch(pattern, text, flags=regex.ASCII, partial=True) is not None
            assert byte_dfa_verdicts(dfa, text) == (full, alive), (pattern, text)


@pytest.mark.parametrize("pattern, message", [
    ("^ab", "anchors"), ("ab$", "anchors"), ("a*?", "lazy"), (r"(a)\1", "escape"),
    ("[z-a]", "range"), ("(ab", r"missing \)"), ("[ab", "missing ]"), ("a{3,1}", "repetition"),
    ("(?=a)", "groups"), ("*a", "unexpected"), ("[é]", "non-ASCII"),
])
def test_unsupported_regex_raises(pattern, message):
    with pytest.raises(ValueError, match=message):
        regex_dfa(pattern)


@pytest.mark.parametrize("pattern", ["a**", "a{2}*", "a+{2}", "(ab)?*"])
def test_multiple_repeat_is_refused_as_python_refuses_it(pattern):
    import re
    with pytest.raises(re.error, match="multiple repeat"):
        re.compile(pattern)
    with pytest.raises(ValueError, match="multiple repeat"):
        regex_dfa(pattern)
