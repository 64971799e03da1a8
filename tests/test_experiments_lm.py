"""The SmolLM2 experiments: the prompt set and its answer checker (unit tests), and SMOKE TESTS of
`power_smollm2` (the demo's quick plan through the command line) and `twisted_smollm2` (a number
format constraint on the real vocabulary, tiny sizes). Exactness of the samplers is tested on
enumerable models (test_power.py, test_twisted.py, test_potentials_text.py)."""

import jax
import pytest

from experiments.suites import lm as E

pytest.importorskip("gguf")
from smollm2 import needs_model


def test_prompt_set_is_well_formed():
    prompts = E.load_prompts()
    assert len(prompts) >= 50
    assert len({p.id for p in prompts}) == len(prompts)
    assert all(p.prompt and p.answer and p.kind in ("number", "text") for p in prompts)
    assert sum(p.kind == "number" for p in prompts) >= 25
    assert all(E.check_answer(p.answer, p) for p in prompts)   # the answer itself passes
    assert len(E.load_prompts(E.OPEN_PROMPTS)) >= 8
    assert len(E.load_prompts(limit=3)) == 3


@pytest.mark.parametrize("text, ok", [
    ("12", True), ("7 + 5 = 12.", True), ("The answer is 12.", True), ("12.0", True),
    ("7 + 5 = 13", False), ("The answer is 7 + 5", False), ("", False), ("1,2", True),
])
def test_number_checker(text, ok):
    assert E.check_answer(text, E.Prompt("x", "What is 7 + 5?", "12", "number")) is ok


@pytest.mark.parametrize("text, ok", [
    ("Paris", True), ("The capital of France is Paris.", True), ("paris!", True),
    ("Parisian food", False), ("Lyon", False),
])
def test_text_checker(text, ok):
    assert E.check_answer(text, E.Prompt("x", "Capital of France?", "Paris", "text")) is ok
    alias = E.Prompt("y", "Legs of a spider?", "8", "number", ("eight",))
    assert E.check_answer("It has eight legs.", alias)


def test_distinct_n():
    assert E.distinct_n(["a b c", "a b d"], 2) == 3 / 4
    assert E.distinct_n(["a", "a"], 1) == 0.5 and E.distinct_n([""], 2) == 0.0


@needs_model
def test_twisted_smollm2_number_format_satisfies_the_constraint():
    """Twisted SMC's answers whose run kept a live particle satisfy the regex on the real text."""
    config = E.TwistedLMConfig(task="number_format", method="twisted", num_particles=8,
                               repeats=1, max_new_tokens=4, num_prompts=2, prompt_batch=2,
                               keep_texts=2)
    metrics = E.run_twisted(config, jax.random.PRNGKey(0))
    assert metrics["alive"] > 0.0
    assert metrics["satisfied"] == pytest.approx(metrics["alive"])
    assert len(metrics["texts"]) == 2
