"""Power-SMC latency on SmolLM2-135M: over plain batched sampling of the same N sequences, and the
MH power sampler, for the same prompts in one run.

    python -m experiments bench power [--prompts 4] [--particles 16] [--tokens 32] [--alpha 4]
        [--mh-block 8] [--mh-steps 2] [--repeats 5] [--one-program] [--out f.md]

Every method runs one prompt per call (prompts padded to one width, so one compilation), N
sequences per prompt, jitted with the weights as an argument, warmed up, then timed round-robin
over repeats (a repeat = every prompt once) (median; the ratio is the median of per-repeat ratios, so that load from other
processes hits all alike). Plain sampling is `targets.lm.generate.generate` at temperature
1/alpha (the Power-SMC proposal without weights or resampling) of N rows per prompt; Power-SMC is
`targets.lm.power.power_smc` with systematic resampling at ESS < 0.5 N; MH is
`targets.lm.mh_power.mh_power` with N chains. Sequences stop at EOS, so the methods may take
different numbers of decode steps; the table gives the steps (summed over prompts) and the time per
step too. Plain sampling prefills the prompt for each of its N rows, Power-SMC and MH once.

With ``--one-program`` every prompt runs in one call: plain sampling of N rows per prompt (each
prompt prefilled once, `generate`'s ``num_samples``), Power-SMC with one group per prompt (a
resampling decision per prompt, a gather only at steps where some prompt resamples), and
Power-SMC under ``jax.vmap`` over prompts (where the gather happens at every step).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register
from experiments.suites.lm import PROMPTS, encode_prompts, load_prompts, sized_model, smollm2

COLUMNS = ("method", "prompts x N", "T", "decode steps", "median ms", "ms / step",
           "time / plain", "(ms / step) / plain")


def programs(model, N: int, T: int, alpha: float, mh_block: int, mh_steps: int) -> dict:
    """name -> jitted (key, params, prompt [W], length) -> (decode steps taken, outputs...)."""
    from targets.lm.generate import generate
    from targets.lm.mh_power import mh_power
    from targets.lm.power import power_smc

    def plain(key, params, prompt, length):
        out = generate(key, model, params, jnp.broadcast_to(prompt, (N,) + prompt.shape),
                       jnp.full((N,), length), max_new_tokens=T, temperature=1.0 / alpha)
        return jnp.max(out.length), out.tokens

    def smc(key, params, prompt, length):
        r = power_smc(key, model, params, prompt, prompt_length=length, alpha=alpha,
                      num_particles=N, max_new_tokens=T)
        return r.num_steps, r.particles.tokens, r.log_weights

    def mh(key, params, prompt, length):
        s = mh_power(key, model, params, prompt, prompt_length=length, alpha=alpha,
                     num_chains=N, max_new_tokens=T, block_size=mh_block,
                     mh_steps=mh_steps).particles
        limits = [min(L, T) for L in range(mh_block, T + mh_block, mh_block)]
        return jnp.asarray((1 + mh_steps) * sum(limits)), s.tokens

    calls = {"plain sampling (temperature 1/alpha)": plain, "Power-SMC": smc,
             f"MH power sampler (B={mh_block}, {mh_steps} steps)": mh}
    return {name: jax.jit(fn) for name, fn in calls.items()}


def one_program(model, N: int, T: int, alpha: float) -> dict:
    """name -> jitted (key, params, prompts [B, W], lengths [B]) -> (decode steps taken,
    outputs...): every prompt in one call."""
    from targets.lm.generate import generate
    from targets.lm.power import power_smc

    def plain(key, params, prompts, lengths):
        out = generate(key, model, params, prompts, lengths, max_new_tokens=T,
                       temperature=1.0 / alpha, num_samples=N)
        return jnp.max(out.length), out.tokens

    def one_prompt(key, params, prompt, length):
        return power_smc(key, model, params, prompt, prompt_length=length, alpha=alpha,
                         num_particles=N, max_new_tokens=T)

    def smc(key, params, prompts, lengths):
        r = one_prompt(key, params, prompts, lengths)     # [B, P]: one group per prompt
        return jnp.max(r.num_steps), r.particles.tokens, r.log_weights

    def smc_vmap(key, params, prompts, lengths):
        keys = jax.random.split(key, prompts.shape[0])
        r = jax.vmap(one_prompt, in_axes=(0, None, 0, 0))(keys, params, prompts, lengths)
        return jnp.max(r.num_steps), r.particles.tokens, r.log_weights

    calls = {"plain sampling (temperature 1/alpha)": plain,
             "Power-SMC (prompts as groups)": smc, "Power-SMC (vmap over prompts)": smc_vmap}
    return {name: jax.jit(fn) for name, fn in calls.items()}


def bench(num_prompts: int, N: int, T: int, alpha: float, mh_block: int, mh_steps: int,
          repeats: int, methods: list[str] | None = None, seed: int = 0,
          together: bool = False, scan_layers: bool = False) -> list[dict]:
    """One row per method; a repeat runs every prompt once (one call per prompt, summed), or
    with `together` every prompt in one call."""
    base, params, tokenizer = smollm2()
    tokens, lengths = encode_prompts(tokenizer, load_prompts(PROMPTS, num_prompts))
    model = sized_model(base, tokens.shape[1], T, scan_layers)
    if together:
        calls = one_program(model, N, T, alpha)
        prompts = [(jnp.asarray(tokens), jnp.asarray(lengths))]
    else:
        calls = programs(model, N, T, alpha, mh_block, mh_steps)
        prompts = [(jnp.asarray(t), jnp.asarray(n)) for t, n in zip(tokens, lengths)]
    if methods:
        calls = {k: v for k, v in calls.items() if any(k.startswith(m) for m in methods)}

    def run_all(fn, key):
        steps = 0
        for k, (prompt, length) in zip(jax.random.split(key, len(prompts)), prompts):
            steps += int(jax.block_until_ready(fn(k, params, prompt, length))[0])
        return steps

    keys = jax.random.split(jax.random.key(seed), repeats + 1)
    for fn in calls.values():
        run_all(fn, keys[0])   # compile and warm up
    names = list(calls)
    times = {name: [] for name in names}
    steps = {name: [] for name in names}
    for r in range(1, repeats + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            start = time.perf_counter()
            steps[name].append(run_all(calls[name], keys[r]))
            times[name].append(1e3 * (time.perf_counter() - start))
    plain = names[0]
    rows = []
    for name in names:
        per_step = [t / max(s, 1) for t, s in zip(times[name], steps[name])]
        plain_step = [t / max(s, 1) for t, s in zip(times[plain], steps[plain])]
        rows.append({"method": name, "size": f"{num_prompts} x {N}", "T": T,
                     "steps": statistics.median(steps[name]),
                     "ms": statistics.median(times[name]),
                     "ms_step": statistics.median(per_step),
                     "ratio": statistics.median(a / b for a, b in zip(times[name], times[plain])),
                     "ratio_step": statistics.median(a / b for a, b in zip(per_step, plain_step))})
    return rows


def to_markdown(rows: list[dict]) -> str:
    cells = ([row["method"], row["size"], str(row["T"]), f"{row['steps']:.0f}", f"{row['ms']:.0f}",
              f"{row['ms_step']:.1f}", f"{row['ratio']:.2f}", f"{row['ratio_step']:.2f}"]
             for row in rows)
    return markdown.table(COLUMNS, cells, [False] + [True] * 7)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=int, default=4, help="the first prompts of the set")
    parser.add_argument("--particles", type=int, default=16, help="N sequences per prompt")
    parser.add_argument("--tokens", type=int, default=32, help="T, most new tokens")
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--mh-block", type=int, default=8)
    parser.add_argument("--mh-steps", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only methods whose name starts so (plain, Power, MH)")
    parser.add_argument("--one-program", action="store_true",
                        help="every prompt in one call: plain sampling of prompts x N rows, "
                             "Power-SMC with one group per prompt, and Power-SMC vmapped over "
                             "prompts (no MH)")
    parser.add_argument("--scan-layers", action="store_true",
                        help="compile the layer loop as a scan (quicker to compile, slower to "
                             "run: for smoke tests)")


def run(args: argparse.Namespace) -> str:
    rows = bench(args.prompts, args.particles, args.tokens, args.alpha, args.mh_block,
                 args.mh_steps, args.repeats, args.methods, together=args.one_program,
                 scan_layers=args.scan_layers)
    calls = ("every prompt in one call (prompts x N rows)" if args.one_program
             else "one call per prompt (N sequences)")
    caption = (
        f"Power-SMC latency on SmolLM2-135M-Instruct: alpha = {args.alpha}, "
        f"{calls}; median ms over {args.repeats} repeats; ratios = "
        f"median of per-repeat ratios to plain batched sampling of the same N sequences at "
        f"temperature 1/alpha ({jax.devices()[0].platform}).\n\n")
    return caption + to_markdown(rows)


BENCHMARK = register(Benchmark(
    "power", "Power-SMC latency on SmolLM2 against plain sampling and the MH power sampler",
    add_options, run,
    quick=["--prompts", "1", "--particles", "2", "--tokens", "2", "--mh-block", "1",
           "--mh-steps", "1", "--repeats", "1", "--scan-layers"], repeats=5))

if __name__ == "__main__":
    sys.exit(bench_cli.main(BENCHMARK))
