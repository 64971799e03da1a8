"""Language-model SMC on SmolLM2-135M-Instruct: `power_smollm2` and `twisted_smollm2`.

`power_smollm2` samples answers to short arithmetic and factual prompts (suites/data/
prompts.jsonl, exact answers) with one method per config: plain sampling (``temp1``), low
temperature 1/alpha (``low_temp``), the MH power sampler (``mh``) and Power-SMC (``power_smc``), all
targeting (or approximating) p(y | x)^alpha. Metrics: accuracy (`check_answer`), the mean base-model
log-likelihood per token, tokens generated and LM forward evaluations (the compute).

`twisted_smollm2` steers generation with a text potential: VADER sentiment (``sentiment``, open
prompts of suites/data/open_prompts.jsonl) or a hard format constraint (``number_format``:
the whole answer is a number, on the arithmetic prompts). Methods at equal tokens generated (N
sequences of at most T tokens per answer): reward-twisted SMC with N particles (one answer drawn by
weight), best-of-N by reward, plain sampling (the first of the N). Metrics: reward, constraint
satisfaction, log-likelihood per token, diversity (distinct n-grams over ``repeats`` answers) and
``alive``: the fraction of SMC runs that kept a particle of positive weight (a hard constraint that
no particle can meet makes every weight zero: the drawn answer is then meaningless).

The model is loaded once per process (about 12 s) and passed to every jitted program as an
argument (closing over the weights makes XLA embed them and compile ~5x slower).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import timing
from experiments.harness.config import param
from experiments.harness.registry import Demo, Experiment, Plan, register

DATA = pathlib.Path(__file__).resolve().parent / "data"
PROMPTS = DATA / "prompts.jsonl"
OPEN_PROMPTS = DATA / "open_prompts.jsonl"
NUMBER_FORMAT = r" ?\d+\.?"            # the whole answer is a number (optionally a final period)


# ----------------------------------------------------------------------------- prompts, checker
class Prompt(NamedTuple):
    id: str
    prompt: str
    answer: str = ""                # the exact answer ("" for open prompts)
    kind: str = "text"              # "number": compared as numbers; "text": as normalised words
    aliases: tuple = ()


def load_prompts(path: str | pathlib.Path = PROMPTS, limit: int | None = None) -> list[Prompt]:
    """The prompts of a JSON-lines file (fields of `Prompt`), the first ``limit`` of them."""
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
    prompts = [Prompt(r["id"], r["prompt"], str(r.get("answer", "")), r.get("kind", "text"),
                      tuple(r.get("aliases", ()))) for r in rows]
    return prompts[:limit]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def extract_number(text: str) -> float | None:
    """The answer's number: the first number after the last '=' if any, else the last number."""
    text = text.replace(",", "")
    tail = text.rsplit("=", 1)[1] if "=" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    return float(found[0] if "=" in text else found[-1])


def check_answer(text: str, prompt: Prompt) -> bool:
    """Numbers: `extract_number` equals the answer (or an alias word appears); text: the
    normalised answer (or an alias) appears as whole words in the normalised text."""
    words = _words(text)
    def contains(phrase):
        target = _words(phrase)
        return any(words[i:i + len(target)] == target for i in range(len(words)))
    if any(contains(a) for a in prompt.aliases):
        return True
    if prompt.kind == "number":
        value = extract_number(text)
        return value is not None and value == float(prompt.answer)
    return contains(prompt.answer)


# ----------------------------------------------------------------------------- model
SHIPPED_MODELS = ("smollm2-135m", "gemma3-270m")


@functools.lru_cache(maxsize=2)
def shipped_model(name: str):
    """(model, params, tokenizer) of a model shipped as a package (`targets.lm.load.SHIPPED`),
    loaded once per process.

    The file is parsed once for both (`gguf_loader.open_gguf` keeps the reader of a file, and
    `Tokenizer.from_gguf` reuses it). ``model.max_len`` is a placeholder: see `sized_model`.
    """
    from targets.lm.load import load
    return load(name, max_len=64)


