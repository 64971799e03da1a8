"""Digits experiments: reward-guided sampling (`digits_reward`) and FKC guidance and products
(`digits_fkc`) with the shipped score network and classifier (`experiments.suites.digits.networks`).

digits_reward: target p(x0) exp(r(x0) / alpha), r(x0) = log p_clf(label | x0), from the
unconditional score network, at an equal budget of score-network evaluations:
  smc          reward-guided SMC (`targets.diffusion.reward.reward_smc`), gradient guidance
  psi          Psi-Sampler (`targets.diffusion.psi.psi_sampler`): pCNL initial particles, then
               reward SMC with lambda = 1; no gradient guidance by default (`psi_guidance`):
               with lambda = 1 from t = 1, the shift grad r(x0_hat) carries 1 / alpha_t (~150
               at t = 1, VP) and throws the particles far off the data (seen: |x| ~ 100)
  guidance     the smc proposal, weights ignored (the same run without resampling)
  best_of_n    base-model samples, the best of each group of `best_of` by reward
  dts, dts_star, rbf  (`neighbours=true`) the searches of `targets.diffusion.dts` and `rbf` at the
               same budget (max_evaluations = the SMC budget; forward passes only, batch 1 for
               the DTS tree): dts draws as many samples from its tree as best-of-N has base
               samples, dts_star is its single best leaf (no covariance: frechet None), rbf runs
               num_base // best_of particles; `<method>_evaluations` is what each actually spent
  driftlite_vcg, driftlite_ecg  (`driftlite=true`) DriftLite (`targets.diffusion.driftlite`)
               with transition weights, VCG or ECG on the reward-guidance direction, one
               Hutchinson probe: each step costs 6 (two gradients, a tangent of one), so each
               runs a third of smc's particles
`network=flow` runs every method with the shipped flow network as a score on
`sde.LinearInterpolant()`, on VP's signal-to-noise grid mapped onto it (`sde.matching_time`,
docs/algorithms.md section 10), which ends at t = 1e-3; the budget rule is unchanged. Psi runs
there too: its pCNL chains target the same reward-tilted initial law at t_0 on either schedule.
digits_fkc: FKC classifier-free guidance q_u^{1-w} q_c^w at each w of `guidance_weights`, and the
product of experts p(x | label) p(x | thick) / p(x) (exponents 1, 1, -1), each with its FKC
weights ("fkc") and without ("plain": the same sampler, no weights, no resampling); "joint" is the
network's own p(x | label, thick), for reference. `network=flow` runs them all with the flow
network, as for digits_reward.

Budget: one forward pass of the score network on one particle counts 1, a forward pass with its
vector-Jacobian product (gradient guidance, pCNL) counts 2; the classifier is not counted.
Metrics per method (weighted by the final SMC weights where there are weights): reward (mean
log p_clf(label | x)), accuracy (classifier argmax == label), thick (fraction with ink above the
label's median), diversity (mean pairwise L2 distance), frechet (Frechet distance in the
classifier's penultimate features to the real test digits of the label; of the label and the
thickness for the product), ess, and the budget; `images_<method>` are 16 samples (drawn by the
weights) for the PNG grids. `real_train_*`: the same metrics for the real training digits (no
budget), the floor that the Frechet distance reaches with this many reference images.
`smc_log_evidence`, `driftlite_*_log_evidence`: log Z_hat (r <= 0, so log Z <= 0).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import smc
from experiments.harness import timing
from experiments.harness.config import ConfigError, param
from experiments.harness.registry import Experiment, register
from experiments.suites.digits import data as data_lib
from experiments.suites.digits import metrics, networks
from targets.diffusion import fkc, sde

NUM_IMAGES = 16
SCHEMES = lambda: sorted(smc.resampling.SCHEMES)
DIM = data_lib.DIM


# ---------------------------------------------------------------------------------------------
# Shared pieces: the networks, scoring a weighted sample, drawing images


@functools.lru_cache(maxsize=1)
def _networks():
    eps_net, eps_params, clf_net, clf_params = networks.load()
    classify = jax.jit(networks.logits_and_features(clf_net, clf_params))
    return eps_net, eps_params, classify


def _score(label: int | None = None, thick: int | None = None) -> sde.ScoreFn:
    eps_net, eps_params, _ = _networks()
    return networks.score(eps_net, eps_params, sde.VP(), label, thick)


@functools.lru_cache(maxsize=1)
def _flow_network():
    return networks.load_flow()


def _flow_score(label: int | None = None, thick: int | None = None) -> sde.ScoreFn:
    """The shipped flow network as a score on `sde.LinearInterpolant()` (grids inside (0, 1));
    `sde.convert_score(_flow_score(), sde.LinearInterpolant(), sde.VP())` samples it along VP."""
    net, params = _flow_network()
    return networks.flow_score(net, params, label, thick)


def _reference_features(label: int, thick: int | None = None) -> np.ndarray:
    test = data_lib.load().test
    keep = test.label == label
    if thick is not None:
        keep &= test.thick == thick
    _, features = _networks()[2](jnp.asarray(test.x[keep]))
    return np.asarray(features, np.float64)


def real_train_metrics(label: int, reference: np.ndarray, thick: int | None = None) -> dict:
    """The metrics of the real training digits of the label (and thickness): the floor that
    the Frechet distance to the test digits can reach with this many reference images."""
    train = data_lib.load().train
    keep = train.label == label
    if thick is not None:
        keep &= train.thick == thick
    return evaluate(train.x[keep], None, label, reference)


def evaluate(x, log_weights, label: int, reference: np.ndarray) -> dict[str, Any]:
    """Metrics of a weighted sample x [N, 64] (log_weights None: uniform) for class `label`."""
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        return {"degenerate": True, "nonfinite_samples": int(np.sum(~np.isfinite(x).all(1)))}
    if log_weights is None:
        w = metrics.uniform(x.shape[0])
    else:
        log_weights = np.asarray(log_weights, np.float64)
        if not np.any(np.isfinite(log_weights)) or np.any(np.isnan(log_weights)):
            # A degenerate or NaN run says so instead of reporting NaN metrics.
            return {"degenerate": True}
        w = np.exp(log_weights - log_weights.max())
        w /= w.sum()
    logits, features = _networks()[2](jnp.asarray(x, jnp.float32))
    log_p = np.asarray(jax.nn.log_softmax(logits), np.float64)
    median = data_lib.load().median_ink
    return {"degenerate": False,
            "reward": metrics.weighted_mean(log_p[:, label], w),
            "accuracy": metrics.weighted_mean(np.argmax(log_p, axis=1) == label, w),
            "thick": metrics.weighted_mean(data_lib.thickness(x, np.full(len(x), label), median),
                                           w),
            "diversity": metrics.mean_pairwise_distance(x, w),
            # Below 2 effective particles there is no covariance to compare.
            "frechet": (metrics.weighted_frechet(np.asarray(features, np.float64), w, reference)
                        if metrics.ess(w) >= 2.0 else None),
            "ess": metrics.ess(w),
            "images": _draw_images(x, w)}


def _draw_images(x: np.ndarray, w: np.ndarray) -> list:
    """NUM_IMAGES rows of x drawn by systematic resampling with weights w (fixed key), rounded."""
    idx = smc.resampling.systematic(jax.random.PRNGKey(0), jnp.log(jnp.asarray(w)), NUM_IMAGES)
    return np.round(np.clip(x[np.asarray(idx)], -1.0, 1.0), 3).tolist()


def _flatten(method: str, values: dict[str, Any], budget: int) -> dict[str, Any]:
    out = {f"{method}_{k}": v for k, v in values.items() if k != "images"}
    out[f"{method}_evaluations"] = int(budget)
    if "images" in values:
        out[f"images_{method}"] = values["images"]
    return out


def _run_unweighted(key, model: smc.FeynmanKac, num_particles: int):
    """The model's particles without resampling; weights returned for the caller to drop."""
    return smc.run(key, model, num_particles, ess_threshold=0.0)


