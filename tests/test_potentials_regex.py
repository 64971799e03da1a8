"""Constraints compiled by outlines-core (`targets.lm.potentials.regex`, `json_schema`) against
Python's ``re.fullmatch`` and `jsonschema`, checked through the TOKEN-level table.

- Regexes: for each pattern (lazy quantifiers, ``{m,n}``, negated and Unicode classes, scoped
  flags, anchors, and the alternations outlines-core alone gets wrong) a few hundred texts: random
  ones over the pattern's characters and others (non-ASCII included), mutations of known matches,
  and texts sampled from the automaton itself. Each text is cut into two random tokenisations over
  a toy vocabulary of single bytes and multi-byte tokens (some splitting a character), walked
  through the compact table, and must be accepted exactly when ``re.fullmatch`` accepts it. A
  live (not yet matching) text must complete to a match along the table's shortest completion;
  a dead one must have no completion by one or two characters. Python's ``re`` is the oracle, so
  these checks are exact (no tolerance).
- JSON Schema: documents sampled by walking the automaton with random allowed tokens until it
  accepts all parse and validate (`jsonschema`); hand-written valid ones in the canonical layout
  are accepted and invalid ones rejected.
- Bad input: invalid regexes and schemas, refused constructs and keywords, languages no token
  sequence reaches: ValueError naming the constraint.
- Memory: on SmolLM2's 49k vocabulary the compact table is a small fraction of ``[S, V]``.
The exactness of twisted SMC with these constraints is in tests/test_twisted_masked.py.
"""
import json
import re
import zlib
from collections import deque

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from experiments.benchmarks.constraints import SCHEMAS
from targets.lm import potentials as P
from tests.smollm2 import needs_model

# ----------------------------------------------------------------------------- a toy vocabulary
# characters that tell Python's classes apart: '¹' is \w but not \d, '٣' (Arabic-Indic 3) is \d,
# '\x1c' and '\u2028' are \s for Python (not for Rust's regex), 'ǅ' is a titlecase letter
ALPHABET = list("abcdhx_129.-+@ \n") + ["é", "ü", "中", "٣", "¹", "\x1c", "\u2028", "ǅ"]
MULTI = ["ab", "abc", "cd", "12", "1.", " a", "é1", "中中", "x\n", "@a", "xx", "a b", ".c",
         b"a\xc3", b"\xa9b", b"\xe4\xb8", "ü٣"]


def toy_vocabulary():
    """Every byte of the alphabet's UTF-8 encodings as a token, whole characters, multi-character
    tokens, partial characters, an empty token and a special one (last)."""
    singles = sorted({bytes([b]) for c in ALPHABET for b in c.encode()})
    whole = [c.encode() for c in ALPHABET if len(c.encode()) > 1]
    multi = [m if isinstance(m, bytes) else m.encode() for m in MULTI]
    return singles + whole + multi + [b"", b"<s>"]


VOCAB = toy_vocabulary()
EMPTY, SPECIAL = len(VOCAB) - 2, len(VOCAB) - 1


def tokenise(text: str, rng) -> list[int]:
    """A random tokenisation of the text's bytes (uniform over the tokens that fit at each step)."""
    data, ids, i = text.encode(), [], 0
    while i < len(data):
        fits = [t for t, b in enumerate(VOCAB[:SPECIAL]) if b and data.startswith(b, i)]
        t = fits[rng.integers(len(fits))]
        ids.append(t)
        i += len(VOCAB[t])
    return ids


def walk(dfa, ids) -> int:
    """The state after the tokens (-1: rejected forever), on the host."""
    state = dfa.start
    for t in ids:
        state = int(dfa.transitions[state, dfa.token_class[t]])
        if state < 0:
            return -1
    return state


def accepts(dfa, ids) -> bool:
    state = walk(dfa, ids)
    return state >= 0 and bool(dfa.accepting[state])


