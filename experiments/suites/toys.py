"""Two experiments with exact answers: `lgssm` (bootstrap filter vs Kalman) and `tempering`
(adaptive tempering on a Gaussian prior times a Gaussian-mixture likelihood).

Each builds its compiled program once per (config, mesh) and reuses it for every seed, so only
the first seed of a configuration pays (and reports) compile time.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import smc
from experiments.harness import report, timing
from experiments.harness.config import param
from experiments.harness.registry import Demo, Experiment, Plan, register
from proposals import mcmc
from targets.toy import gaussian, lgssm

SCHEMES = lambda: sorted(smc.resampling.SCHEMES)
KERNELS = {"rwmh": mcmc.rwmh, "mala": mcmc.mala}
MAX_TRACE = 1000  # traces longer than this are left out of the metrics
MAX_ESS_LINES = 8  # ESS traces drawn in one plot (more are unreadable; the title says so)


def _evidence_metrics(log_z: float, exact: float) -> dict[str, Any]:
    error = log_z - exact
    return {"log_evidence": log_z, "exact_log_evidence": exact, "error": error,
            "abs_error": abs(error),
            # Z_hat / Z: unbiased for 1, so its mean over seeds checks the estimator.
            "evidence_ratio": float(np.exp(np.clip(error, -700.0, 700.0)))}


def _ess_metrics(ess: np.ndarray, num_particles: int) -> dict[str, Any]:
    fraction = ess / num_particles
    metrics = {"ess_min": float(fraction.min()), "ess_mean": float(fraction.mean()),
               "ess_final": float(fraction[-1])}
    if fraction.size <= MAX_TRACE:
        metrics["ess_trace"] = [round(float(v), 5) for v in fraction]
    return metrics


# ---------------------------------------------------------------------------------------------
# lgssm: the bootstrap filter's log-likelihood estimate against the Kalman filter's exact value
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LGSSMConfig:
    num_particles: int = param(1000, "particles N", low=1)
    num_steps: int = param(50, "observations T", low=2)
    ess_threshold: float = param(0.5, "resample when ESS < threshold * N (1: always, 0: never)",
                                 low=0.0, high=1.0)
    resampling: str = param("systematic", "resampling scheme (smc.resampling.get)",
                            choices=SCHEMES)
    data_seed: int = param(0, "seed of the simulated observations (the same for every run seed)",
                           low=0, high=2**32 - 1)


@functools.lru_cache(maxsize=64)
def _lgssm_program(config: LGSSMConfig, mesh: Mesh | None):
    problem = lgssm.default()
    _, observations = lgssm.simulate(jax.random.PRNGKey(config.data_seed), problem,
                                     config.num_steps)
    exact = lgssm.kalman_log_likelihood(problem, np.asarray(observations))
    model = lgssm.bootstrap(problem, observations)
    resampler = smc.resampling.get(config.resampling)

    def program(key):
        result = smc.run(key, model, config.num_particles, resampling=resampler,
                         ess_threshold=config.ess_threshold, mesh=mesh)
        return result.log_evidence, result.ess, result.resampled, result.degenerate

    return timing.jit(program), exact


def run_lgssm(config: LGSSMConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    program, exact = _lgssm_program(config, mesh)
    log_z, ess, resampled, degenerate = program(key)
    resampled = np.asarray(resampled)
    return {**_evidence_metrics(float(log_z), exact),
            **_ess_metrics(np.asarray(ess, np.float64), config.num_particles),
            "num_resampled": int(resampled.sum()),
            "resample_rate": float(resampled.mean()) if resampled.size else 0.0,
            "degenerate": bool(degenerate)}


# ---------------------------------------------------------------------------------------------
# tempering: adaptive tempering from a Gaussian prior to prior x Gaussian-mixture likelihood
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TemperingConfig:
    num_particles: int = param(1000, "particles N", low=1)
    target_ess: float = param(0.5, "each exponent keeps the conditional ESS at this fraction of N",
                              low=0.0, high=1.0, low_open=True)
    num_mcmc_steps: int = param(5, "MH steps per move", low=1)
    step_size: float = param(0.6, "MH step size (RWMH: proposal std; MALA: variance)",
                             low=0.0, low_open=True)
    kernel: str = param("rwmh", "MH kernel", choices=tuple(KERNELS))
    dim: int = param(2, "dimension (2 is targets.toy.gaussian.default)", low=1, high=512)
    resampling: str = param("systematic", "resampling scheme (smc.resampling.get)",
                            choices=SCHEMES)
    max_steps: int = param(100, "most tempering steps", low=1)


def mixture_problem(dim: int) -> gaussian.GaussianMixtureLikelihood:
    """gaussian.default() for dim = 2; otherwise its 2-D pattern repeated along the diagonal
    (means tiled, covariances block-diagonal, the last block cut to 1x1 for odd dim)."""
    base = gaussian.default()
    if dim == 2:
        return base
    means = np.tile(base.means, (1, -(-dim // 2)))[:, :dim]
    covs = np.zeros((len(base.weights), dim, dim))
    for start in range(0, dim, 2):
        size = min(2, dim - start)
        covs[:, start:start + size, start:start + size] = base.covs[:, :size, :size]
    return base._replace(m0=np.zeros(dim), S0=np.eye(dim), means=means, covs=covs)


@functools.lru_cache(maxsize=64)
def _tempering_program(config: TemperingConfig, mesh: Mesh | None):
    problem = mixture_problem(config.dim)
    log_prior, log_lik = gaussian.log_prior(problem), gaussian.log_likelihood(problem)
    sample_prior = gaussian.sample_prior(problem)
    kernel = KERNELS[config.kernel]
    if mesh is not None:  # shard the particle axis; XLA partitions the rest of the run
        sharding = NamedSharding(mesh, PartitionSpec("particles"))
        shard = lambda x: jax.lax.with_sharding_constraint(x, sharding)
    else:
        shard = lambda x: x

    def move(key, x, exponent):
        step = functools.partial(kernel, log_density=lambda z: log_prior(z) + exponent * log_lik(z),
                                 step_size=config.step_size)
        return shard(mcmc.run_chain(key, step, shard(x), config.num_mcmc_steps).x)

    def program(key):
        out = smc.tempering.adaptive(
            key, lambda k, n: shard(sample_prior(k, n)), log_lik, move, config.num_particles,
            target_ess=config.target_ess, resampling=smc.resampling.get(config.resampling),
            max_steps=config.max_steps)
        weights = smc.weights.normalize(out.smc.log_weights)
        mean = weights @ out.smc.particles
        return out.smc.log_evidence, out.smc.ess, out.smc.num_steps, out.exponents, mean

    exact_mean, _ = gaussian.posterior_moments(problem)
    return timing.jit(program), gaussian.log_evidence(problem), exact_mean


def run_tempering(config: TemperingConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    program, exact, exact_mean = _tempering_program(config, mesh)
    log_z, ess, steps, exponents, mean = program(key)
    steps = int(steps)
    exponents = np.asarray(exponents, np.float64)[: steps + 1]
    return {**_evidence_metrics(float(log_z), exact),
            "posterior_mean_error": float(np.linalg.norm(np.asarray(mean, np.float64)
                                                         - exact_mean)),
            "posterior_mean_0": float(mean[0]), "exact_posterior_mean_0": float(exact_mean[0]),
            "num_tempering_steps": steps,
            "reached_posterior": bool(exponents[-1] >= 1.0),
            **_ess_metrics(np.asarray(ess, np.float64)[: steps + 1], config.num_particles),
            "exponents": [round(float(v), 6) for v in exponents]}


def _first_seed_per_config(records: list[dict], metric: str) -> dict[str, dict]:
    """The lowest-seed record of each configuration that has `metric`, keyed by its config."""
    firsts: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: r.get("seed", 0)):
        if metric in record.get("metrics", {}):
            firsts.setdefault(str(sorted(record["config"].items())), record)
    return firsts


def _label(record: dict, keys: list[str]) -> str:
    """The legend label of a configuration: its values of the keys that vary between records."""
    config = record["config"]
    return report.series_label({k: config.get(k) for k in keys}) or \
        f"N={config.get('num_particles')}"


def _save(fig, path) -> list:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def plot_schedules(records: list[dict], out_dir) -> list:
    """The exponent schedule lambda_t of the first seed of each configuration."""
    import matplotlib.pyplot as plt

    firsts = _first_seed_per_config(records, "exponents")
    if not firsts:
        return []
    keys = report.varying_keys(list(firsts.values()))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for record in sorted(firsts.values(), key=lambda r: r["config"].get("num_particles", 0)):
        exps = record["metrics"]["exponents"]
        ax.plot(range(len(exps)), exps, marker="o", ms=3, label=_label(record, keys))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("tempering step t")
    ax.set_ylabel("exponent $\\lambda_t$")
    ax.set_title("adaptive tempering schedule (first seed)")
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "tempering_schedule.png")


def plot_ess(records: list[dict], out_dir) -> list:
    """ESS / N over time for the first seed of each configuration."""
    import matplotlib.pyplot as plt

    firsts = _first_seed_per_config(records, "ess_trace")
    if not firsts:
        return []
    keys = report.varying_keys(list(firsts.values()))
    shown = list(firsts.values())[:MAX_ESS_LINES]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for record in shown:
        ax.plot(record["metrics"]["ess_trace"], lw=1, label=_label(record, keys))
    ax.set_xlabel("time step t")
    ax.set_ylabel("ESS / N")
    ax.set_ylim(0, 1.05)
    left_out = f"; {len(shown)} of {len(firsts)} configs" if len(shown) < len(firsts) else ""
    ax.set_title(f"bootstrap filter: ESS over time (first seed{left_out})")
    ax.legend(fontsize=7)
    return _save(fig, out_dir / "lgssm_ess.png")


register(Experiment(
    name="lgssm",
    description="bootstrap particle filter on a linear-Gaussian state-space model: log Z vs the "
                "exact Kalman value",
    config_type=LGSSMConfig,
    run=run_lgssm,
    summary_metrics=("log_evidence", "exact_log_evidence", "abs_error", "evidence_ratio",
                     "ess_min", "resample_rate"),
    plots=plot_ess,
    demo=Demo(
        full=Plan(grid={"num_particles": [64, 256, 1024, 4096, 16384],
                        "resampling": ["multinomial", "systematic"]},
                  seeds=tuple(range(20))),
        quick=Plan(grid={"num_particles": [32, 128]}, seeds=(0, 1),
                   overrides={"num_steps": 10}),
        columns=("log_evidence", "exact_log_evidence", "abs_error", "evidence_ratio"),
    ),
))

register(Experiment(
    name="tempering",
    description="adaptive tempering from a Gaussian prior to a Gaussian-mixture likelihood: "
                "log Z and posterior mean vs exact",
    config_type=TemperingConfig,
    run=run_tempering,
    summary_metrics=("log_evidence", "exact_log_evidence", "abs_error", "posterior_mean_error",
                     "num_tempering_steps"),
    plots=plot_schedules,
    demo=Demo(
        full=Plan(grid={"num_particles": [64, 256, 1024, 4096]}, seeds=tuple(range(10)),
                  overrides={"target_ess": 0.8}),
        quick=Plan(grid={"num_particles": [32, 128]}, seeds=(0, 1),
                   overrides={"num_mcmc_steps": 2}),
        columns=("log_evidence", "exact_log_evidence", "abs_error", "posterior_mean_error",
                 "num_tempering_steps"),
        plot_metrics=("abs_error", "posterior_mean_error"),
    ),
))