# ---------------------------------------------------------------------------------------------
# digits_fkc: classifier-free guidance and a product of experts, with and without FKC weights


@dataclasses.dataclass(frozen=True)
class FKCConfig:
    label: int = param(3, "digit class to generate", low=0, high=9)
    thick: int = param(1, "thickness of the product of experts (1 thick, 0 thin)", low=0, high=1)
    guidance_weights: str = param("1,2,4", "comma-separated CFG weights w")
    num_particles: int = param(256, "particles N of each sampler", low=2)
    num_steps: int = param(100, "reverse-time Euler-Maruyama steps T", low=1)
    ess_threshold: float = param(0.5, "resample when ESS < threshold * N", low=0.0, high=1.0)
    resampling: str = param("systematic", "resampling scheme", choices=SCHEMES)
    network: str = param("score", "score network (VP) or flow network (linear interpolant)",
                         choices=("score", "flow"))

    def weights(self) -> list[float]:
        try:
            values = [float(v) for v in self.guidance_weights.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not all(np.isfinite(values)):
            raise ConfigError(f"guidance_weights={self.guidance_weights!r} must be a "
                              f"comma-separated list of finite numbers")
        return values

    def check(self) -> None:
        self.weights()


def _fkc_models(config: FKCConfig) -> dict[str, tuple[smc.FeynmanKac, int]]:
    """Name -> (FKC model, score evaluations per particle per step)."""
    make_score, schedule, times = _network(config.network, config.num_steps)
    common = {"schedule": schedule, "times": times, "dim": DIM}
    uncond, cond = make_score(), make_score(config.label)
    models = {f"cfg_w{w:g}": (fkc.cfg(uncond, cond, w, **common), 2) for w in config.weights()}
    models["product"] = (fkc.correctors([cond, make_score(thick=config.thick), uncond],
                                        [1.0, 1.0, -1.0], **common), 3)
    return models


@functools.lru_cache(maxsize=16)
def _fkc_program(config: FKCConfig, mesh: Mesh | None):
    models = _fkc_models(config)
    make_score, schedule, times = _network(config.network, config.num_steps)
    joint = fkc.anneal(make_score(config.label, config.thick), 1.0, schedule=schedule,
                       times=times, dim=DIM)
    resampler = smc.resampling.get(config.resampling)
    n = config.num_particles

    def program(key):
        out = {}
        for i, (name, (model, _)) in enumerate(models.items()):
            k = jax.random.fold_in(key, i)
            weighted = smc.run(k, model, n, resampling=resampler,
                               ess_threshold=config.ess_threshold, mesh=mesh)
            plain = _run_unweighted(k, model, n)
            out[name] = (weighted.particles, weighted.log_weights,
                         weighted.nonfinite_increments.sum(), plain.particles)
        out["joint"] = _run_unweighted(jax.random.fold_in(key, len(models)), joint, n).particles
        return out

    return timing.jit(program), {name: k for name, (_, k) in models.items()}


def run_fkc(config: FKCConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    program, experts = _fkc_program(config, mesh)
    out = program(key)
    per_step = config.num_particles * config.num_steps
    ref_label = _reference_features(config.label)
    ref_both = _reference_features(config.label, config.thick)
    result: dict[str, Any] = {"reference_images": len(ref_label),
                              "reference_images_product": len(ref_both)}
    result.update(_flatten("real_train", real_train_metrics(config.label, ref_label), 0))
    result.update(_flatten("real_train_product",
                           real_train_metrics(config.label, ref_both, config.thick), 0))
    for name, (x, log_w, nans, plain_x) in ((k, v) for k, v in out.items() if k != "joint"):
        reference = ref_both if name == "product" else ref_label
        budget = per_step * experts[name]
        result.update(_flatten(f"{name}_fkc", evaluate(x, log_w, config.label, reference), budget))
        result[f"{name}_fkc_nan_increments"] = int(nans)
        result.update(_flatten(f"{name}_plain", evaluate(plain_x, None, config.label, reference),
                               budget))
    result.update(_flatten("joint", evaluate(out["joint"], None, config.label, ref_both),
                           per_step))
    return result


# ---------------------------------------------------------------------------------------------
# digits_reward: reward-guided SMC, Psi-Sampler, uncorrected guidance and best-of-N


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    label: int = param(3, "digit class rewarded: r(x0) = log p_clf(label | x0)", low=0, high=9)
    alpha: float = param(0.1, "reward temperature: target p(x0) exp(r(x0) / alpha)", low=0.0,
                         low_open=True)
    num_particles: int = param(256, "particles N of reward-guided SMC (sets the budget)", low=2)
    num_steps: int = param(100, "reverse-time steps T", low=2)
    guidance: float = param(1.0, "gradient-guidance scale of the SMC proposal", low=0.0)
    exponents: str = param("das", "twist schedule lambda_t", choices=("das", "constant",
                                                                      "adaptive"))
    ess_threshold: float = param(0.5, "resample when ESS < threshold * N", low=0.0, high=1.0)
    resampling: str = param("systematic", "resampling scheme", choices=SCHEMES)
    best_of: int = param(8, "best-of-N: group size n (outputs = samples / n)", low=1)
    psi_chains: int = param(4, "Psi-Sampler: pCNL chains", low=1)
    psi_burn_in: int = param(50, "Psi-Sampler: burn-in steps per chain", low=0)
    psi_thin: int = param(5, "Psi-Sampler: keep every thin-th chain state", low=1)
    psi_step_size: float = param(0.5, "Psi-Sampler: pCNL step size h", low=0.0, low_open=True)
    psi_guidance: float = param(0.0, "Psi-Sampler: gradient-guidance scale of its SMC (its "
                                "lambda = 1 from t = 1 makes guidance unstable here)", low=0.0)
    network: str = param("score", "score network (VP) or flow network (linear interpolant)",
                         choices=("score", "flow"))
    neighbours: bool = param(False, "also DTS, DTS* and RBF at the same budget (slow: DTS "
                             "calls the network one particle at a time)")
    branching: int = param(4, "DTS / DTS*: most children per tree node", low=1)
    driftlite: bool = param(False, "also DriftLite (transition weights, VCG and ECG, one "
                            "Hutchinson probe) with as many particles as the same budget buys")


def psi_particles(budget: int, smc_cost: int, config: RewardConfig) -> int:
    """The most Psi-Sampler particles (a multiple of psi_chains) whose chains (forward + gradient,
    2 per chain step) and SMC (smc_cost per particle) fit in `budget`; 0 if none do."""
    from targets.diffusion import psi

    n = (budget - 2 * config.psi_chains * config.psi_burn_in) // (smc_cost + 2 * config.psi_thin)
    n -= n % config.psi_chains
    while n > 0 and 2 * psi.chain_evaluations(n, config.psi_chains, config.psi_burn_in,
                                              config.psi_thin) + n * smc_cost > budget:
        n -= config.psi_chains
    return max(n, 0)


def _network(network: str, num_steps: int):
    """(score(label=None, thick=None) -> ScoreFn, its schedule, its grid of num_steps steps) of
    the shipped score network (VP) or flow network (linear interpolant). The flow grid has VP's
    signal-to-noise ratios: a grid uniform in t near t = 1 is unstable on the linear
    interpolant (`sde.LinearInterpolant`)."""
    if network == "flow":
        linear = sde.LinearInterpolant()
        times = sde.matching_time(linear, sde.VP(), sde.time_grid(num_steps, t_min=1e-5))
        return _flow_score, linear, sde.check_time_grid(np.asarray(times, np.float64), linear)
    return _score, sde.VP(), sde.time_grid(num_steps)


def _searches(config: RewardConfig, score, r, schedule, times, budget: int, num_base: int):
    """key -> {"dts": (samples, spent), "dts_star": (best [1, d], spent), "rbf": (x, spent)}:
    the searches at max_evaluations = budget, each with the evaluations it spent."""
    from targets.diffusion import dts, rbf

    common = {"schedule": schedule, "times": times, "dim": DIM, "max_evaluations": budget}
    num_rbf = num_base // config.best_of
    if num_rbf < 1 or num_rbf * len(times) > budget:
        raise ConfigError(f"RBF with num_base // best_of = {num_rbf} particles needs "
                          f"{num_rbf} * (num_steps + 1) <= {budget} evaluations: raise best_of "
                          f"or num_particles")

    def run(key):
        k_dts, k_star, k_rbf = jax.random.split(key, 3)
        tree = dts.sample(k_dts, score, r, alpha=config.alpha, branching=config.branching,
                          num_samples=num_base, **common)
        star = dts.search(k_star, score, r, alpha=config.alpha, branching=config.branching,
                          **common)
        out = rbf.search(k_rbf, score, r, num_particles=num_rbf, **common)
        # RBF's total_evaluations is what its budget is charged (the last step's candidates
        # included), so it is the count compared with the SMC budget.
        return {"dts": (tree.samples, tree.score_evaluations),
                "dts_star": (star.best[None], star.score_evaluations),
                "rbf": (out.x, out.total_evaluations)}
    return run


@functools.lru_cache(maxsize=16)
def _reward_program(config: RewardConfig, mesh: Mesh | None):
    from targets.diffusion import psi
    from targets.diffusion import reward as reward_lib

    _, _, classify = _networks()
    r = lambda x: jax.nn.log_softmax(classify(x)[0], axis=-1)[:, config.label]
    make_score, schedule, times = _network(config.network, config.num_steps)
    score = make_score()
    common = {"alpha": config.alpha, "schedule": schedule, "times": times, "dim": DIM}
    model = reward_lib.reward_smc(score, r, exponents=config.exponents,
                                  guidance=config.guidance, **common)
    cost = (2 if config.guidance > 0 else 1) * reward_lib.score_evaluations(times)
    psi_cost = (2 if config.psi_guidance > 0 else 1) * reward_lib.score_evaluations(times)
    budget = config.num_particles * cost
    num_psi = psi_particles(budget, psi_cost, config)
    num_base = budget // config.num_steps
    if num_psi < 2 or num_base < config.best_of:
        raise ConfigError(f"the budget of {budget} evaluations buys {num_psi} Psi-Sampler "
                          f"particles and {num_base} base samples: raise num_particles")
    psi_model = psi.psi_sampler(score, r, step_size=config.psi_step_size,
                                num_chains=config.psi_chains, burn_in=config.psi_burn_in,
                                thin=config.psi_thin, guidance=config.psi_guidance, **common)
    base = fkc.anneal(score, 1.0, schedule=schedule, times=times, dim=DIM)
    resampler = smc.resampling.get(config.resampling)
    n = config.num_particles
    search = (_searches(config, score, r, schedule, times, budget, num_base)
              if config.neighbours else None)
    drift_models, num_drift, drift_budget = (_driftlite(config, score, r, common, budget)
                                             if config.driftlite else ({}, 0, 0))

    def program(key):
        k_smc, k_psi, k_base = jax.random.split(key, 3)
        out = {}
        for name, k, m, size in (("smc", k_smc, model, n), ("psi", k_psi, psi_model, num_psi)):
            result = smc.run(k, m, size, resampling=resampler,
                             ess_threshold=config.ess_threshold,
                             mesh=mesh if size == n else None)
            out[name] = _weighted(result)
        out["guidance"] = _run_unweighted(k_smc, model, n).particles.x
        for i, (name, drift_model) in enumerate(drift_models.items()):
            # Keys of their own, so that the other methods draw what they drew without them.
            result = smc.run(jax.random.fold_in(key, 4 + i), drift_model, num_drift,
                             resampling=resampler, ess_threshold=config.ess_threshold)
            out[name] = _weighted(result)
        base_x = _run_unweighted(k_base, base, num_base).particles
        out["base"] = (base_x, r(base_x))
        if search is not None:
            # A key of its own, so that the other methods draw what they drew without it.
            out.update(search(jax.random.fold_in(key, 3)))
        return out

    budgets = {"smc": budget, "guidance": budget, "best_of_n": num_base * config.num_steps,
               "psi": 2 * psi.chain_evaluations(num_psi, config.psi_chains, config.psi_burn_in,
                                                config.psi_thin) + num_psi * psi_cost}
    budgets.update({name: drift_budget for name in drift_models})
    return timing.jit(program), budgets


def _weighted(result: smc.SMCResult) -> tuple:
    """What run_reward scores of a weighted run: (x, log-weights, non-finite increments, log
    Z_hat)."""
    return (result.particles.x, result.log_weights, result.nonfinite_increments.sum(),
            result.log_evidence)


def _driftlite(config: RewardConfig, score, r, common: dict, budget: int):
    """({"driftlite_vcg": model, "driftlite_ecg": model}, particles, their cost): transition
    weights, the default basis, one Hutchinson probe; a gradient counts 2 (forward and
    backward), a tangent of it 2. As many particles as fit in `budget`."""
    from targets.diffusion import driftlite

    if config.exponents == "adaptive":
        raise ConfigError("driftlite=true needs a fixed twist schedule (exponents=das or "
                          "constant), not adaptive")
    cost = driftlite.reward_cost(common["times"], dim=DIM, divergence="hutchinson", probes=1,
                                 exponents=config.exponents)
    per_particle = 2 * cost.gradient + 2 * cost.tangents + (cost.forward - cost.gradient)
    n = budget // per_particle
    if n < 2:
        raise ConfigError(f"the budget of {budget} evaluations buys {n} DriftLite particles "
                          f"({per_particle} each): raise num_particles")
    models = {f"driftlite_{control}": driftlite.reward(
        score, r, exponents=config.exponents, control=control, divergence="hutchinson",
        probes=1, **common) for control in driftlite.CONTROLS}
    return models, n, n * per_particle


def run_reward(config: RewardConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    program, budgets = _reward_program(config, mesh)
    out = program(key)
    reference = _reference_features(config.label)
    result: dict[str, Any] = {"budget": budgets["smc"], "reference_images": len(reference)}
    result.update(_flatten("real_train", real_train_metrics(config.label, reference), 0))
    for name in ("smc", "psi", "driftlite_vcg", "driftlite_ecg"):
        if name not in out:
            continue
        x, log_w, nans, log_evidence = out[name]
        result.update(_flatten(name, evaluate(x, log_w, config.label, reference), budgets[name]))
        result[f"{name}_particles"] = len(x)
        result[f"{name}_nan_increments"] = int(nans)
        if name != "psi":             # Psi's estimates log Z - log Z_0, Z_0 unknown
            result[f"{name}_log_evidence"] = float(log_evidence)
    result.update(_flatten("guidance", evaluate(out["guidance"], None, config.label, reference),
                           budgets["guidance"]))
    best_x = best_of(*out["base"], config.best_of)
    result.update(_flatten("best_of_n", evaluate(best_x, None, config.label, reference),
                           budgets["best_of_n"]))
    result["best_of_n_outputs"] = len(best_x)
    for name in ("dts", "dts_star", "rbf"):
        if name in out:
            x, spent = out[name]
            result.update(_flatten(name, evaluate(x, None, config.label, reference), spent))
            result[f"{name}_outputs"] = len(x)
    return result


def best_of(x, rewards, group: int) -> np.ndarray:
    """The highest-reward row of each consecutive group of `group` rows of x [M, d] (a remainder
    of fewer rows is dropped): [M // group, d]."""
    x, rewards = np.asarray(x), np.asarray(rewards)
    groups = len(rewards) // group
    best = np.argmax(rewards[: groups * group].reshape(groups, group), axis=1)
    return x[: groups * group].reshape(groups, group, -1)[np.arange(groups), best]


# ---------------------------------------------------------------------------------------------
# Image grids


def plot_grids(records: list[dict], out_dir) -> list:
    """One PNG per configuration (its lowest seed): NUM_IMAGES samples of every method."""
    import matplotlib.pyplot as plt

    paths, seen = [], set()
    for record in sorted(records, key=lambda r: r.get("seed", 0)):
        config = str(sorted(record.get("config", {}).items()))
        methods = [k[len("images_"):] for k in record.get("metrics", {}) if k.startswith("images_")]
        if config in seen or not methods:
            continue
        seen.add(config)
        fig, axes = plt.subplots(len(methods), 1, figsize=(8, 0.8 * len(methods) + 0.4),
                                 squeeze=False)
        for ax, method in zip(axes[:, 0], methods):
            images = np.asarray(record["metrics"][f"images_{method}"]).reshape(-1, 8, 8)
            ax.imshow(np.concatenate(list(images), axis=1), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(method, rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle(f"{record.get('experiment', '')} " + ", ".join(
            f"{k}={v}" for k, v in sorted(record["config"].items())
            if k in ("label", "alpha", "thick", "guidance_weights")), fontsize=8)
        path = pathlib.Path(out_dir) / f"{record.get('experiment', 'digits')}_{len(paths)}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


register(Experiment(
    name="digits_fkc",
    description="8x8 digits: FKC classifier-free guidance and a product of experts (class x "
                "thickness / unconditional), with and without FKC weights",
    config_type=FKCConfig,
    run=run_fkc,
    summary_metrics=("cfg_w2_fkc_accuracy", "cfg_w2_plain_accuracy", "product_fkc_thick",
                     "product_plain_thick", "product_fkc_frechet", "product_plain_frechet"),
    plots=plot_grids,
))

register(Experiment(
    name="digits_reward",
    description="8x8 digits: reward-guided SMC, Psi-Sampler, uncorrected guidance, best-of-N "
                "(and DTS, DTS*, RBF) for a classifier reward at an equal network budget",
    config_type=RewardConfig,
    run=run_reward,
    summary_metrics=("budget", "smc_reward", "psi_reward", "guidance_reward", "best_of_n_reward",
                     "smc_accuracy", "psi_accuracy", "guidance_accuracy", "best_of_n_accuracy",
                     # With neighbours=true only (report skips the columns a run lacks).
                     "dts_reward", "dts_star_reward", "rbf_reward", "dts_accuracy",
                     "rbf_accuracy", "dts_evaluations", "rbf_evaluations"),
    plots=plot_grids,
))
