"""Constraints checked on the host one token at a time (targets/lm/potentials/grammar.py and
predicate.py): llguidance grammars (Lark, JSON Schema, SQLite queries) and Python syntax.

- The prefix verdicts are exact where the language is simple enough to decide by hand (brackets).
- Random walks that take only tokens the constraint accepts end in texts that validate
  (`jsonschema`), compile (SQLite ``EXPLAIN``), or parse (`ast`).
- Python prefixes: no prefix of real code is refused; broken code is.
- Bad input (invalid grammar or schema, a grammar that accepts nothing) raises, naming it.
Exactness of twisted SMC with these constraints: tests/test_twisted_awrs.py (Lark brackets).
"""
import functools
import inspect
import itertools
import json
import sqlite3
import textwrap

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from targets.lm.potentials.grammar import (
    lark_constraint,
    partial_json_constraint,
    sqlite_constraint,
)
from targets.lm.potentials.predicate import (
    python_complete_ok,
    python_constraint,
    python_prefix_ok,
)
from tests.test_twisted_awrs import BRACKETS_LARK, TEXT, balanced, open_brackets_ok

WIDTH = 40   # token slots of a walk


def row(ids):
    tokens = np.zeros((WIDTH,), np.int32)
    tokens[:len(ids)] = ids
    return tokens, np.int32(len(ids))


@functools.cache
def compiled(potential):
    """(accepts for many candidates, complete), jitted once per potential (fixed shapes)."""
    many = jax.jit(lambda tokens, n, vs, final: jax.vmap(
        lambda v: potential.accepts(tokens, n, v, final))(vs))
    return many, jax.jit(lambda tokens, n: jnp.isfinite(potential.complete(tokens, n)))


def verdicts(potential, ids, candidates, final=False):
    """accepts(ids + [v]) for every v in candidates, through the potential's JAX interface."""
    return np.asarray(compiled(potential)[0](*row(ids), np.asarray(candidates, np.int32), final))


def complete(potential, ids):
    return bool(compiled(potential)[1](*row(ids)))


def test_lark_prefix_verdicts_are_exact_on_brackets():
    vocabulary = TEXT + ["()"]                 # a token of two characters too
    potential = lark_constraint(BRACKETS_LARK, vocabulary, special_ids=[3, 4])
    text_ids = [0, 1, 2, 5]
    for length in range(4):
        for ids in itertools.product(text_ids, repeat=length):
            text = "".join(vocabulary[i] for i in ids)
            got = verdicts(potential, list(ids), text_ids + [3])
            want = [open_brackets_ok(text + vocabulary[v]) for v in text_ids] + [False]
            np.testing.assert_array_equal(got, want, err_msg=text)
            assert complete(potential, list(ids)) == balanced(text), text


def walk(potential, vocabulary, rng, stop=0.5, limit=WIDTH):
    """Random tokens among the accepted ones until the text is complete (then stop with
    probability `stop`) or `limit` tokens; the finished text, or None."""
    ids, everything = [], list(range(len(vocabulary)))
    while len(ids) < limit:
        if complete(potential, ids) and rng.random() < stop:
            return "".join(vocabulary[i] for i in ids)
        ok = np.flatnonzero(verdicts(potential, ids, everything))
        if ok.size == 0:
            break
        ids.append(int(rng.choice(ok)))
    return None


