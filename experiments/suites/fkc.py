"""FKC experiments on 2-D Gaussian mixtures with exact answers: `fkc_anneal`, `fkc_product`,
`fkc_cfg` (Feynman-Kac Correctors, targets/diffusion/fkc.py; docs/algorithms.md section 2).

Each runs FKC SMC with the exact noised scores of `targets.toy.gmm` (VP schedule, Euler-Maruyama
on `sde.time_grid(num_steps)`) and, with `corrected=false`, the baseline of docs/algorithms.md section 7:
the same drift with the weights ignored (no resampling). Both evaluate every expert's score
N x num_steps times (`score_evals`): equal compute, the weights cost no score evaluation.

The exact target is the final time's p ~ prod_k q_{k, t_min}^{beta_k} (t_min = 1e-3, where the
noised mixtures differ from the data by a variance of 1e-4), discretised on a fine 2-D grid
(`gmm.on_grid`, midpoint rule): mode weights, within-mode spread and mean are sums over the grid
(no sampling noise), and the sliced-Wasserstein reference is 8192 exact draws from the grid (a cell
by its mass, then uniform within it; cells a tenth of the narrowest mode's standard deviation),
fixed per target. `sw_floor` is the distance to that reference of N exact draws (picked from a
separate pool of 65536): what a perfect sampler of N equally weighted points would score. Metrics:

- sw, sw_floor: sliced Wasserstein-1 (64 directions) of the weighted particles / of exact draws.
- mode_tv: total variation between the particles' and the exact mass of each mode (points go to
  the nearest component mean of `modes`); mode_weights, exact_mode_weights: those masses.
- spread, exact_spread, spread_ratio: mean squared distance to the nearest mode mean, per
  coordinate (the annealed width: an uncorrected drift is too narrow for beta > 1).
- mean_error: |weighted mean - exact mean|.
- log_evidence, exact_log_evidence, error (FKC only): log Z_hat against log int p_{t_min} -
  log int p_{t_0}, both on grids. FKC starts from the prior N(0, sigma_{t_0}^2 / sum beta),
  the normalised p_{t_0} up to the means' alpha_{t_0} = 0.0066 scaling, so log Z_hat estimates
  this difference up to Euler's discretisation bias, O(1/num_steps) and large when sum beta > 1
  (for a Gaussian annealed to beta = 3: +5.0, +1.0, +0.23 nats at 100, 400, 1600 steps).
- ess_final (ESS / N of the weights used; 1 without weights), num_resampled, nonfinite_increments,
  degenerate, particles_sample (256 points drawn by weight, for the scatter plots).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import smc
from experiments.harness import timing
from experiments.harness.config import param
from experiments.harness.registry import Demo, Experiment, Plan, register
from targets.diffusion import fkc, sde
from targets.toy import distance, gmm

VP = sde.VP()
SCHEMES = lambda: sorted(smc.resampling.SCHEMES)
REFERENCE_SIZE = 8192    # exact draws the sliced-Wasserstein distance compares with
POOL_SIZE = 65536        # exact draws the floor picks N of
NUM_PROJECTIONS = 64
SAMPLE_SIZE = 256        # particles kept in the record for the scatter plots
UNEVEN = (0.4, 0.3, 0.2, 0.1)

# fkc_product's experts and fkc_cfg's classes: overlapping modes, so the corrections matter.
PRODUCT_A = ((0.7, 0.3), ((-1.0, 0.0), (1.5, 0.5)), (0.8, 0.6))
PRODUCT_B = ((0.5, 0.5), ((0.0, -1.0), (0.5, 1.2)), (0.7, 0.7))
CLASSES = ((0.5, 0.5), ((0.75, 0.0), (-0.75, 0.0)), 0.6)   # class 0 is the guided one


class Problem(NamedTuple):
    """Target prod_k q_k^{beta_k} of 2-D mixtures; `modes` partitions the plane (nearest mean);
    [low, high]^2 holds the final target's mass."""

    experts: tuple[gmm.GaussianMixture, ...]
    betas: tuple[float, ...]
    modes: gmm.GaussianMixture
    low: float
    high: float

    def log_density(self, t) -> Callable[[jax.Array], jax.Array]:
        """x [M, 2] -> sum_k beta_k log q_{k, t}(x), [M]."""
        alpha, sigma = float(sde.alpha(VP, t)), float(sde.sigma(VP, t))
        return lambda x: sum(b * gmm.log_prob(gmm.noised(e, alpha, sigma), x)
                             for b, e in zip(self.betas, self.experts))


