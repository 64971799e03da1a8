"""SMC overhead: a full `smc.run` over bare propagation of the same particles with the same model.

    python -m experiments bench overhead [--particles 4096] [--steps 100] [--dim 32] [--out f.md]

Model: the bootstrap filter of a linear-Gaussian state-space model (`targets.toy.lgssm`) with a
d-dimensional state, a dense transition F = 0.95 x (a random rotation), Q = 0.1 I, and k = d / 8
noisy random projections observed per step (R = 4 I); observations simulated from the model. With
d = 32 and N = 4096 the filter is healthy (log Z within about 1 of the Kalman value) and resamples
at about half of the steps when ess_threshold = 0.5.

Bare propagation runs the same `model.init` and `model.step` in a `lax.scan` and keeps only the
particles and the sum of the log-potentials (so that the potentials, part of the model, are not
optimised away): no weights, no ESS, no log Z, no resampling. SMC is `smc.run` with systematic
resampling at each ess_threshold. Both are jitted and warmed up; each time is the median over
repeats taken round-robin, so that load from other processes hits all alike, and the ratio is the
median over repeats of SMC time / bare time within each repeat; the ratio of the fastest times is
given too (the least disturbed by other load).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import smc
from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register
from targets.toy import lgssm

COLUMNS = ("model", "N", "T", "ess_threshold", "resampled steps", "bare ms", "SMC ms",
           "SMC / bare", "min SMC / min bare")


def make_model(dim: int, num_steps: int, seed: int = 0) -> tuple[lgssm.LGSSM, smc.FeynmanKac]:
    """A d-dimensional LGSSM with dense rotation dynamics and its bootstrap filter for T steps."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    obs_dim = max(1, dim // 8)
    params = lgssm.LGSSM(
        m0=np.zeros(dim), P0=np.eye(dim), F=0.95 * rotation, Q=0.1 * np.eye(dim),
        H=rng.standard_normal((obs_dim, dim)) / np.sqrt(dim), R=4.0 * np.eye(obs_dim))
    # T steps after the initial weighting: T + 1 observations.
    _, observations = lgssm.simulate(jax.random.key(seed), params, num_steps + 1)
    return params, lgssm.bootstrap(params, observations)


def bare_propagation(model: smc.FeynmanKac, num_particles: int):
    """jitted key -> (particles, summed log-potentials): the model alone, no SMC."""
    @jax.jit
    def run(key):
        key_init, key_loop = jax.random.split(key)
        particles, log_potentials = model.init(key_init, num_particles)
        keys = jax.random.split(key_loop, model.num_steps)

        def body(carry, inputs):
            particles, total = carry
            key, t = inputs
            particles, log_potentials = model.step(key, particles, t)
            return (particles, total + log_potentials), None

        steps = jnp.arange(model.num_steps, dtype=jnp.int32)
        (particles, total), _ = jax.lax.scan(body, (particles, log_potentials), (keys, steps))
        return particles, total

    return run


def smc_run(model: smc.FeynmanKac, num_particles: int, ess_threshold: float):
    @jax.jit
    def run(key):
        result = smc.run(key, model, num_particles, resampling=smc.resampling.systematic,
                         ess_threshold=ess_threshold)
        return result.particles, result.log_evidence, jnp.sum(result.resampled)

    return run


def timed_call(fn, key) -> tuple[float, object]:
    """(ms, output) of one blocking call."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(key))
    return 1e3 * (time.perf_counter() - start), out


def bench(num_particles: int, num_steps: int, dim: int, thresholds: list[float], repeats: int,
          seed: int = 0) -> list[dict]:
    """One row per ess_threshold; the bare time is shared."""
    _, model = make_model(dim, num_steps, seed)
    calls = {"bare": bare_propagation(model, num_particles)}
    for threshold in thresholds:
        calls[threshold] = smc_run(model, num_particles, threshold)
    keys = jax.random.split(jax.random.key(seed + 1), repeats + 1)
    for fn in calls.values():
        jax.block_until_ready(fn(keys[0]))
    times = {name: [] for name in calls}
    resampled = {threshold: [] for threshold in thresholds}
    names = list(calls)
    for r in range(1, repeats + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            ms, out = timed_call(calls[name], keys[r])
            times[name].append(ms)
            if name != "bare":
                resampled[name].append(int(out[2]))
    bare = statistics.median(times["bare"])
    rows = []
    for threshold in thresholds:
        ms = statistics.median(times[threshold])
        # Paired: each SMC time over the bare time of the same repeat, taken back to back, so that
        # slow drifts in the load of this shared machine cancel; the median of those ratios.
        ratio = statistics.median(s / b for s, b in zip(times[threshold], times["bare"]))
        rows.append({"model": f"LGSSM bootstrap, d={dim}, dense F", "N": num_particles,
                     "T": num_steps, "ess_threshold": threshold,
                     "resampled": float(np.mean(resampled[threshold])), "bare_ms": bare,
                     "smc_ms": ms, "ratio": ratio,
                     "min_ratio": min(times[threshold]) / min(times["bare"])})
    return rows


def to_markdown(rows: list[dict]) -> str:
    cells = ([row["model"], str(row["N"]), str(row["T"]), str(row["ess_threshold"]),
              f"{row['resampled']:.1f}", f"{row['bare_ms']:.1f}", f"{row['smc_ms']:.1f}",
              f"{row['ratio']:.2f}", f"{row['min_ratio']:.2f}"] for row in rows)
    return markdown.table(COLUMNS, cells, [False] + [True] * 8)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--particles", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 1.0])


def run(args: argparse.Namespace) -> str:
    rows = bench(args.particles, args.steps, args.dim, args.thresholds, args.repeats)
    caption = (
        f"SMC overhead: `smc.run` (systematic resampling when ESS < threshold x N) "
        f"over bare propagation (the same `model.step` in a `lax.scan`, no weights); median "
        f"ms over {args.repeats} repeats, ratio = median of the per-repeat ratios, and the "
        f"ratio of the fastest runs ({jax.devices()[0].platform}).\n\n")
    return caption + to_markdown(rows)


BENCHMARK = register(Benchmark(
    "overhead", "SMC overhead: smc.run over bare propagation of the same LGSSM particles",
    add_options, run,
    quick=["--particles", "64", "--steps", "5", "--dim", "8", "--repeats", "1"], repeats=31))

if __name__ == "__main__":
    sys.exit(bench_cli.main(BENCHMARK))
