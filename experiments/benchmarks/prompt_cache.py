"""Memory of the shared prompt cache against a prompt cache copied into every particle.

    python -m experiments bench prompt-cache [--prompt 1024] [--new-tokens 256] [--particles 64]

One program per layout, compiled (not run) for SmolLM2-135M-Instruct: prefill the prompt, start N
rows, sample ``--new-tokens`` tokens for each (`targets.lm.decoding.rollout`). *Shared*: the prompt's
keys and values stored once (`decoding.prefill`, N rows continuing it); *copied*: the same cache
repeated into N prompts of one row each, which is what a per-row cache holding its prompt stores.
Figures are XLA's own `memory_analysis()` of each compiled program: the bytes it allocates beyond
its arguments (the parameters), i.e. caches, activations and outputs; and the KV cache per particle
from the shapes: own tokens plus the prompt's share (P / N positions when shared, P when copied).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register

COLUMNS = ("layout", "prompt", "new tokens", "N", "KV MiB per particle", "program MiB (beyond params)")


def program(model, rows: int, new_tokens: int, shared: bool):
    """(params, prompt [P]) -> the rows after ``new_tokens`` sampled tokens, cache included."""
    from targets.lm import decoding

    def run(params, prompt):
        prefilled = decoding.prefill(model, params, prompt[None], jnp.asarray([prompt.size]))
        if not shared:
            prefilled = jax.tree.map(lambda x: jnp.repeat(x, rows, axis=0), prefilled)
        state = decoding.start(model, prefilled, max_new_tokens=new_tokens, eos_ids=(-1,),
                               copies=rows if shared else 1)
        return decoding.rollout(jax.random.key(0), model, params, prefilled, state,
                                lambda s: s.logprobs, (-1,))
    return run


def bench(prompt_length: int, new_tokens: int, particles: int, dtype: str = "float32") -> list[dict]:
    from targets.lm.load import load
    # unrolled layers: the scanned loop restacks every weight per call, a temporary as large
    # as the model that would swamp the caches in these figures
    model, params, _ = load(dtype=dtype, max_len=prompt_length + new_tokens)
    model = dataclasses.replace(model, prefill_chunk=min(512, prompt_length))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, model.vocab_size, prompt_length),
                         jnp.int32)
    per_token = model.kv_bytes_per_token()
    rows = []
    for shared in (True, False):
        compiled = jax.jit(program(model, particles, new_tokens, shared)).lower(
            params, prompt).compile()
        memory = compiled.memory_analysis()
        beyond = memory.temp_size_in_bytes + memory.output_size_in_bytes
        prompt_share = prompt_length / particles if shared else prompt_length
        rows.append({"layout": "shared" if shared else "copied", "prompt": prompt_length,
                     "new_tokens": new_tokens, "N": particles,
                     "kv_mib": per_token * (new_tokens + prompt_share) / 2**20,
                     "program_mib": beyond / 2**20})
    return rows


def to_markdown(rows: list[dict]) -> str:
    cells = ([r["layout"], str(r["prompt"]), str(r["new_tokens"]), str(r["N"]),
              f"{r['kv_mib']:.2f}", f"{r['program_mib']:.0f}"] for r in rows)
    return markdown.table(COLUMNS, cells, [False] + [True] * 5)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def run(args: argparse.Namespace) -> str:
    rows = bench(args.prompt, args.new_tokens, args.particles, args.dtype)
    caption = (f"Prompt cache memory, SmolLM2-135M-Instruct in {args.dtype}: shared (stored once) vs "
               f"copied into each of N particles; XLA's `memory_analysis()` of the compiled "
               f"prefill + {args.new_tokens}-token rollout (temporaries and outputs, parameters "
               f"excluded) and the KV bytes per particle from the shapes.\n\n")
    return caption + to_markdown(rows)


BENCHMARK = register(Benchmark(
    "prompt-cache", "memory: shared vs copied prompt KV cache (SmolLM2, compiled, not run)",
    add_options, run, quick=["--prompt", "40", "--new-tokens", "4", "--particles", "4"],
    repeats=None))

if __name__ == "__main__":
    sys.exit(bench_cli.main(BENCHMARK))