class Exact(NamedTuple):
    """The final target: mass per mode [K], spread, mean [2] (grid sums), exact draws reference
    [8192, 2] and an independent pool [65536, 2] of them, log_evidence = log int p_{t_min} -
    log int p_{t_0}."""

    mode_weights: jax.Array
    spread: jax.Array
    mean: jax.Array
    reference: jax.Array
    pool: jax.Array
    log_evidence: float


def spread(modes: gmm.GaussianMixture, x: jax.Array, weights: jax.Array) -> jax.Array:
    """sum_i W_i ||x_i - mu_{nearest mode}||^2 / d: the pooled within-mode variance."""
    centred = x - modes.means[gmm.nearest_mode(modes, x)]
    return jnp.sum(weights * jnp.sum(centred**2, -1)) / (jnp.sum(weights) * x.shape[-1])


def sample_grid(rng: np.random.Generator, grid: gmm.Grid, cell: float, n: int) -> jax.Array:
    """n exact draws of the grid's density (cells of side `cell`): a cell by its mass, then
    uniform within it, [n, 2]."""
    probs = np.asarray(grid.probs, np.float64)
    cells = rng.choice(probs.size, n, p=probs / probs.sum())
    jitter = rng.uniform(-0.5, 0.5, (n, 2)) * cell
    return jnp.asarray(np.asarray(grid.points)[cells] + jitter, jnp.float32)


def _chunked(log_density: Callable[[jax.Array], jax.Array], chunks: int = 8):
    """log_density over x [M, 2] in `chunks` pieces (M divisible): bounded memory for big K."""
    return lambda x: jax.lax.map(log_density, x.reshape(chunks, -1, 2)).reshape(-1)


@jax.jit
def _grid_summaries(points: jax.Array, probs: jax.Array, modes: gmm.GaussianMixture):
    return gmm.mode_weights(modes, points, probs), spread(modes, points, probs), probs @ points


def exact_target(problem: Problem, times: np.ndarray) -> Exact:
    """The grid summaries of the target at times[-1] and the evidence ratio from times[0].

    Cells of a tenth of the narrowest target mode's standard deviation (at most 1000^2 cells):
    the midpoint rule and the uniform draws within cells are then off by about h^2 / 12 in
    variance, 0.1% (0.2% for forty_modes at beta = 3).
    """
    smallest = min(float(np.sqrt(np.linalg.eigvalsh(np.asarray(e.covs)).min())) for e in
                   problem.experts) / math.sqrt(max(sum(problem.betas), max(problem.betas)))
    num = 8 * int(np.clip(np.ceil((problem.high - problem.low) / smallest * 10 / 8), 50, 125))
    grid = gmm.on_grid(_chunked(problem.log_density(times[-1])), problem.low, problem.high, num)
    points, probs = grid.points, grid.probs
    # The start: every noised law is within alpha_{t_0} |mu| of N(0, sigma^2 I) there.
    reach = 12.0 * float(sde.sigma(VP, times[0])) / math.sqrt(sum(problem.betas))
    shift = float(sde.alpha(VP, times[0])) * max(float(jnp.abs(e.means).max())
                                                for e in problem.experts)
    start = gmm.on_grid(problem.log_density(times[0]), -reach - shift, reach + shift, 400)
    rng = np.random.default_rng(0)     # fixed: one reference per target, the same every run
    cell = (problem.high - problem.low) / num
    return Exact(*_grid_summaries(points, probs, problem.modes),
                 sample_grid(rng, grid, cell, REFERENCE_SIZE),
                 sample_grid(rng, grid, cell, POOL_SIZE),
                 float(grid.log_normaliser - start.log_normaliser))