def completion(dfa, state) -> list[int]:
    """The tokens of a shortest path from ``state`` to an accepting state (BFS on the table)."""
    representative = {c: int(np.flatnonzero(dfa.token_class == c)[0])
                      for c in np.unique(dfa.token_class)}
    parent, queue = {state: None}, deque([state])
    while queue:
        s = queue.popleft()
        if dfa.accepting[s]:
            path = []
            while parent[s] is not None:
                s, t = parent[s]
                path.append(t)
            return path[::-1]
        for c, nxt in enumerate(dfa.transitions[s]):
            if nxt >= 0 and int(nxt) not in parent:
                parent[int(nxt)] = (s, representative[c])
                queue.append(int(nxt))
    raise AssertionError(f"live state {state} reaches no accepting state")


def sample_accepted(dfa, rng, stop=0.3, max_tokens=12) -> list[int] | None:
    """Random allowed tokens until an accepting state (stopping there with probability
    ``stop``), biased half the time towards acceptance; None if it runs past max_tokens."""
    distance = distances_to_accept(dfa)
    state, ids = dfa.start, []
    while len(ids) < max_tokens:
        if dfa.accepting[state] and rng.random() < stop:
            return ids
        nxt = dfa.transitions[state][dfa.token_class]               # [V]
        choices = np.flatnonzero(nxt >= 0)
        closer = choices[distance[nxt[choices]] < distance[state]]
        if closer.size and rng.random() < 0.5:
            choices = closer
        if choices.size == 0:
            return ids if dfa.accepting[state] else None
        t = int(rng.choice(choices))
        ids.append(t)
        state = int(nxt[t])
    return ids if dfa.accepting[state] else None


def distances_to_accept(dfa) -> np.ndarray:
    S = dfa.transitions.shape[0]
    distance = np.where(dfa.accepting, 0, S + 1)
    for _ in range(S):
        reach = np.where(dfa.transitions >= 0, distance[np.maximum(dfa.transitions, 0)], S + 1)
        distance = np.minimum(distance, reach.min(axis=1) + 1)
    return distance


def decode(ids) -> str:
    return b"".join(VOCAB[t] for t in ids).decode()


# ----------------------------------------------------------------------------- regexes vs re
# pattern -> a few texts it matches (mutated into near misses and near matches)
PATTERNS = {
    r" ?\d+\.?": [" 12.", "٣", "1", " 9٣1"],                      # Unicode \d
    r"(ab|a)*?c{1,3}": ["abac", "ccc", "c", "aababcc"],           # lazy, {m,n}
    r"h.{1,2}é": ["hxé", "h中中é", "h\u2028é", "h\x1cé"],           # '.' is all but '\n'
    r"(?:\w+ )*\w+\.": ["ab ¹.", "é_1 x.", "ǅ."],                   # Unicode \w
    r"[^a-c\n]+x": ["dhx", "中x", "\x1c x"],                        # negated class
    r"[é-ü\d]{2}|[^\W\d]+": ["é1", "ü٣", "abé", "ǅ"],               # non-ASCII range, \W inside []
    r"(?s:a.b)|(?a:\w\s)+": ["a\nb", "a b", "_\n1 "],              # scoped DOTALL / ASCII flags
    r"^(a|ab)(c|bcd)?$": ["ab", "abcd", "abc", "abbcd", "a"],      # anchors; outlines alone: no abcd
    r"\S\s\D\W": ["a\x1ca.", "中 é@", "1\u2028x "],                  # Python's \s
    r"x{2,}|[\u4e00-\u9fff]+[0-9]*": ["xx", "xxxx", "中12"],
    r"[\w.+-]+@[\w-]+(\.[\w-]+)*\.[a-z]{2,3}": ["a.b@c-d.ab", "é@x.abc", "1+x@a.b.cd"],
    r"(?:a|b)*?(?:c|d)+?": ["abcd", "d", "bacc"],
}