def smollm2():
    """(model, params, tokenizer) of SmolLM2-135M-Instruct (`shipped_model`)."""
    return shipped_model("smollm2-135m")


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A user message in the model's chat template; a model without one (a base model, such as
    the shipped Gemma 3 270M) gets ``Question: ...\nAnswer:`` after its BOS."""
    if tokenizer.chat_template:
        return tokenizer.encode_chat([{"role": "user", "content": text}])
    return tokenizer.encode(f"Question: {text}\nAnswer:", add_bos=tokenizer.bos_id is not None)


def encode_prompts(tokenizer, prompts: list[Prompt]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts as `prompt_ids`, right-padded: (tokens [B, W] int32, lengths [B] int32)."""
    ids = [prompt_ids(tokenizer, p.prompt) for p in prompts]
    width = max(len(i) for i in ids)
    pad = tokenizer.eos_id
    tokens = np.array([i + [pad] * (width - len(i)) for i in ids], np.int32)
    return tokens, np.array([len(i) for i in ids], np.int32)


def sized_model(model, width: int, max_new_tokens: int, scan_layers: bool = False):
    """The model with a KV cache just long enough (decode attends over the whole cache), its
    layer loop a scan with `scan_layers` (quicker to compile, slower to run)."""
    return dataclasses.replace(model, max_len=width + max_new_tokens, scan_layers=scan_layers)


def batches(prompts: list, size: int):
    """Chunks of ``size`` prompts, the last padded by repeating its last prompt; (chunk, real)."""
    for start in range(0, len(prompts), size):
        chunk = prompts[start:start + size]
        yield chunk + [chunk[-1]] * (size - len(chunk)), len(chunk)