@jax.jit
def cloud_metrics(key: jax.Array, x: jax.Array, weights: jax.Array, exact: Exact,
                  modes: gmm.GaussianMixture) -> dict[str, jax.Array]:
    """Distances of weighted particles x [N, 2] (weights [N], normalised) to the exact target."""
    key_sw, key_floor, key_keep = jax.random.split(key, 3)
    floor = exact.pool[jax.random.randint(key_floor, (x.shape[0],), 0, exact.pool.shape[0])]
    sw = lambda points, w: distance.sliced_wasserstein(key_sw, points, exact.reference, w,
                                                        num_projections=NUM_PROJECTIONS)
    mass = gmm.mode_weights(modes, x, weights)
    kept = jax.random.choice(key_keep, x.shape[0], (SAMPLE_SIZE,), p=weights)
    within = spread(modes, x, weights)
    return {"sw": sw(x, weights), "sw_floor": sw(floor, None),
            "mode_tv": 0.5 * jnp.sum(jnp.abs(mass - exact.mode_weights)),
            "spread": within, "exact_spread": exact.spread,
            "spread_ratio": within / exact.spread,
            "mean_error": jnp.linalg.norm(weights @ x - exact.mean),
            "mode_weights": mass, "exact_mode_weights": exact.mode_weights,
            "particles_sample": x[kept]}


def sampler(model: smc.FeynmanKac, num_particles: int, corrected: bool, ess_threshold: float,
            resampling: str, mesh: Mesh | None) -> timing.jit:
    """key -> (particles, weights used, log Z_hat, final ESS / N, resamples, NaN count, dead)."""
    threshold = ess_threshold if corrected else 0.0
    resampler = smc.resampling.get(resampling)

    def program(key):
        result = smc.run(key, model, num_particles, resampling=resampler,
                         ess_threshold=threshold, mesh=mesh)
        uniform = jnp.full(num_particles, 1.0 / num_particles)
        weights = result.weights if corrected else uniform
        ess = 1.0 / (num_particles * jnp.sum(weights**2))
        return (result.particles, weights, result.log_evidence, ess,
                jnp.sum(result.resampled), jnp.sum(result.nonfinite_increments), result.degenerate)

    return timing.jit(program)


def run_problem(program: timing.jit, problem: Problem, exact: Exact, key: jax.Array,
                corrected: bool, score_evals: int) -> dict[str, Any]:
    """Run the sampler for `key` and measure its output against the exact target."""
    key_run, key_metrics = jax.random.split(key)
    x, weights, log_z, ess, resampled, nans, degenerate = program(key_run)
    metrics = {name: np.asarray(v) for name, v in
               cloud_metrics(key_metrics, x, weights, exact, problem.modes).items()}
    out: dict[str, Any] = {
        name: float(v) for name, v in metrics.items() if v.ndim == 0}
    out.update(mode_weights=[round(float(v), 5) for v in metrics["mode_weights"]],
               exact_mode_weights=[round(float(v), 5) for v in metrics["exact_mode_weights"]],
               particles_sample=np.round(metrics["particles_sample"], 4).tolist())
    if corrected:
        out.update(log_evidence=float(log_z), exact_log_evidence=exact.log_evidence,
                   error=float(log_z) - exact.log_evidence)
    out.update(ess_final=float(ess), num_resampled=int(resampled), nonfinite_increments=int(nans),
               degenerate=bool(degenerate), score_evals=score_evals)
    return out


# ---------------------------------------------------------------------------------------------
# fkc_anneal: p^beta of a 2-D mixture
# ---------------------------------------------------------------------------------------------


def _shared(name: str):
    """A fresh field for one of the keys every FKC config has (a Field cannot be shared)."""
    return {
        "num_particles": lambda: param(1024, "particles N", low=1),
        "num_steps": lambda: param(100, "reverse Euler-Maruyama steps on [1e-3, 1]", low=1),
        "corrected": lambda: param(True, "FKC weights and resampling; false: the same drift, "
                                         "weights ignored (the uncorrected baseline)"),
        "ess_threshold": lambda: param(0.5, "resample when ESS < threshold * N (1: always, "
                                            "0: never)", low=0.0, high=1.0),
        "resampling": lambda: param("systematic", "resampling scheme (smc.resampling.get)",
                                    choices=SCHEMES),
    }[name]()