def texts_for(pattern: str, matches: list[str], rng) -> list[str]:
    own = sorted({c for m in matches for c in m} | set(ALPHABET))
    texts = ["".join(rng.choice(own, rng.integers(0, 8))) for _ in range(100)]
    for _ in range(100):
        chars = list(matches[rng.integers(len(matches))])
        for _ in range(rng.integers(1, 3)):
            i, c = int(rng.integers(len(chars) + 1)), str(rng.choice(own))
            kind = rng.integers(3)
            if kind == 0:
                chars.insert(i, c)
            elif chars and i < len(chars):
                chars[i] = c if kind == 1 else ""
        texts.append("".join(chars))
    return texts + matches


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_token_automaton_agrees_with_re_fullmatch(pattern):
    rng = np.random.default_rng(zlib.crc32(pattern.encode()))
    dfa = P.regex_token_dfa(pattern, VOCAB, special_ids=[SPECIAL])
    texts = texts_for(pattern, PATTERNS[pattern], rng)
    sampled = [sample_accepted(dfa, rng) for _ in range(100)]
    texts += [decode(ids) for ids in sampled if ids is not None]
    verdicts, dead = [], []
    for text in texts:
        expected = re.fullmatch(pattern, text) is not None
        for _ in range(2):
            ids = tokenise(text, rng)
            assert accepts(dfa, ids) == expected, (pattern, text, ids)
            state = walk(dfa, ids)
            if state < 0:
                dead.append(text)
            elif not expected:       # live: the table's completion must give a match
                extended = text + decode(completion(dfa, state))
                assert re.fullmatch(pattern, extended), (pattern, text, extended)
        verdicts.append(expected)
    assert 30 <= sum(verdicts) <= len(verdicts) - 30, pattern     # both outcomes, many times
    assert len(dead) >= 20, pattern
    for text in dead[:20]:           # dead: no completion by one or two characters
        for a in [""] + ALPHABET:
            for b in [""] + ALPHABET:
                assert not re.fullmatch(pattern, text + a + b), (pattern, text + a + b)


def test_special_and_empty_tokens_are_never_allowed():
    dfa = P.regex_token_dfa(r".*", VOCAB, special_ids=[SPECIAL])
    never = dfa.token_class[[EMPTY, SPECIAL]]
    assert np.all(dfa.transitions[:, never] < 0)
    plain = P.regex_token_dfa(r".*", VOCAB)     # without special_ids '<s>' is text, and matches
    assert plain.transitions[plain.start, plain.token_class[SPECIAL]] >= 0


def test_jax_potential_agrees_with_the_host_walk():
    """prefix / complete / allowed of the compiled potential (compact table, in JAX) against the
    host walk, on random token rows including ids past the vocabulary (never allowed)."""
    pattern = r"(ab|a)*?c{1,3}"
    dfa = P.regex_token_dfa(pattern, VOCAB)
    potential = P.regex_constraint(pattern, VOCAB)
    rng = np.random.default_rng(1)
    V, T, M = len(VOCAB), 6, 400
    rows = [tokenise(t, rng)[:T] for t in texts_for(pattern, PATTERNS[pattern], rng)[:M]]
    tokens = np.array([r + [V + 1] * (T - len(r)) for r in rows], np.int32)
    length = np.array([len(r) for r in rows], np.int32)
    tokens[::7, 0], length[::7] = V + 2, np.maximum(length[::7], 1)     # out of the vocabulary
    fn = jax.jit(jax.vmap(lambda t, n: (potential.prefix(t, n), potential.complete(t, n),
                                        potential.allowed(t, n, V + 3, jnp.asarray(False)))))
    prefix, complete, allowed = (np.asarray(x) for x in fn(tokens, length))
    for i, (tok, n) in enumerate(zip(tokens, length)):
        state = -1 if tok[0] >= V and n > 0 else walk(dfa, tok[:n])
        assert (prefix[i] == 0) == (state >= 0) and (complete[i] == 0) == (
            state >= 0 and bool(dfa.accepting[state]))
        expected = (np.zeros(V, bool) if state < 0 else
                    dfa.transitions[state][dfa.token_class] >= 0)
        np.testing.assert_array_equal(allowed[i], np.pad(expected, (0, 3)))
    assert 0 < np.mean(prefix == 0) < 1 and 0 < np.mean(complete == 0) < 1


