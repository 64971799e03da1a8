"""FKC overhead: FKC SMC over the bare reverse SDE with the same score, particles and steps.

    python -m experiments bench fkc [--score toy|digits] [--sizes 256 1024 4096 16384]
                                    [--steps 100] [--beta 2] [--repeats 21] [--out f.md]

Target: p^beta under the VP schedule (`sde.time_grid(steps)`) for one of two scores: `toy`, the
exact noised score of `gmm.four_modes()` (2-D, analytic: about as cheap as a score gets, so the
engine's fixed per-step work shows most), or `digits`, the shipped score network of
`experiments.suites.digits` (64-D Flax MLP, unconditional): the cost of a real model. FKC is
`smc.run` on `fkc.anneal` (`overhead.smc_run`: systematic resampling when ESS < threshold x N,
thresholds 0.5 and 1.0 = always). The bare sampler is the reverse SDE that FKC's proposal is,
Euler-Maruyama with the drift -f + beta g^2 s (`fkc.drift`, `proposals.sde.euler_maruyama`) in a
`lax.scan`: no weights, no ESS, no log Z, no resampling.
Both are jitted and warmed up; repeats run round-robin (the order rotating) so that load from
other processes hits all alike; the ratio is the median over repeats of FKC time / bare time
within each repeat, with the ratio of the fastest times beside it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.overhead import smc_run, timed_call
from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register
from proposals import sde as sde_proposals
from targets.diffusion import fkc, sde
from targets.toy import gmm

COLUMNS = ("score", "N", "steps", "ess_threshold", "resampled steps", "bare ms", "FKC ms",
           "FKC / bare", "min FKC / min bare")
VP = sde.VP()


def bare_sampler(score: sde.ScoreFn, beta: float, times: np.ndarray, num_particles: int,
                 dim: int = 2) -> Callable[[jax.Array], jax.Array]:
    """jitted key -> x [N, d]: the reverse SDE of FKC's annealing proposal, without weights."""
    ts = jnp.asarray(times[:-1], jnp.float32)
    dtaus = jnp.asarray(times[:-1] - times[1:], jnp.float32)
    betas = jnp.asarray([beta], jnp.float32)
    init_std = float(np.sqrt(VP.sigma2(times[0]) / beta))

    @jax.jit
    def run(key):
        key_init, key_loop = jax.random.split(key)
        x = init_std * jax.random.normal(key_init, (num_particles, dim), jnp.float32)

        def body(x, inputs):
            key, t, dtau = inputs
            g2 = sde.g2(VP, t)
            mean_drift = fkc.drift(sde.f(VP, x, t), g2, score(x, t)[None], betas)
            return sde_proposals.euler_maruyama(key, x, mean_drift, jnp.sqrt(g2), dtau)[0], None

        keys = jax.random.split(key_loop, len(ts))
        return jax.lax.scan(body, x, (keys, ts, dtaus))[0]

    return run


def paired_times(calls: dict, keys: jax.Array) -> tuple[dict, dict]:
    """(ms, outputs) of each call for keys[1:], round-robin with a rotating order (so that
    drifts in the machine's load hit every call alike); keys[0] warms up."""
    for fn in calls.values():
        jax.block_until_ready(fn(keys[0]))
    times: dict = {name: [] for name in calls}
    outputs: dict = {name: [] for name in calls}
    names = list(calls)
    for r in range(1, len(keys)):
        for name in names[r % len(names):] + names[:r % len(names)]:
            ms, out = timed_call(calls[name], keys[r])
            times[name].append(ms)
            outputs[name].append(out)
    return times, outputs


def score_model(name: str) -> tuple[sde.ScoreFn, int]:
    """(score, dim) of the benchmark's score: "toy" or "digits"."""
    if name == "toy":
        return gmm.noised_score(gmm.four_modes(), VP), 2
    if name == "digits":
        from experiments.suites.digits import data, networks
        eps_net, eps_params, _, _ = networks.load()
        return networks.score(eps_net, eps_params, VP), data.DIM
    raise ValueError(f"unknown score {name!r}: use 'toy' or 'digits'")


def bench(num_particles: int, num_steps: int, beta: float, thresholds: list[float],
          repeats: int, seed: int = 0, score_name: str = "toy") -> list[dict]:
    """One row per ess_threshold; the bare time is shared."""
    times = sde.time_grid(num_steps)
    score, dim = score_model(score_name)
    model = fkc.anneal(score, beta, schedule=VP, times=times, dim=dim)
    calls = {"bare": bare_sampler(score, beta, times, num_particles, dim)}
    calls.update({threshold: smc_run(model, num_particles, threshold)
                  for threshold in thresholds})
    ms, outputs = paired_times(calls, jax.random.split(jax.random.key(seed), repeats + 1))
    rows = []
    for threshold in thresholds:
        # Paired: each FKC time over the bare time of the same repeat, taken back to back.
        ratio = statistics.median(f / b for f, b in zip(ms[threshold], ms["bare"]))
        rows.append({"score": score_name, "N": num_particles, "steps": num_steps,
                     "ess_threshold": threshold,
                     "resampled": float(np.mean([int(out[2]) for out in outputs[threshold]])),
                     "bare_ms": statistics.median(ms["bare"]),
                     "fkc_ms": statistics.median(ms[threshold]), "ratio": ratio,
                     "min_ratio": min(ms[threshold]) / min(ms["bare"])})
    return rows


def to_markdown(rows: list[dict]) -> str:
    cells = ([row["score"], str(row["N"]), str(row["steps"]), str(row["ess_threshold"]),
              f"{row['resampled']:.1f}", f"{row['bare_ms']:.2f}", f"{row['fkc_ms']:.2f}",
              f"{row['ratio']:.2f}", f"{row['min_ratio']:.2f}"] for row in rows)
    return markdown.table(COLUMNS, cells, [False] + [True] * (len(COLUMNS) - 1))


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--score", choices=("toy", "digits"), nargs="+", default=["toy"],
                        help="toy: the 2-D mixture's exact score; digits: the score network")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 1.0])


def run(args: argparse.Namespace) -> str:
    rows = [row for name in args.score for n in args.sizes
            for row in bench(n, args.steps, args.beta, args.thresholds, args.repeats,
                             score_name=name)]
    caption = (
        f"FKC overhead: FKC SMC (`fkc.anneal`, beta = {args.beta}; score `toy` = "
        f"the 4-mode 2-D mixture's exact score, `digits` = the 64-D digits score network; "
        f"systematic resampling when ESS < threshold x N) over the "
        f"bare reverse SDE (the same drift, score, N and steps; no weights, no resampling); "
        f"median ms over {args.repeats} repeats, ratio = median of the per-repeat ratios, and the "
        f"ratio of the fastest runs ({jax.devices()[0].platform}).\n\n")
    return caption + to_markdown(rows)


BENCHMARK = register(Benchmark(
    "fkc", "FKC overhead: FKC SMC over the bare reverse SDE (toy or digits score)",
    add_options, run,
    quick=["--sizes", "64", "--steps", "5", "--repeats", "1", "--thresholds", "1.0"],
    repeats=21))

if __name__ == "__main__":
    sys.exit(bench_cli.main(BENCHMARK))