@dataclasses.dataclass(frozen=True)
class AnnealConfig:
    mixture: str = param("four_modes", "data: four_modes (means (+-1.5, +-1.5), std 0.4) or "
                         "forty_modes (means in [-40, 40]^2, std 1.31)",
                         choices=("four_modes", "forty_modes"))
    uneven_weights: bool = param(False, "four_modes weighted 0.4, 0.3, 0.2, 0.1 (else equal)")
    beta: float = param(2.0, "target p^beta", low=0.0, high=10.0, low_open=True)
    tempered_noise: bool = param(False, "drift -f + (beta + 1)/2 g^2 s, diffusion g / sqrt(beta)")
    num_particles: int = _shared("num_particles")
    num_steps: int = _shared("num_steps")
    corrected: bool = _shared("corrected")
    ess_threshold: float = _shared("ess_threshold")
    resampling: str = _shared("resampling")

    def check(self) -> None:
        if self.uneven_weights and self.mixture != "four_modes":
            raise ValueError("uneven_weights applies to mixture=four_modes only")


@functools.lru_cache(maxsize=16)
def anneal_problem(mixture: str, uneven_weights: bool, beta: float) -> Problem:
    data = (gmm.four_modes(UNEVEN if uneven_weights else None) if mixture == "four_modes"
            else gmm.forty_modes())
    std = float(np.sqrt(np.asarray(data.covs)[:, 0, 0].max()))
    edge = float(np.abs(np.asarray(data.means)).max()) + 9.0 * std / math.sqrt(min(beta, 1.0))
    return Problem((data,), (beta,), data, -edge, edge)


@functools.lru_cache(maxsize=16)
def exact_for(builder: Callable[..., Problem], args: tuple = ()) -> Exact:
    """exact_target(builder(*args)), cached. Every time grid runs from 1 to 1e-3, so one exact
    target serves a problem whatever num_steps."""
    return exact_target(builder(*args), sde.time_grid(1))


@functools.lru_cache(maxsize=64)
def _anneal_program(config: AnnealConfig, mesh: Mesh | None):
    problem = anneal_problem(config.mixture, config.uneven_weights, config.beta)
    model = fkc.anneal(gmm.noised_score(problem.experts[0], VP), config.beta, schedule=VP,
                       times=sde.time_grid(config.num_steps), dim=2,
                       tempered_noise=config.tempered_noise)
    return sampler(model, config.num_particles, config.corrected, config.ess_threshold,
                   config.resampling, mesh)