def decode_rows(tokenizer, tokens, length, eos: np.ndarray | None = None) -> list[str]:
    """Texts of ``tokens [..., T]`` cut at ``length`` (the EOS left out)."""
    tokens, length = np.asarray(tokens), np.asarray(length)
    flat_t, flat_n = tokens.reshape(-1, tokens.shape[-1]), length.reshape(-1)
    out = []
    for t, n in zip(flat_t, flat_n):
        body = [int(x) for x in t[:n] if int(x) not in tokenizer.eos_ids]
        out.append(tokenizer.decode(body, skip_special=True))
    return out


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams of words over all n-grams in ``texts`` (1.0 when all differ)."""
    grams = [tuple(w[i:i + n]) for w in map(str.split, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ----------------------------------------------------------------------------- power_smollm2
METHODS = ("temp1", "low_temp", "mh", "power_smc")


@dataclasses.dataclass(frozen=True)
class PowerLMConfig:
    method: str = param("power_smc", "temp1 | low_temp (temperature 1/alpha) | mh | power_smc",
                        choices=METHODS)
    alpha: float = param(4.0, "power alpha of the target p^alpha", low=1.0)
    num_particles: int = param(8, "particles (Power-SMC), samples (temp1, low_temp) or chains "
                               "(mh) per prompt", low=1)
    max_new_tokens: int = param(24, "T: most generated tokens per answer", low=1, high=512)
    num_prompts: int = param(16, "the first prompts of experiments/suites/data/prompts.jsonl",
                             low=1)
    prompt_batch: int = param(8, "prompts run together (vmap)", low=1)
    ramp_length: int = param(0, "Power-SMC exponent ramp 1 -> alpha over this many tokens",
                             low=0)
    ess_threshold: float = param(0.5, "Power-SMC resamples when ESS < threshold * N", low=0.0,
                                 high=1.0)
    mh_block: int = param(8, "MH power sampler: block size B", low=1)
    mh_steps: int = param(2, "MH power sampler: MH steps after each block", low=0)
    keep_texts: int = param(0, "keep the texts of the first k prompts in the metrics", low=0)
    scan_layers: bool = param(False, "compile the layer loop as a scan: quicker to compile, "
                              "slower to run (short runs, tests)")


class Answers(NamedTuple):
    """Per prompt of a batch: N candidate answers with weights and the compute spent."""

    tokens: Any        # [B, N, T]
    length: Any        # [B, N]
    logp: Any          # [B, N] base-model log p(y | x)
    weights: Any       # [B, N] normalised (uniform for independent samples)
    lm_evals: Any      # decode row-steps for the batch (every row of every step computed)


def _power_program(config: PowerLMConfig, width: int):
    """jitted (key, params, prompts [B, W], lengths [B]) -> Answers for config.method."""
    from targets.lm.generate import generate
    from targets.lm.mh_power import mh_power
    from targets.lm.power import power_smc

    base, _, _ = smollm2()
    model = sized_model(base, width, config.max_new_tokens, config.scan_layers)
    N, T = config.num_particles, config.max_new_tokens

    def sampled(key, params, prompts, lengths, temperature):
        B = prompts.shape[0]
        out = generate(key, model, params, jnp.repeat(prompts, N, axis=0),
                       jnp.repeat(lengths, N), max_new_tokens=T, temperature=temperature)
        shape = lambda x: x.reshape(B, N, *x.shape[1:])
        evals = B * N * jnp.max(out.length)
        return Answers(shape(out.tokens), shape(out.length), shape(out.logp),
                       jnp.full((B, N), 1.0 / N), evals)

    def smc(key, params, prompts, lengths):
        B = prompts.shape[0]
        run = jax.vmap(lambda k, p, n: power_smc(
            k, model, params, p, prompt_length=n, alpha=config.alpha, num_particles=N,
            max_new_tokens=T, ramp_length=config.ramp_length,
            ess_threshold=config.ess_threshold))
        r = run(jax.random.split(key, B), prompts, lengths)
        s = r.particles
        return Answers(s.tokens, s.length, s.logp, r.weights, B * N * jnp.max(r.num_steps))

    def mh(key, params, prompts, lengths):
        B = prompts.shape[0]
        run = jax.vmap(lambda k, p, n: mh_power(
            k, model, params, p, prompt_length=n, alpha=config.alpha, num_chains=N,
            max_new_tokens=T, block_size=config.mh_block, mh_steps=config.mh_steps).particles)
        s = run(jax.random.split(key, B), prompts, lengths)
        limits = [min(L, T) for L in range(config.mh_block, T + config.mh_block, config.mh_block)]
        evals = B * N * (1 + config.mh_steps) * sum(limits)   # each pass re-decodes L_k tokens
        return Answers(s.tokens, s.length, s.logp, jnp.full((B, N), 1.0 / N), evals)

    program = {"temp1": lambda k, p, x, n: sampled(k, p, x, n, 1.0),
               "low_temp": lambda k, p, x, n: sampled(k, p, x, n, 1.0 / config.alpha),
               "mh": mh, "power_smc": smc}[config.method]
    return timing.jit(program)


@functools.lru_cache(maxsize=16)
def _power_setup(config: PowerLMConfig):
    _, _, tokenizer = smollm2()
    prompts = load_prompts(PROMPTS, config.num_prompts)
    tokens, lengths = encode_prompts(tokenizer, prompts)
    return prompts, tokens, lengths, _power_program(config, tokens.shape[1])


def run_power(config: PowerLMConfig, key: jax.Array, mesh=None) -> dict:
    del mesh  # one device: the particles of a prompt stay together
    _, params, tokenizer = smollm2()
    prompts, tokens, lengths, program = _power_setup(config)
    index = list(range(len(prompts)))
    correct, logp_tok, evals, generated, texts = [], [], 0, 0, []
    for chunk, real in batches(index, config.prompt_batch):
        key, sub = jax.random.split(key)
        ans = program(sub, params, jnp.asarray(tokens[chunk]), jnp.asarray(lengths[chunk]))
        evals += int(ans.lm_evals) * real // len(chunk)
        W = np.asarray(ans.weights, np.float64)[:real]
        length = np.asarray(ans.length)[:real]
        generated += int(length.sum())
        decoded = np.array(decode_rows(tokenizer, ans.tokens[:real], length)).reshape(length.shape)
        for b, i in enumerate(chunk[:real]):
            ok = np.array([check_answer(t, prompts[i]) for t in decoded[b]], np.float64)
            correct.append(float(W[b] @ ok))
            per_tok = np.asarray(ans.logp, np.float64)[b] / np.maximum(length[b], 1)
            logp_tok.append(float(W[b] @ per_tok))
            if i < config.keep_texts:
                texts.append(str(decoded[b][int(np.argmax(W[b]))]))
    metrics = {"accuracy": float(np.mean(correct)), "logp_per_token": float(np.mean(logp_tok)),
               "tokens_generated": generated, "lm_evals": evals, "num_prompts": len(prompts),
               "accuracy_per_prompt": [round(c, 4) for c in correct]}
    if texts:
        metrics["texts"] = texts
    return metrics


# ----------------------------------------------------------------------------- twisted_smollm2
TASKS = ("sentiment", "number_format")
STEER_METHODS = ("twisted", "best_of_n", "plain")


@dataclasses.dataclass(frozen=True)
class TwistedLMConfig:
    task: str = param("sentiment", "sentiment (VADER, open prompts) | number_format (regex, "
                      "arithmetic prompts)", choices=TASKS)
    method: str = param("twisted", "twisted SMC | best_of_n | plain", choices=STEER_METHODS)
    lam: float = param(5.0, "sentiment: target p(y) exp(lam * VADER compound)", low=0.0)
    num_particles: int = param(8, "N: particles, or samples per answer", low=1)
    repeats: int = param(4, "independent answers per prompt (diversity is measured over them)",
                         low=1)
    max_new_tokens: int = param(24, "T: most generated tokens per sequence", low=1, high=512)
    num_prompts: int = param(8, "the first prompts of the task's prompt file", low=1)
    prompt_batch: int = param(4, "prompts run together (vmap)", low=1)
    keep_texts: int = param(0, "keep the texts of the first k prompts in the metrics", low=0)
    scan_layers: bool = param(False, "compile the layer loop as a scan: quicker to compile, "
                              "slower to run (short runs, tests)")


def _task(config: TwistedLMConfig, tokenizer):
    """(prompts, potential, reward(text) -> float, satisfied(text) -> bool)."""
    from targets.lm import potentials as P
    token_bytes = P.token_bytes_of(tokenizer)
    if config.task == "sentiment":
        return (load_prompts(OPEN_PROMPTS, config.num_prompts),
                P.vader_sentiment(token_bytes, config.lam), P.vader_compound,
                lambda text: P.vader_compound(text) >= 0.05)    # VADER's "positive" label
    match = lambda text: re.fullmatch(NUMBER_FORMAT, text) is not None
    return (load_prompts(PROMPTS, config.num_prompts),
            P.regex_constraint(NUMBER_FORMAT, token_bytes, special_ids=tokenizer.special_ids),
            lambda text: float(match(text)),
            match)


@functools.lru_cache(maxsize=16)
def _twisted_setup(config: TwistedLMConfig):
    from targets.lm.generate import generate
    from targets.lm.twisted import twisted_smc

    base, _, tokenizer = smollm2()
    prompts, potential, reward, satisfied = _task(config, tokenizer)
    tokens, lengths = encode_prompts(tokenizer, prompts)
    model = sized_model(base, tokens.shape[1], config.max_new_tokens, config.scan_layers)
    N, S, T = config.num_particles, config.repeats, config.max_new_tokens

    def twisted(key, params, prompts, lengths):
        def one(k, p, n):
            k_run, k_draw = jax.random.split(k)
            r = twisted_smc(k_run, model, params, p, potential, num_particles=N,
                            max_new_tokens=T, prompt_length=n)
            i = jax.random.categorical(k_draw, r.log_weights)     # one answer drawn by weight
            s = r.particles
            # every weight -inf (no particle can satisfy a hard constraint): degenerate
            return (s.tokens[i], s.length[i], s.logp[i], N * r.num_steps,
                    jnp.isfinite(r.log_evidence))
        per_prompt = jax.vmap(one, in_axes=(0, None, None))
        return jax.vmap(per_prompt)(jax.random.split(key, (prompts.shape[0], S)), prompts,
                                    lengths)

    def samples(key, params, prompts, lengths):
        B = prompts.shape[0]
        out = generate(key, model, params, jnp.repeat(prompts, S * N, axis=0),
                       jnp.repeat(lengths, S * N), max_new_tokens=T)
        shape = lambda x: x.reshape(B, S, N, *x.shape[1:])
        return (shape(out.tokens), shape(out.length), shape(out.logp),
                jnp.full((B, S), N * jnp.max(out.length)), jnp.ones((B, S), bool))

    program = timing.jit(twisted if config.method == "twisted" else samples)
    return prompts, tokens, lengths, program, reward, satisfied, tokenizer


def run_twisted(config: TwistedLMConfig, key: jax.Array, mesh=None) -> dict:
    del mesh
    _, params, _ = smollm2()
    prompts, tokens, lengths, program, reward, satisfied, tokenizer = _twisted_setup(config)
    rows = {"reward": [], "satisfied": [], "logp_per_token": [], "distinct_1": [],
            "distinct_2": [], "alive": []}
    evals, texts = 0, []
    for chunk, real in batches(list(range(len(prompts))), config.prompt_batch):
        key, sub = jax.random.split(key)
        tok, length, logp, cost, alive = (np.asarray(x) for x in program(
            sub, params, jnp.asarray(tokens[chunk]), jnp.asarray(lengths[chunk])))
        evals += int(cost[:real].sum())
        for b in range(real):
            if config.method == "twisted":
                answers = decode_rows(tokenizer, tok[b], length[b])
                lp, n = logp[b], length[b]
            else:
                candidates = [decode_rows(tokenizer, tok[b, s], length[b, s])
                              for s in range(config.repeats)]
                pick = [int(np.argmax([reward(t) for t in c])) if config.method == "best_of_n"
                        else 0 for c in candidates]
                answers = [c[i] for c, i in zip(candidates, pick)]
                lp = np.array([logp[b, s, i] for s, i in enumerate(pick)])
                n = np.array([length[b, s, i] for s, i in enumerate(pick)])
            rows["reward"].append(np.mean([reward(t) for t in answers]))
            rows["satisfied"].append(np.mean([satisfied(t) for t in answers]))
            rows["logp_per_token"].append(float(np.mean(lp / np.maximum(n, 1))))
            rows["distinct_1"].append(distinct_n(answers, 1))
            rows["distinct_2"].append(distinct_n(answers, 2))
            rows["alive"].append(float(alive[b].mean()))
            if chunk[b] < config.keep_texts:
                texts.extend(answers)
    metrics = {k: float(np.mean(v)) for k, v in rows.items()}
    metrics.update(lm_evals=evals, num_prompts=len(prompts),
                   tokens_per_answer=config.num_particles * config.max_new_tokens)
    if texts:
        metrics["texts"] = texts
    return metrics


# ----------------------------------------------------------------------------- registration
register(Experiment(
    name="power_smollm2",
    description="Power-SMC vs temperature 1, temperature 1/alpha and the MH power sampler on "
                "SmolLM2-135M: accuracy on exact-answer prompts, log-likelihood, compute",
    config_type=PowerLMConfig,
    run=run_power,
    summary_metrics=("accuracy", "logp_per_token", "tokens_generated", "lm_evals"),
    demo=Demo(
        full=Plan(grid={"method": ["temp1", "power_smc"]}, seeds=(0,),
                  overrides={"num_prompts": 4, "prompt_batch": 4, "num_particles": 4,
                             "max_new_tokens": 16}),
        quick=Plan(grid={"method": ["power_smc"]}, seeds=(0,),
                   overrides={"num_prompts": 2, "prompt_batch": 2, "num_particles": 2,
                              "max_new_tokens": 3, "scan_layers": True}),
        columns=("accuracy", "logp_per_token", "tokens_generated", "lm_evals"),
        x="method", plot_metrics=("accuracy",)),
))

register(Experiment(
    name="twisted_smollm2",
    description="reward-twisted SMC (VADER sentiment, a number-format regex) vs best-of-N and "
                "plain sampling on SmolLM2-135M at equal tokens generated",
    config_type=TwistedLMConfig,
    run=run_twisted,
    summary_metrics=("reward", "satisfied", "logp_per_token", "distinct_2", "lm_evals"),
))
