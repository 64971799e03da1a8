"""The share of a Power-SMC step spent sampling the next token, on SmolLM2-135M-Instruct.

    python -m experiments bench sampling [--batch 16] [--prompt 32] [--alpha 4] [--calls 12]
        [--repeats 8]

Four jitted parts of one step at a batch of rows continuing one prompt, a few tokens in:
the decode (`decoding.append` with fixed tokens), and the sampling part of Power-SMC's step: the
proposal's log-softmax at temperature 1/alpha (`proposals.tokens.filtered_logprobs`), one draw per
row, its log q, and the weight's log C_t = logsumexp(alpha log p), drawn with `decoding.categorical`
(an inverse-CDF walk, log2(V) uniforms per row), with `jax.random.categorical` (Gumbel-max, V
uniforms per row), and with no draw (what the rest costs). A repeat times each part `--calls`
times (median), in alternating order; the table gives the median over repeats and the share of
the step, sampling / (decode + sampling).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register
from experiments.suites.lm import sized_model, smollm2

COLUMNS = ("part", "rows", "V", "median ms", "range ms", "share of a step")
TOKENS_IN = 4


def parts(batch: int, prompt_length: int, alpha: float, scan_layers: bool = False
          ) -> tuple[dict, int]:
    """name -> a call(key) of one jitted part of a step, and the vocabulary size."""
    from proposals.tokens import filtered_logprobs
    from targets.lm import decoding

    base, params, _ = smollm2()
    model = sized_model(base, prompt_length, 2 * TOKENS_IN, scan_layers)
    eos = (-1,)
    prompt = jax.random.randint(jax.random.key(0), (1, prompt_length), 0, model.vocab_size)
    prefilled = decoding.prefill(model, params, prompt, jnp.array([prompt_length], jnp.int32))
    state = decoding.start(model, prefilled, max_new_tokens=2 * TOKENS_IN, eos_ids=eos,
                           copies=batch)
    fixed = jnp.arange(batch, dtype=jnp.int32) + 100
    zeros = jnp.zeros((batch,), jnp.float32)
    for _ in range(TOKENS_IN):    # the step then attends over a non-empty own cache too
        state = decoding.append(model, params, prefilled, state, fixed, zeros, eos)

    decode = jax.jit(lambda s: decoding.append(model, params, prefilled, s, fixed, zeros, eos))

    def sampling(draw):
        def part(key, logprobs):
            logq_all = filtered_logprobs(logprobs, 1.0 / alpha)
            tokens = draw(key, logq_all).astype(jnp.int32)
            logq = jnp.take_along_axis(logq_all, tokens[:, None], axis=-1)[:, 0]
            return tokens, logq, logsumexp(alpha * logprobs, axis=-1)
        part = jax.jit(part)
        return lambda key: part(key, state.logprobs)

    calls = {
        "decode (decoding.append)": lambda key: decode(state),
        "sampling, decoding.categorical": sampling(decoding.categorical),
        "sampling, jax.random.categorical": sampling(
            lambda key, x: jax.random.categorical(key, x, axis=-1)),
        "sampling without the draw": sampling(lambda key, x: jnp.zeros(x.shape[:1], jnp.int32)),
    }
    return calls, model.vocab_size


def bench(batch: int, prompt_length: int, alpha: float, calls_per_repeat: int,
          repeats: int, scan_layers: bool = False) -> list[dict]:
    calls, vocab_size = parts(batch, prompt_length, alpha, scan_layers)
    key = jax.random.key(1)
    for call in calls.values():               # compile and warm up
        jax.block_until_ready(call(key))
    names = list(calls)
    medians = {name: [] for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        times = {name: [] for name in names}
        for i in range(calls_per_repeat):
            for name in order:
                k = jax.random.fold_in(key, 1000 * r + i)
                start = time.perf_counter()
                jax.block_until_ready(calls[name](k))
                times[name].append(1e3 * (time.perf_counter() - start))
        for name in names:
            medians[name].append(statistics.median(times[name]))
    decode = medians[names[0]]
    rows = []
    for name in names:
        share = None if name == names[0] else statistics.median(
            s / (d + s) for s, d in zip(medians[name], decode))
        rows.append({"part": name, "rows": batch, "V": vocab_size,
                     "ms": statistics.median(medians[name]),
                     "range": (min(medians[name]), max(medians[name])), "share": share})
    return rows


def to_markdown(rows: list[dict]) -> str:
    cells = ([r["part"], str(r["rows"]), str(r["V"]), f"{r['ms']:.1f}",
              f"{r['range'][0]:.1f}-{r['range'][1]:.1f}",
              "-" if r["share"] is None else f"{100 * r['share']:.1f}%"] for r in rows)
    return markdown.table(COLUMNS, cells, [False] + [True] * 5)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--calls", type=int, default=12, help="calls per part and repeat")
    parser.add_argument("--scan-layers", action="store_true",
                        help="compile the layer loop as a scan (quicker to compile, slower to "
                             "run: for smoke tests)")


def run(args: argparse.Namespace) -> str:
    rows = bench(args.batch, args.prompt, args.alpha, args.calls, args.repeats,
                 args.scan_layers)
    caption = (f"Sampling share of a Power-SMC step, SmolLM2-135M-Instruct fp32, alpha = "
               f"{args.alpha}: median over {args.repeats} repeats of the median of {args.calls} "
               f"calls; share = sampling / (decode + sampling) ({jax.devices()[0].platform}).\n\n")
    return caption + to_markdown(rows)


BENCHMARK = register(Benchmark(
    "sampling", "share of a Power-SMC step spent sampling the next token (SmolLM2)",
    add_options, run, quick=["--batch", "2", "--prompt", "8", "--calls", "1", "--repeats", "1",
                               "--scan-layers"],
    repeats=8))

if __name__ == "__main__":
    sys.exit(bench_cli.main(BENCHMARK))
