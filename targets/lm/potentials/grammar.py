"""Context-free constraints from llguidance, evaluated on the HOST one candidate token at a time
(docs/algorithms.md section 8).

A grammar (Lark syntax, a JSON Schema, or the queries over a SQLite schema) is compiled by
llguidance, whose parser decides for a token sequence whether its bytes are still a prefix of some
text of the language, and whether they are one. That is an exact prefix check (no completable
prefix is refused), so the potential (`predicate.host_constraint`: 0 or -inf, with ``accepts``) is
what twisted SMC needs to draw tokens by AWRS (`proposals.awrs`), evaluating only the tokens it
draws. Parser states are kept per token prefix (each one a copy of its parent's, advanced by one
token), so a check costs one token of parsing.

The vocabulary is ``token_bytes`` (one entry per id); ``special_ids`` (the EOS ids, BOS,
chat-template markers ...) are not text, and the constraint refuses them in a body (the SMC code
decides an EOS from ``complete``). A grammar that rejects every token of the vocabulary at the
start and does not accept the empty text is refused when it is built, naming the constraint.
"""
from __future__ import annotations

import collections
import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np

from smc.optional import require
from targets.lm.potentials.base import Potential
from targets.lm.potentials.predicate import host_constraint
from targets.lm.tokenizer import as_token_bytes

MAX_STATES = 1 << 16   # parser states kept (one per token prefix seen)


class _Vocabulary:
    """What `llguidance.TokenizerWrapper` reads: the tokens' bytes, an EOS id, the special ids,
    and a tokenizer (greedy longest match over the non-special tokens; llguidance uses it only
    to tokenise literal text of a grammar, never to judge a sequence)."""

    def __init__(self, tokens: list[bytes], special_ids: Sequence[int]):
        self.tokens = tokens
        self.special_token_ids = sorted(set(special_ids))
        self.eos_token_id = self.special_token_ids[0] if self.special_token_ids else len(tokens)
        self.bos_token_id = None
        special = set(self.special_token_ids)
        self._by_first = collections.defaultdict(list)
        for i, b in enumerate(tokens):
            if b and i not in special:
                self._by_first[b[0]].append((len(b), i))
        for options in self._by_first.values():
            options.sort(reverse=True)

    def __call__(self, data: bytes) -> list[int]:
        data = data.encode("utf-8") if isinstance(data, str) else data
        out, at = [], 0
        while at < len(data):
            match = next((i for n, i in self._by_first.get(data[at], ())
                          if data.startswith(self.tokens[i], at)), None)
            if match is None:
                raise ValueError(f"no token starts with byte {data[at]:#04x}")
            out.append(match)
            at += len(self.tokens[match])
        return out


def llguidance_constraint(grammar: str, token_bytes: Sequence[bytes | str], *,
                          special_ids: Sequence[int] = (), name: str = "grammar",
                          evaluations: collections.Counter | None = None,
                          complete_check=None) -> Potential:
    """A constraint from an llguidance grammar string (``llguidance.LLMatcher.grammar_from_*``).

    ``complete_check(text) -> bool``, if given, must also hold for a finished text (e.g. the
    database compiling a query): prefixes are judged by the grammar alone, which may only make
    them too permissive, never too strict, so the constraint stays exact.
    """
    llguidance = require("llguidance", "constraints", "a grammar constraint")
    table = as_token_bytes(token_bytes)
    vocabulary = _Vocabulary(table, special_ids)
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary),
                                       n_vocab=max(len(table), vocabulary.eos_token_id + 1))
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error and not error.startswith("WARNING"):
        raise ValueError(f"constraint {name!r}: invalid grammar: {error}")
    root = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    special = set(vocabulary.special_token_ids)
    if root.is_error():
        raise ValueError(f"constraint {name!r}: {root.get_error()}")
    first = np.unpackbits(np.frombuffer(root.compute_bitmask(), np.uint8), bitorder="little")
    first[[i for i in special if i < first.size]] = 0
    if not root.is_accepting() and not first[:len(table)].any():
        raise ValueError(f"constraint {name!r}: the grammar accepts no text of this vocabulary")

    # parser states per token prefix, the most recently made last; the root is never dropped
    states: collections.OrderedDict[tuple, Any] = collections.OrderedDict({(): root})

    def state(ids: tuple):
        """The parser after ``ids`` (None once it failed), from the longest known prefix."""
        known = len(ids)
        while ids[:known] not in states:
            known -= 1
        matcher = states[ids[:known]]
        for k in range(known, len(ids)):
            if matcher is not None:
                matcher = matcher.deep_copy()
                if ids[k] in special or not matcher.consume_token(ids[k]):
                    matcher = None
            states[ids[:k + 1]] = matcher
        while len(states) > MAX_STATES:
            oldest = next(iter(states))
            states.move_to_end(oldest) if oldest == () else states.pop(oldest)
        return matcher

    def verdict(ids: tuple, final: bool) -> bool:
        matcher = state(ids)
        if matcher is None or matcher.is_error():
            return False
        if not final:
            return True
        if not matcher.is_accepting():
            return False
        if complete_check is None:
            return True
        text = b"".join(table[i] for i in ids).decode("utf-8", "replace")
        return bool(complete_check(text))

    return host_constraint(verdict, evaluations=evaluations)