def test_dense_and_compact_tables_give_the_same_potential():
    rng = np.random.default_rng(2)
    S, V = 6, 40
    dense = np.where(rng.random((S, V)) < 0.6, rng.integers(0, S, (S, V)), -1)
    dense[:, 30:] = dense[:, :10]                     # repeated columns share a class
    accepting = rng.random(S) < 0.4
    sparse = {s: {v: int(dense[s, v]) for v in range(V) if dense[s, v] >= 0} for s in range(S)}
    compact = P.sparse_dfa(sparse, 0, np.flatnonzero(accepting), V)
    assert compact.transitions.shape[1] < V
    tokens = jnp.asarray(rng.integers(0, V, (300, 5)), jnp.int32)
    length = jnp.asarray(rng.integers(0, 6, 300), jnp.int32)
    outputs = []
    for potential in (P.dfa_constraint(dense, 0, accepting), P.dfa_constraint(*compact)):
        fn = jax.vmap(lambda t, n, p=potential: (p.prefix(t, n), p.complete(t, n),
                                                 p.allowed(t, n, V, jnp.asarray(True))))
        outputs.append([np.asarray(x) for x in jax.jit(fn)(tokens, length)])
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)
    assert 0 < np.mean(outputs[0][0] == 0) < 1


# ----------------------------------------------------------------------------- JSON Schema
JSON_VOCAB = ([chr(c) for c in range(32, 127)] + ["é", '{"', '":', '", "', '"}', "true", "false",
              "null", "12", "3.", ".5", "e+", "],", ' "', "red", "green", "name", ", ", ": "])
VALID = {
    "json nested objects": ['{"user": {"name": "ab", "id": -3}, "active": true}',
                            '{"user":{"name":"","id":0},"active":false}'],
    "json array bounds": ["[1]", "[1, -20, 3]"],
    "json enums": ['{"color": "red", "size": null}', '{"color":"blue","size":2}'],
    "json numbers": ['{"x": 1.5, "y": -0.25e+3, "n": 7}'],
    "json optional fields": ['{"a": "xy"}', '{"a": "", "b": true, "c": null}', '{"a": "é", "c": null}'],
}
INVALID = {
    "json nested objects": ['{"user": {"name": "ab"}, "active": true}',
                            '{"user": {"name": "abcdefg", "id": 1}, "active": true}'],
    "json array bounds": ["[]", "[1, 2, 3, 4]", "[1.5]"],
    "json enums": ['{"color": "pink", "size": 1}', '{"color": "red", "size": 3}'],
    "json numbers": ['{"x": 1, "y": 2, "n": 1.5}', '{"x": 1, "y": 2}'],
    "json optional fields": ['{"b": true}', '{"a": "abcde"}', '{"a": 1}'],
}


