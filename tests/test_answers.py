"""Answer checks (targets/lm/potentials/answers.py) and the sandbox that runs generated code
(targets/lm/potentials/sandbox.py).

- Sandbox: a program that loops forever, allocates 10 GB, writes outside its folder, opens a
  socket or starts a process is stopped and fails; a sentinel outside the folder is untouched;
  a correct program passes.
- HumanEval: every canonical solution of the 164 problems passes its tests through the harness
  (as the function's body and as a fenced whole function), and a wrong body fails.
- math-verify: equal answers in other forms pass, different ones fail; through the potential.
"""
import pathlib
import time
import uuid

import jax.numpy as jnp
import numpy as np
import pytest

from targets.lm.potentials.answers import (
    humaneval_problems,
    humaneval_program,
    humaneval_tests,
    math_answer,
)
from targets.lm.potentials.sandbox import run_python


def test_sandbox_stops_what_it_must_and_touches_nothing_outside(tmp_path):
    sentinel = pathlib.Path("/tmp") / f"sandbox-sentinel-{uuid.uuid4().hex}"
    programs = {
        "loops forever": "while True:\n    pass\n",
        "allocates 10 GB": "block = bytearray(10 * 1024 ** 3)\n",
        "writes outside": f"open({str(sentinel)!r}, 'w').write('escaped')\n",
        "climbs out": "open('../escaped', 'w').write('x')\n",
        "opens a socket": "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
        "starts a process": "import subprocess\nsubprocess.run(['true'])\n",
        "removes a file": f"import os\nos.remove({str(tmp_path / 'keep')!r})\n",
    }
    (tmp_path / "keep").write_text("keep")
    for name, source in programs.items():
        start = time.monotonic()
        outcome = run_python(source, timeout=1.5)
        assert not outcome.passed, name
        assert time.monotonic() - start < 10, name
        expected = "timed out" if name == "loops forever" else "failed"
        assert outcome.status == expected, (name, outcome)
    assert not sentinel.exists()
    assert (tmp_path / "keep").read_text() == "keep"
    ok = run_python("open('scratch.txt', 'w').write('inside is fine')\nassert 2 + 2 == 4\n")
    assert ok.passed and ok.status == "passed"
    with pytest.raises(ValueError, match="timeout"):
        run_python("pass", timeout=0)


def test_every_canonical_humaneval_solution_passes_and_a_wrong_one_fails():
    problems = humaneval_problems()
    assert len(problems) == 164
    failed = [task for task, p in problems.items()
              if not run_python(humaneval_program(p, p["canonical_solution"])).passed]
    assert failed == []
    wrong = [task for task, p in list(problems.items())[:20]
             if run_python(humaneval_program(p, "    return None\n")).passed]
    assert wrong == []


def test_humaneval_potential_on_token_sequences():
    problem = humaneval_problems()["HumanEval/0"]
    whole = ("Here it is:\n```python\ndef has_close_elements(numbers, threshold):\n"
             "    return any(abs(a - b) < threshold for i, a in enumerate(numbers)"
             " for b in numbers[i + 1:])\n```\n")
    texts = [problem["canonical_solution"], whole, "    return False\n"]
    vocabulary = sorted(set("".join(texts)))
    potential = humaneval_tests(problem, vocabulary, lam=2.0)
    for text, want in zip(texts, [2.0, 2.0, 0.0]):
        ids = jnp.asarray([vocabulary.index(c) for c in text], jnp.int32)
        assert float(potential.complete(ids, len(ids))) == want, text
        assert float(potential.prefix(ids, len(ids))) == 0.0
    with pytest.raises(ValueError, match="task id"):
        humaneval_tests("HumanEval/999", vocabulary)


def test_math_answer_accepts_equal_forms_and_rejects_others():
    cases = {
        ("\\frac{1}{2}", "So the answer is $0.5$."): 1.0,
        ("\\frac{1}{2}", "The answer is \\boxed{\\frac{2}{4}}"): 1.0,
        ("12", "7 + 5 = 12"): 1.0,
        ("12", "The answer is 13."): 0.0,
        ("\\sqrt{2}", "so $x = 2^{1/2}$"): 1.0,
        ("3", "no number here"): 0.0,
    }
    for (reference, text), want in cases.items():
        vocabulary = sorted(set(text))
        potential = math_answer(reference, vocabulary, lam=1.0)
        ids = jnp.asarray([vocabulary.index(c) for c in text], jnp.int32)
        assert float(potential.complete(ids, len(ids))) == want, (reference, text)
    with pytest.raises(ValueError, match="reference"):
        math_answer("", ["a"])
    assert np.isfinite(float(math_answer("1", ["1"]).prefix(jnp.zeros((1,), jnp.int32), 0)))