def lark_constraint(grammar: str, token_bytes: Sequence[bytes | str], **options) -> Potential:
    """Text of a Lark grammar (llguidance's Lark dialect: ``start`` rule, ``%ignore`` ...)."""
    llguidance = require("llguidance", "constraints", "a grammar constraint")
    return llguidance_constraint(llguidance.LLMatcher.grammar_from_lark(grammar), token_bytes,
                                 **{"name": "lark grammar", **options})


def partial_json_constraint(schema: dict | str, token_bytes: Sequence[bytes | str],
                    **options) -> Potential:
    """JSON text that validates against ``schema``: prefixes are partial JSON that can still
    validate (llguidance's JSON Schema grammar, its default compact whitespace), and a finished
    text is also validated by `jsonschema`, so that the target is exactly the valid documents
    among the grammar's texts. An invalid schema is a ValueError naming it."""
    llguidance = require("llguidance", "constraints", "a JSON Schema constraint")
    jsonschema = require("jsonschema", "constraints", "a JSON Schema constraint")
    schema = json.loads(schema) if isinstance(schema, str) else schema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise ValueError(f"invalid JSON Schema: {error.message}") from error
    validator = jsonschema.validators.validator_for(schema)(schema)

    def valid(text: str) -> bool:
        try:
            return validator.is_valid(json.loads(text))
        except ValueError:
            return False

    return llguidance_constraint(llguidance.LLMatcher.grammar_from_json_schema(schema),
                                 token_bytes, complete_check=valid,
                                 **{"name": "JSON Schema", **options})


def sqlite_query_grammar(schema_sql: str) -> str:
    """A Lark grammar of SELECT queries over the tables and columns of a SQLite schema:
    ``SELECT cols FROM table [WHERE cond [AND|OR cond]*] [ORDER BY col [ASC|DESC]] [LIMIT n]``,
    keywords in any case, conditions ``col op value`` with numbers and quoted strings. A name
    may be any table's column: the database judges the finished query (`sqlite_constraint`)."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(schema_sql)
        tables = [row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        columns = sorted({row[1] for t in tables for row in db.execute(
            f"PRAGMA table_info({json.dumps(t)})")})
    except sqlite3.Error as error:
        raise ValueError(f"invalid SQLite schema: {error}") from error
    finally:
        db.close()
    if not tables or not columns:
        raise ValueError("the SQLite schema defines no table with columns")

    def words(values):
        return " | ".join(json.dumps(v) + "i" for v in values)

    # Whitespace is part of the keyword and punctuation terminals (not %ignore'd): SQL needs it
    # between a keyword and a name ("SELECTname" is one identifier), and a lexer that drops it
    # would let such texts through the prefixes, to be refused only at the end.
    return "\n".join([
        "start: select SEMI?",
        "select: SELECT selection FROM table where? order? limit?",
        'selection: "*" | column (COMMA column)*',
        "where: WHERE condition ((AND | OR) condition)*",
        "condition: column OP value",
        "order: ORDER column (ASC | DESC)?",
        "limit: LIMIT NUMBER",
        "value: NUMBER | STRING | column",
        f"table: {words(tables)}",
        f"column: {words(columns)}",
        "SELECT: /[ \\t\\n]*SELECT[ \\t\\n]+/i",
        "FROM: /[ \\t\\n]+FROM[ \\t\\n]+/i",
        "WHERE: /[ \\t\\n]+WHERE[ \\t\\n]+/i",
        "AND: /[ \\t\\n]+AND[ \\t\\n]+/i",
        "OR: /[ \\t\\n]+OR[ \\t\\n]+/i",
        "ORDER: /[ \\t\\n]+ORDER[ \\t\\n]+BY[ \\t\\n]+/i",
        "ASC: /[ \\t\\n]+ASC/i",
        "DESC: /[ \\t\\n]+DESC/i",
        "LIMIT: /[ \\t\\n]+LIMIT[ \\t\\n]+/i",
        "COMMA: /[ \\t\\n]*,[ \\t\\n]*/",
        "SEMI: /[ \\t\\n]*;/",
        "OP: /[ \\t\\n]*(=|!=|<>|<=|>=|<|>)[ \\t\\n]*/",
        "NUMBER: /-?[0-9]+(\\.[0-9]+)?/",
        "STRING: /'[^']*'/",
    ])


def sqlite_constraint(schema_sql: str, token_bytes: Sequence[bytes | str],
                      **options) -> Potential:
    """A valid query over a SQLite schema: prefixes by `sqlite_query_grammar`, and a finished
    query must also compile against the schema in SQLite (``EXPLAIN``: columns of the right
    table, ...)."""
    grammar = sqlite_query_grammar(schema_sql)

    # one database for every check (EXPLAIN changes nothing); callbacks may come from any thread
    db = sqlite3.connect(":memory:", check_same_thread=False)
    db.executescript(schema_sql)

    def compiles(text: str) -> bool:
        try:
            db.execute(f"EXPLAIN {text.strip().rstrip(';')}")
            return True
        except sqlite3.Error:
            return False

    llguidance = require("llguidance", "constraints", "a SQL constraint")
    return llguidance_constraint(llguidance.LLMatcher.grammar_from_lark(grammar), token_bytes,
                                 complete_check=compiles, **{"name": "SQLite query", **options})