def run_anneal(config: AnnealConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    args = (config.mixture, config.uneven_weights, config.beta)
    exact = exact_for(anneal_problem, args)
    return run_problem(_anneal_program(config, mesh), anneal_problem(*args), exact, key,
                       config.corrected, config.num_particles * config.num_steps)


# ---------------------------------------------------------------------------------------------
# fkc_product: q_A q_B of two 2-D mixtures (exact: gmm.product)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProductConfig:
    num_particles: int = _shared("num_particles")
    num_steps: int = _shared("num_steps")
    corrected: bool = _shared("corrected")
    ess_threshold: float = _shared("ess_threshold")
    resampling: str = _shared("resampling")


def _mixture(spec) -> gmm.GaussianMixture:
    weights, means, std = spec
    return gmm.mixture(weights, means, std=std)


@functools.lru_cache(maxsize=1)
def product_problem() -> Problem:
    a, b = _mixture(PRODUCT_A), _mixture(PRODUCT_B)
    exact, _ = gmm.product(a, b)     # its components' means are the modes
    return Problem((a, b), (1.0, 1.0), exact, -6.0, 6.0)


def product_log_evidence(times: np.ndarray) -> float:
    """Closed form of log int q_A q_B at times[-1] minus the same at times[0] (gmm.product)."""
    a, b = product_problem().experts
    at = lambda t: gmm.product(gmm.noised(a, sde.alpha(VP, t), sde.sigma(VP, t)),
                               gmm.noised(b, sde.alpha(VP, t), sde.sigma(VP, t)))[1]
    return float(at(times[-1]) - at(times[0]))


@functools.lru_cache(maxsize=64)
def _product_program(config: ProductConfig, mesh: Mesh | None):
    experts = product_problem().experts
    model = fkc.product([gmm.noised_score(e, VP) for e in experts], schedule=VP,
                        times=sde.time_grid(config.num_steps), dim=2)
    return sampler(model, config.num_particles, config.corrected, config.ess_threshold,
                   config.resampling, mesh)


def run_product(config: ProductConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    exact = exact_for(product_problem)
    # The closed form, not the grid's Riemann sums (they agree to 1e-4: tests).
    exact = exact._replace(log_evidence=product_log_evidence(sde.time_grid(1)))
    return run_problem(_product_program(config, mesh), product_problem(), exact, key,
                       config.corrected, 2 * config.num_particles * config.num_steps)


# ---------------------------------------------------------------------------------------------
# fkc_cfg: classifier-free guidance p(x | c)^w p(x)^(1 - w) on a two-class mixture
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CFGConfig:
    guidance: float = param(2.0, "guidance weight w: target p(x | c)^w p(x)^(1 - w)",
                            low=0.0, high=10.0)
    num_particles: int = _shared("num_particles")
    num_steps: int = _shared("num_steps")
    corrected: bool = _shared("corrected")
    ess_threshold: float = _shared("ess_threshold")
    resampling: str = _shared("resampling")


@functools.lru_cache(maxsize=16)
def cfg_problem(guidance: float) -> Problem:
    both = _mixture(CLASSES)
    _, means, std = CLASSES
    conditional = gmm.mixture([1.0], [means[0]], std=std)
    return Problem((both, conditional), (1.0 - guidance, guidance), both, -6.0, 6.0)


@functools.lru_cache(maxsize=64)
def _cfg_program(config: CFGConfig, mesh: Mesh | None):
    unconditional, conditional = cfg_problem(config.guidance).experts
    model = fkc.cfg(gmm.noised_score(unconditional, VP), gmm.noised_score(conditional, VP),
                    config.guidance, schedule=VP, times=sde.time_grid(config.num_steps), dim=2)
    return sampler(model, config.num_particles, config.corrected, config.ess_threshold,
                   config.resampling, mesh)


def run_cfg(config: CFGConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    exact = exact_for(cfg_problem, (config.guidance,))
    return run_problem(_cfg_program(config, mesh), cfg_problem(config.guidance), exact, key,
                       config.corrected, 2 * config.num_particles * config.num_steps)


# ---------------------------------------------------------------------------------------------
# Plots: particles over the exact density, and mode weights over seeds
# ---------------------------------------------------------------------------------------------


PROBLEMS: dict[str, tuple[type, Callable[[Any], Problem]]] = {
    "fkc_anneal": (AnnealConfig, lambda c: anneal_problem(c.mixture, c.uneven_weights, c.beta)),
    "fkc_product": (ProductConfig, lambda c: product_problem()),
    "fkc_cfg": (CFGConfig, lambda c: cfg_problem(c.guidance)),
}
MAX_FIGURES = 4


def _group_key(config: dict) -> str:
    return str(sorted((k, v) for k, v in config.items() if k not in ("num_particles",
                                                                     "corrected")))


def plot_particles(records: Sequence[dict], out_dir) -> list:
    """Per target (up to 4): the first seed's particles at the largest N, corrected and
    uncorrected, over contours of the exact log-density; and the mode weights, mean ± std over
    seeds, against the exact ones."""
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for record in records:
        if "particles_sample" in record.get("metrics", {}):
            groups.setdefault(_group_key(record["config"]), []).append(record)
    paths = []
    for index, members in enumerate(list(groups.values())[:MAX_FIGURES]):
        name = members[0]["experiment"]
        config_type, problem_of = PROBLEMS[name]
        largest = max(r["config"]["num_particles"] for r in members)
        members = [r for r in members if r["config"]["num_particles"] == largest]
        problem = problem_of(config_type(**members[0]["config"]))
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax in axes[:2]:
            _contours(ax, problem)
        for ax, corrected in zip(axes[:2], (True, False)):
            chosen = sorted((r for r in members if r["config"]["corrected"] == corrected),
                            key=lambda r: r["seed"])
            label = "FKC (corrected)" if corrected else "uncorrected drift"
            if chosen:
                x = np.asarray(chosen[0]["metrics"]["particles_sample"])
                ax.scatter(x[:, 0], x[:, 1], s=5, alpha=0.6, color="C0" if corrected else "C3")
                metrics = chosen[0]["metrics"]
                label += f"\nSW {metrics['sw']:.3f} (floor {metrics['sw_floor']:.3f})"
            ax.set_title(f"{label}, N={largest}, seed {chosen[0]['seed'] if chosen else '-'}",
                         fontsize=9)
        _mode_bars(axes[2], members)
        config = members[0]["config"]
        fig.suptitle(f"{name}: " + ", ".join(f"{k}={v}" for k, v in config.items()
                                             if k not in ("num_particles", "corrected")),
                     fontsize=9)
        fig.tight_layout()
        path = out_dir / f"{name}_particles_{index}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _contours(ax, problem: Problem) -> None:
    ticks = np.linspace(problem.low, problem.high, 240)
    xx, yy = np.meshgrid(ticks, ticks)
    points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1), jnp.float32)
    log_p = np.asarray(jax.jit(problem.log_density(1e-3))(points)).reshape(xx.shape)
    ax.contour(xx, yy, log_p, levels=log_p.max() - np.array([10, 6, 3, 1, 0.25]), cmap="Greys",
               linewidths=0.8)
    ax.set_aspect("equal")


def _mode_bars(ax, members: Sequence[dict]) -> None:
    exact = np.asarray(members[0]["metrics"]["exact_mode_weights"])
    k = np.arange(exact.size)
    ax.bar(k - 0.27, exact, 0.27, color="k", alpha=0.5, label="exact")
    for shift, corrected, color in ((0.0, True, "C0"), (0.27, False, "C3")):
        masses = np.array([r["metrics"]["mode_weights"] for r in members
                           if r["config"]["corrected"] == corrected])
        if masses.size:
            std = masses.std(0, ddof=1) if len(masses) > 1 else None
            ax.bar(k + shift, masses.mean(0), 0.27, yerr=std, color=color, capsize=2,
                   label=f"{'FKC' if corrected else 'uncorrected'} ({len(masses)} seeds)")
    ax.set_xlabel("mode (nearest component mean)")
    ax.set_ylabel("mass (mean ± std over seeds)")
    ax.legend(fontsize=7)


# ---------------------------------------------------------------------------------------------

SUMMARY = ("sw", "sw_floor", "mode_tv", "spread_ratio", "mean_error", "ess_final",
           "num_resampled")

register(Experiment(
    name="fkc_anneal",
    description="FKC annealing p^beta of a 2-D Gaussian mixture (exact scores) vs the exact "
                "annealed target on a grid; corrected=false is the uncorrected drift",
    config_type=AnnealConfig,
    run=run_anneal,
    summary_metrics=SUMMARY,
    plots=plot_particles,
    demo=Demo(
        # beta = 0.5: the uncorrected drift is far off (6x too wide), FKC is right. beta = 3:
        # FKC is unbiased but one run's mode weights scatter (std ~0.1 at N = 4096), which
        # dominates its SW; the uncorrected drift is precise but too narrow and off in weights.
        full=Plan(grid={"num_particles": [256, 4096], "corrected": [True, False],
                        "beta": [0.5, 3.0]},
                  seeds=tuple(range(4)), overrides={"uneven_weights": True}),
        quick=Plan(grid={"corrected": [True, False]}, seeds=(0, 1),
                   overrides={"beta": 3.0, "uneven_weights": True, "num_particles": 256}),
        columns=("sw", "sw_floor", "mode_tv", "spread_ratio"),
        plot_metrics=("sw", "mode_tv", "spread_ratio"),
    ),
))

register(Experiment(
    name="fkc_product",
    description="FKC product q_A q_B of two 2-D Gaussian mixtures vs the exact product mixture "
                "(gmm.product), with log Z_hat vs the closed form",
    config_type=ProductConfig,
    run=run_product,
    summary_metrics=("sw", "sw_floor", "mode_tv", "spread_ratio", "log_evidence",
                     "exact_log_evidence", "ess_final", "num_resampled"),
    plots=plot_particles,
))

register(Experiment(
    name="fkc_cfg",
    description="FKC classifier-free guidance p(x|c)^w p(x)^(1-w) on a two-class 2-D mixture vs "
                "the exact grid density",
    config_type=CFGConfig,
    run=run_cfg,
    summary_metrics=("sw", "sw_floor", "mode_tv", "mean_error", "log_evidence",
                     "exact_log_evidence", "ess_final", "num_resampled"),
    plots=plot_particles,
))
