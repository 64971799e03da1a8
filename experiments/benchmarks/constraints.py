"""Compile time and table memory of constraints for the SmolLM2 vocabulary (49,152 tokens).

    python -m experiments bench constraints [--only number email ...] [--repeats 3]

Each constraint is compiled from scratch (`targets.lm.potentials.regex.clear_cache` first):
a regex, or a JSON Schema through outlines-core's regex of its documents, to a token-level DFA by
outlines-core, folded into the compact table of `dfa_constraint` (next state per token class,
`TokenDFA`). Times are the median over repeats and the first call of the process apart (which
also builds the Unicode class tables, once per process); memory is the compact table's bytes
against the dense ``[S, V]`` int32 table it replaces. Only the tokenizer is loaded, not the model.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register

COLUMNS = ("constraint", "states S", "classes C", "compile s (median)", "first call s",
           "compact KiB", "dense [S, V] MiB", "compact / dense")

# The five JSON Schemas of tests/test_potentials_regex.py: nested objects, arrays with bounds,
# enums, numbers, optional fields.
SCHEMAS = {
    "json nested objects": {
        "type": "object",
        "properties": {"user": {"type": "object",
                                "properties": {"name": {"type": "string", "maxLength": 6},
                                               "id": {"type": "integer"}},
                                "required": ["name", "id"]},
                       "active": {"type": "boolean"}},
        "required": ["user", "active"]},
    "json array bounds": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
                          "maxItems": 3},
    "json enums": {"type": "object",
                   "properties": {"color": {"enum": ["red", "green", "blue"]},
                                  "size": {"enum": [1, 2, None]}},
                   "required": ["color", "size"]},
    "json numbers": {"type": "object",
                     "properties": {"x": {"type": "number"}, "y": {"type": "number"},
                                    "n": {"type": "integer"}},
                     "required": ["x", "y", "n"]},
    "json optional fields": {"type": "object",
                             "properties": {"a": {"type": "string", "maxLength": 4},
                                            "b": {"type": "boolean"}, "c": {"type": "null"}},
                             "required": ["a"]},
}
REGEXES = {"number": r" ?\d+\.?", "email": r"[\w.+-]+@[\w-]+(\.[\w-]+)*\.[a-z]{2,6}"}


def compile_constraint(name: str, token_bytes):
    """The `TokenDFA` of a named constraint, from scratch."""
    from targets.lm.potentials import json_schema_regex, regex_token_dfa
    from targets.lm.potentials.regex import clear_cache
    clear_cache()
    pattern = REGEXES[name] if name in REGEXES else json_schema_regex(SCHEMAS[name])
    return regex_token_dfa(pattern, token_bytes)


def bench(names: list[str], repeats: int) -> list[dict]:
    from targets.lm.potentials import token_bytes_of
    from targets.lm.tokenizer import Tokenizer
    token_bytes = token_bytes_of(Tokenizer.from_gguf())
    V = len(token_bytes)
    rows = []
    for name in names:
        times = []
        for _ in range(1 + repeats):
            start = time.perf_counter()
            dfa = compile_constraint(name, token_bytes)
            times.append(time.perf_counter() - start)
        S, C = dfa.transitions.shape
        rows.append({"name": name, "S": S, "C": C, "V": V, "first": times[0],
                     "median": statistics.median(times[1:] or times), "bytes": dfa.nbytes,
                     "dense": S * V * 4})
    return rows


def to_markdown(rows: list[dict]) -> str:
    cells = ([r["name"], str(r["S"]), str(r["C"]), f"{r['median']:.2f}", f"{r['first']:.2f}",
              f"{r['bytes'] / 2**10:.0f}", f"{r['dense'] / 2**20:.1f}",
              f"{r['bytes'] / r['dense']:.4f}"] for r in rows)
    return markdown.table(COLUMNS, cells, [False] + [True] * 7)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", nargs="+", default=list(REGEXES) + list(SCHEMAS),
                        choices=list(REGEXES) + list(SCHEMAS), metavar="NAME",
                        help="constraints to compile (default: all)")


def run(args: argparse.Namespace) -> str:
    rows = bench(args.only, args.repeats)
    caption = (f"Constraint compilation for SmolLM2-135M-Instruct's vocabulary (V = "
               f"{rows[0]['V']}): outlines-core's token index folded into next states per token "
               f"class; median of {args.repeats} compilations from scratch, and the first call "
               f"of the process (Unicode class tables included). Regexes: number "
               f"`{REGEXES['number']}`, email `{REGEXES['email']}`.\n\n")
    return caption + to_markdown(rows)


BENCHMARK = register(Benchmark(
    "constraints", "compile time and table memory of regex / JSON Schema constraints (SmolLM2)",
    add_options, run, quick=["--only", "number", "--repeats", "1"], repeats=3))

if __name__ == "__main__":
    sys.exit(bench_cli.main(BENCHMARK))
