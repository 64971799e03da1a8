"""Adaptive tempered SMC: ours (`smc.tempering.adaptive`) vs blackjax's `adaptive_tempered_smc`.

    python -m experiments bench tempering [--sizes 1000 4000] [--replicates 30] [--out f.md]

Same problem for both: `targets.toy.gaussian.anisotropic(dim)` (standard normal prior, a tight,
rotated, off-centre Gaussian-mixture likelihood), whose log Z is exact. Same algorithm settings:
N particles, target ESS, systematic resampling at every step (ours: ess_threshold=1), and the same
move, `num_mcmc_steps` random-walk MH steps with an isotropic Gaussian proposal of standard
deviation `step_size` on prior * L^lambda (ours: `proposals.mcmc.rwmh` through `run_chain`;
blackjax: `additive_step_random_walk` with `normal(step_size)`).

Each side runs as one jitted function (blackjax's step inside a `lax.while_loop` until lambda = 1,
log Z = the sum of `info.log_likelihood_increment`), compiled and warmed up before timing. Every
replicate is one timed call with a fresh key, round-robin between the two libraries so that load
from other processes hits both alike; time is the median, error the mean of |log Z_hat - log Z|
over replicates with its standard error. "time / blackjax" is the median over replicates of the
ratio of the two times on the same key.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import smc
from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register
from proposals import mcmc
from targets.toy import gaussian

COLUMNS = ("target ESS", "N", "library", "steps", "median ms", "mean abs log Z error",
           "mean log Z error", "time / blackjax")


class Problem:
    """The target and the shared settings of both samplers."""

    def __init__(self, dim: int = 8, step_size: float = 0.1, num_mcmc_steps: int = 10,
                 target_ess: float = 0.5, max_steps: int = 200):
        self.model = gaussian.anisotropic(dim)
        self.exact_log_z = gaussian.log_evidence(self.model)
        self.log_prior = gaussian.log_prior(self.model)
        self.log_likelihood = gaussian.log_likelihood(self.model)
        self.sample_prior = gaussian.sample_prior(self.model)
        self.step_size = step_size
        self.num_mcmc_steps = num_mcmc_steps
        self.target_ess = target_ess
        self.max_steps = max_steps


def ours(problem: Problem, num_particles: int):
    """jitted key -> (log Z_hat, number of tempering steps)."""
    log_prior, log_likelihood = problem.log_prior, problem.log_likelihood

    def move(key, x, exponent):
        def log_density(z):
            return log_prior(z) + exponent * log_likelihood(z)

        kernel = functools.partial(mcmc.rwmh, log_density=log_density,
                                   step_size=problem.step_size)
        return mcmc.run_chain(key, kernel, x, problem.num_mcmc_steps).x

    @jax.jit
    def run(key):
        result = smc.tempering.adaptive(
            key, problem.sample_prior, log_likelihood, move, num_particles,
            target_ess=problem.target_ess, resampling=smc.resampling.systematic,
            ess_threshold=1.0, max_steps=problem.max_steps)
        return result.smc.log_evidence, result.smc.num_steps

    return run


def blackjax_sampler(problem: Problem, num_particles: int):
    """jitted key -> (log Z_hat, number of tempering steps), blackjax in one lax.while_loop."""
    import blackjax
    from blackjax.mcmc import random_walk
    from blackjax.smc import resampling

    kernel = blackjax.additive_step_random_walk.build_kernel()
    proposal = random_walk.normal(jnp.asarray(problem.step_size, jnp.float32))

    def mcmc_step_fn(key, state, logdensity_fn):
        return kernel(key, state, logdensity_fn, proposal)

    sampler = blackjax.adaptive_tempered_smc(
        problem.log_prior, problem.log_likelihood, mcmc_step_fn,
        blackjax.additive_step_random_walk.init, {}, resampling.systematic,
        problem.target_ess, num_mcmc_steps=problem.num_mcmc_steps)

    @jax.jit
    def run(key):
        key_init, key_loop = jax.random.split(key)
        state = sampler.init(problem.sample_prior(key_init, num_particles))
        state = state._replace(tempering_param=jnp.asarray(0.0, jnp.float32))

        def cond(carry):
            _, state, _, steps = carry
            return (state.tempering_param < 1.0) & (steps < problem.max_steps)

        def body(carry):
            key, state, log_z, steps = carry
            key, key_step = jax.random.split(key)
            state, info = sampler.step(key_step, state)
            return key, state, log_z + info.log_likelihood_increment, steps + 1

        start = (key_loop, state, jnp.asarray(0.0, jnp.float32), jnp.asarray(0, jnp.int32))
        _, _, log_z, steps = jax.lax.while_loop(cond, body, start)
        return log_z, steps

    return run


def _timed(fn, key) -> tuple[float, float, int]:
    start = time.perf_counter()
    log_z, steps = jax.block_until_ready(fn(key))
    return 1e3 * (time.perf_counter() - start), float(log_z), int(steps)


def bench(num_particles: int, replicates: int, problem: Problem, seed: int = 0) -> list[dict]:
    """One row per library at this N."""
    samplers = {"ours": ours(problem, num_particles),
                "blackjax": blackjax_sampler(problem, num_particles)}
    keys = jax.random.split(jax.random.key(seed), replicates + 1)
    for fn in samplers.values():  # compile and warm up
        jax.block_until_ready(fn(keys[0]))
    records = {name: [] for name in samplers}
    for r in range(1, replicates + 1):
        order = list(samplers) if r % 2 else list(reversed(samplers))
        for name in order:
            records[name].append(_timed(samplers[name], keys[r]))
    rows = []
    for name, record in records.items():
        ms, log_z, steps = (np.array(column, np.float64) for column in zip(*record))
        errors = np.abs(log_z - problem.exact_log_z)
        rows.append({
            "target_ess": problem.target_ess, "N": num_particles, "library": name,
            "steps": float(steps.mean()),
            "ms": statistics.median(ms.tolist()),
            "abs_error": float(errors.mean()),
            "abs_error_se": float(errors.std(ddof=1) / np.sqrt(errors.size)) if errors.size > 1
            else float("nan"),
            "bias": float(log_z.mean() - problem.exact_log_z),
            "finite": bool(np.all(np.isfinite(log_z))),
        })
    # Paired: each replicate's time over blackjax's on the same key, timed back to back, so that
    # slow drifts in the load of this shared machine cancel; the median of those ratios.
    base = [ms for ms, _, _ in records["blackjax"]]
    for row, record in zip(rows, records.values()):
        row["ratio"] = statistics.median(ms / b for (ms, _, _), b in zip(record, base))
    return rows


def to_markdown(rows: list[dict]) -> str:
    cells = ([str(row["target_ess"]), str(row["N"]), row["library"], f"{row['steps']:.1f}",
              f"{row['ms']:.1f}", f"{row['abs_error']:.3f} ± {row['abs_error_se']:.3f}",
              f"{row['bias']:+.3f}", f"{row['ratio']:.2f}"] for row in rows)
    return markdown.table(COLUMNS, cells, [True, True, False] + [True] * 5)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--replicates", type=int, default=40)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--step-size", type=float, default=0.1)
    parser.add_argument("--mcmc-steps", type=int, default=10)
    parser.add_argument("--target-ess", type=float, nargs="+", default=[0.5, 0.8])


def run(args: argparse.Namespace) -> str:
    problems = [Problem(args.dim, args.step_size, args.mcmc_steps, ess) for ess in args.target_ess]
    rows = [row for problem in problems for n in args.sizes
            for row in bench(n, args.replicates, problem)]
    caption = (
        f"Adaptive tempered SMC: d = {args.dim} Gaussian prior x anisotropic "
        f"Gaussian-mixture likelihood (exact log Z = {problems[0].exact_log_z:.3f}), "
        f"systematic resampling every step, {args.mcmc_steps} RWMH steps "
        f"(scale {args.step_size}) per SMC step; median wall time and mean |log Z_hat - log Z| "
        f"(± s.e.) and mean log Z_hat - log Z over {args.replicates} replicates "
        f"({jax.devices()[0].platform}).\n\n")
    return caption + to_markdown(rows)


BENCHMARK = register(Benchmark(
    "tempering", "adaptive tempered SMC: ours vs blackjax, time and log Z error",
    add_options, run,
    quick=["--sizes", "64", "--replicates", "2", "--dim", "3", "--target-ess", "0.5"]))

if __name__ == "__main__":
    sys.exit(bench_cli.main(BENCHMARK))