JSON_VOCABULARY = (list('{}[]":,0123456789-.abxynmegtsid') + ['"name"', '"age"', '"tags"', '"id"',
                                                          "true", "false", "null", "<eos>"])
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4},
                                      "age": {"type": "integer", "minimum": 0,
                                              "maximum": 99}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                               "minItems": 1, "maxItems": 3},
                                      "id": {"type": ["integer", "null"], "maximum": 999}},
     "required": ["tags"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array_enum"])
def test_json_walks_end_in_valid_documents(schema):
    potential = partial_json_constraint(schema, JSON_VOCABULARY,
                                        special_ids=[len(JSON_VOCABULARY) - 1])
    rng = np.random.default_rng(0)
    texts = [walk(potential, JSON_VOCABULARY, rng) for _ in range(16)]
    finished = [t for t in texts if t is not None]
    assert len(finished) >= 4, texts      # long strings and numbers run past WIDTH
    for text in finished:
        jsonschema.validate(json.loads(text), schema)
    # a document that breaks the schema is not complete
    bad = (["{", '"name"', ":", '"', "a", '"', ",", '"age"', ":", "-", "1", "}"]
           if "age" in schema["properties"] else ["{", '"tags"', ":", "[", "]", "}"])
    ids = [JSON_VOCABULARY.index(c) for c in bad]
    assert not complete(potential, ids)


SCHEMA_SQL = """CREATE TABLE users (id INTEGER, name TEXT, age INTEGER);
CREATE TABLE orders (id INTEGER, user_id INTEGER, total REAL);"""
SQL_VOCABULARY = (["SELECT", " ", "*", ",", "FROM", "WHERE", "AND", "=", "<", "1", "2", "'x'",
                   "users", "orders", "id", "name", "age", "user_id", "total", "LIMIT", ";",
                   "<eos>"])


def test_sqlite_walks_end_in_queries_that_compile():
    potential = sqlite_constraint(SCHEMA_SQL, SQL_VOCABULARY, special_ids=[len(SQL_VOCABULARY) - 1])
    rng = np.random.default_rng(1)
    finished = [t for t in (walk(potential, SQL_VOCABULARY, rng, stop=0.7) for _ in range(16))
                if t is not None]
    assert len(finished) >= 4     # a column of the other table ends a walk unfinished
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA_SQL)
    for text in finished:
        db.execute(f"EXPLAIN {text.rstrip(';')}")       # raises if it does not compile
    # in the grammar, but a column of the other table: the database refuses it
    ids = [SQL_VOCABULARY.index(t) for t in ["SELECT", " ", "total", " ", "FROM", " ", "users"]]
    assert not complete(potential, ids)


PROGRAM = '''@decorator(arg=1)
class A(Base, metaclass=M):
    """Doc
    string."""
    x: int = 5e3
    def f(self, *a, **k) -> "A":
        s = f"{self.x!r:>10} and {a[0]}" + 'q' \\
            + r"\\d"
        y = [i ** 2 if i % 2 else 0 for i in range(10)] if a else {k: v for k, v in k.items()}
        lam = lambda q, /, r=2: (q,
                                 r)
        try:
            pass
        except (ValueError, TypeError) as e:
            raise RuntimeError("x") from e
        finally:
            return y
'''


def test_python_prefixes_of_real_code_are_never_refused():
    sources = [PROGRAM] + [textwrap.dedent(inspect.getsource(f))
                           for f in (json.dumps, textwrap.TextWrapper._split)]
    for source in sources:
        assert python_complete_ok(source)
        refused = [source[:i] for i in range(len(source) + 1) if not python_prefix_ok(source[:i])]
        assert refused == [], refused[:3]
    for broken in ["x = )\ny = 1\n", "def f(:\n  pass\n", "x = 1 2\nz = 3\n", "for for\nx\n"]:
        assert not python_prefix_ok(broken), broken
    potential = python_constraint(list("xy=1 \n(") + ["<eos>"])
    assert complete(potential, [0, 4, 2, 4, 3]) and not complete(potential, [0, 2, 6])


def test_bad_grammars_and_schemas_raise_naming_them():
    with pytest.raises(ValueError, match="lark grammar"):
        lark_constraint("start: (", TEXT, special_ids=[3, 4])
    with pytest.raises(ValueError, match="accepts no text"):
        lark_constraint('start: "zz"', TEXT, special_ids=[3, 4])
    with pytest.raises(ValueError, match="JSON Schema"):
        partial_json_constraint({"type": "no such type"}, JSON_VOCABULARY)
    with pytest.raises(ValueError, match="SQLite schema"):
        sqlite_constraint("CREATE TABL users (id)", SQL_VOCABULARY)