def json_ids(text: str) -> list[int]:
    """Greedy longest-token tokenisation over JSON_VOCAB (every character is a token)."""
    ids, i = [], 0
    while i < len(text):
        t = max((t for t, s in enumerate(JSON_VOCAB) if text.startswith(s, i)),
                key=lambda t: len(JSON_VOCAB[t]))
        ids.append(t)
        i += len(JSON_VOCAB[t])
    return ids


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_documents_parse_and_validate(name):
    schema = SCHEMAS[name]
    dfa = P.regex_token_dfa(P.json_schema_regex(schema), JSON_VOCAB)
    rng = np.random.default_rng(len(name))
    documents = set()
    for _ in range(60):
        ids = sample_accepted(dfa, rng, stop=0.5, max_tokens=80)
        if ids is not None:
            documents.add("".join(JSON_VOCAB[t] for t in ids))
    assert len(documents) >= 10, documents
    for text in documents:
        jsonschema.validate(json.loads(text), schema)
    for text in VALID[name]:
        jsonschema.validate(json.loads(text), schema)
        assert accepts(dfa, json_ids(text)), text
    for text in INVALID[name]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(text), schema)
        assert not accepts(dfa, json_ids(text)), text
    # a JSON string and a dict give the same constraint
    assert P.json_schema_regex(json.dumps(schema)) == P.json_schema_regex(schema)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("pattern, message", [
    ("a**", "multiple repeat"), ("(ab", "missing \\)"), ("[z-a]", "bad character range"),
    (r"(a)\1", "backreferences"), ("(?=a)a", "lookarounds"), (r"a\b", "word boundaries"),
    ("(?i)a", "case-insensitive"), ("a*+", "possessive"), ("(?>a)", "atomic"),
    ("a^b", "anchors"), ("(a$)b", "anchors"),
])
def test_bad_or_refused_regex_raises_naming_it(pattern, message):
    with pytest.raises(ValueError, match=re.escape(repr(pattern)) + ".*" + message):
        P.regex_constraint(pattern, VOCAB)


@pytest.mark.parametrize("pattern", ["zz", r"[^\s\S]", "\U0010ffff"])
def test_regex_no_token_sequence_matches_raises_naming_it(pattern):
    with pytest.raises(ValueError, match=re.escape(repr(pattern))):
        P.regex_constraint(pattern, VOCAB)


def test_a_branch_no_token_sequence_completes_is_dropped_not_refused():
    dfa = P.regex_token_dfa("a|xyz", VOCAB)          # no token has a 'y': 'x' is a dead end
    assert accepts(dfa, [VOCAB.index(b"a")]) and dfa.transitions.shape[0] == 2
    assert walk(dfa, [VOCAB.index(b"x")]) == -1


@pytest.mark.parametrize("schema, message", [
    ({"type": "strin"}, "not a valid JSON Schema"), ('{"type": ', "not valid JSON"),
    ({"type": "integer", "minimum": 0}, "minimum"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
    ({"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}},
     "uniqueItems"),
    ({"type": "object", "required": ["a"]}, "required"),
])
def test_bad_or_refused_schema_raises_naming_it(schema, message):
    with pytest.raises(ValueError, match=r"JSON schema '.*" + message):
        P.json_schema_constraint(schema, JSON_VOCAB)


def test_schema_no_token_sequence_satisfies_raises_naming_it():
    with pytest.raises(ValueError, match=r"JSON schema .*integer.*no sequence"):
        P.json_schema_constraint({"type": "integer"}, ['"', "a", " "])
    with pytest.raises(TypeError, match="schema"):
        P.json_schema_constraint(3, JSON_VOCAB)


# ----------------------------------------------------------------------------- memory, 49k vocab
@needs_model
def test_compact_table_for_the_smollm2_vocabulary_is_small():
    from targets.lm.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf()
    token_bytes = P.token_bytes_of(tokenizer)
    V = len(token_bytes)
    assert V == 49152
    for pattern, text in ((r" ?\d+\.?", " 2024."), (P.json_schema_regex(
            SCHEMAS["json nested objects"]), '{"user": {"name": "Ann", "id": 7}, "active": true}')):
        dfa = P.regex_token_dfa(pattern, token_bytes)
        S, C = dfa.transitions.shape
        dense = S * V * 4
        # S * C + V int32 and S bools, against S * V int32: classes are few (C < V / 300)
        assert dfa.nbytes == 4 * (S * C + V) + S and C < V / 300, (S, C)
        assert dfa.nbytes < 4 * V + dense / 300, (S, C, dfa.nbytes, dense)
        ids = tokenizer.encode(text, add_bos=False)
        assert len(ids) > 1 and accepts(dfa, ids) and not accepts(dfa, ids[:1])
