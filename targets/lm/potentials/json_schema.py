"""JSON Schema constraints: the decoded text must be a JSON document that the schema accepts
(docs/algorithms.md section 8), written as a regex by outlines-core and compiled as a
`regex_constraint`.

The schema is first checked against its meta-schema (`jsonschema`). outlines-core then writes a
regex of documents the schema accepts: a subset of them, in a canonical layout (properties in the
schema's order; whitespace only where ``whitespace_pattern`` matches; exponents with a sign).
Keywords it would ignore, so that the regex would also accept documents the schema rejects, raise
ValueError: numeric bounds (``minimum``, ``multipleOf`` ...), ``uniqueItems``, ``contains``,
``not``, ``if``/``then``/``else``, ``patternProperties``, ``propertyNames``, the ``dependent*``
keywords, ``unevaluated*``, ``allOf`` (it concatenates the parts) and ``oneOf`` (it accepts a
document matching several branches; ``anyOf`` is exact), and ``required`` names missing from
``properties``.

Whitespace: ``[ ]?`` (at most one space between tokens of the document) by default. Free
whitespace (``[ \\t\\n\\r]*``, what JSON allows) lets a small model spend its whole token budget on
newlines and spaces before closing the document; one optional space still admits both the compact
``{"a":1}`` and the usual ``{"a": 1}`` layouts, which is how models tokenise JSON.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from smc.optional import require
from targets.lm.potentials.regex import regex_constraint

if TYPE_CHECKING:
    from targets.lm.potentials.base import Potential

WHITESPACE = r"[ ]?"
_IGNORED_BY_OUTLINES = {
    **dict.fromkeys(("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
                    "numeric bounds are not enforced"),
    **dict.fromkeys(("uniqueItems", "contains", "minContains", "maxContains", "additionalItems",
                     "unevaluatedItems"), "this array keyword is not enforced"),
    **dict.fromkeys(("patternProperties", "propertyNames", "dependentRequired",
                     "dependentSchemas", "dependencies", "unevaluatedProperties"),
                    "this object keyword is not enforced"),
    **dict.fromkeys(("not", "if", "then", "else"), "conditional keywords are not enforced"),
    "allOf": "outlines-core concatenates the parts of allOf instead of intersecting them",
    "oneOf": ("outlines-core accepts a document matching several oneOf branches; use anyOf if "
              "the branches exclude each other"),
}
_SCHEMA_MAPS = ("properties", "$defs", "definitions")     # name -> subschema
_SCHEMA_LISTS = ("anyOf", "prefixItems", "items")          # subschemas (items: also one)
_SCHEMA_VALUES = ("items", "additionalProperties")


def _name(schema: Any) -> str:
    text = json.dumps(schema, sort_keys=True) if not isinstance(schema, str) else schema
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _refuse_unenforced(schema: Any, name: str) -> None:
    """ValueError naming the schema and the keyword where outlines-core's regex would accept
    documents the schema rejects."""
    if not isinstance(schema, Mapping):
        return
    for keyword, why in _IGNORED_BY_OUTLINES.items():
        if keyword in schema:
            raise ValueError(f"JSON schema {name}: {keyword!r} is not supported ({why})")
    missing = set(schema.get("required", ())) - set(schema.get("properties", {}))
    if missing:
        raise ValueError(f"JSON schema {name}: required properties {sorted(missing)} are not in "
                         f"'properties' (outlines-core would not enforce them)")
    for keyword in _SCHEMA_MAPS:
        for sub in dict(schema.get(keyword) or {}).values():
            _refuse_unenforced(sub, name)
    for keyword in _SCHEMA_LISTS:
        if isinstance(schema.get(keyword), list):
            for sub in schema[keyword]:
                _refuse_unenforced(sub, name)
    for keyword in _SCHEMA_VALUES:
        _refuse_unenforced(schema.get(keyword), name)


def json_schema_regex(schema: Mapping | str, whitespace_pattern: str = WHITESPACE) -> str:
    """outlines-core's regex (Python syntax) of JSON documents that ``schema`` (a dict or a
    JSON string) accepts; ValueError naming the schema if it is not a valid JSON Schema or uses
    a keyword outlines-core would not enforce (module docstring)."""
    if isinstance(schema, str):
        try:
            loaded = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ValueError(f"JSON schema {_name(schema)} is not valid JSON: {error}") from None
    elif isinstance(schema, Mapping):
        loaded = dict(schema)
    else:
        raise TypeError(f"schema must be a dict or a JSON string, got {type(schema).__name__}")
    name = _name(loaded)
    jsonschema = require("jsonschema", "lm", "a JSON Schema constraint")
    try:
        jsonschema.validators.validator_for(loaded).check_schema(loaded)
    except jsonschema.exceptions.SchemaError as error:
        raise ValueError(f"JSON schema {name} is not a valid JSON Schema: {error.message}") from None
    if not isinstance(whitespace_pattern, str):
        raise TypeError("whitespace_pattern must be a str")
    try:
        re.compile(whitespace_pattern)
    except re.error as error:
        raise ValueError(f"whitespace_pattern {whitespace_pattern!r} is not a valid regular "
                         f"expression: {error}") from None
    _refuse_unenforced(loaded, name)
    writer = require("outlines_core.json_schema", "lm", "a JSON Schema constraint")
    try:
        return writer.build_regex_from_schema(json.dumps(loaded), whitespace_pattern)
    except (ValueError, TypeError) as error:
        raise ValueError(f"JSON schema {name}: outlines-core cannot write its regex: "
                         f"{error}") from None


def json_schema_constraint(schema: Mapping | str, token_bytes: Sequence[bytes | str], *,
                           whitespace_pattern: str = WHITESPACE,
                           special_ids: Iterable[int] = ()) -> Potential:
    """Hard constraint: the decoded text is a JSON document that ``schema`` accepts, in
    outlines-core's layout (`json_schema_regex`, compiled by `regex_constraint`: exact, pure JAX
    at run time). ``special_ids`` as in `regex_constraint`."""
    pattern = json_schema_regex(schema, whitespace_pattern)
    try:
        return regex_constraint(pattern, token_bytes, special_ids=special_ids)
    except ValueError as error:
        raise ValueError(f"JSON schema {_name(schema)}: {error}") from None
