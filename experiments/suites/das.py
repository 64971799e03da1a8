"""Reward alignment on the DAS toys: `das_grid` and `das_ring` (targets/toy/das.py).

Target p(x) exp(r(x) / alpha), exact (a tilted Gaussian mixture), sampled with the exact noised
mixture score (VP, `sde.time_grid(num_steps)`) by one of these methods:

- reward_smc: reward-guided SMC (targets/diffusion/reward.py) with `exponents` and `guidance`.
- psi: Psi-Sampler (targets/diffusion/psi.py): pCNL chains (4 chains, burn-in 50, thin 5) at t_0,
  then reward SMC with lambda = 1. Its log Z_hat is log Z - log Z_0 (Z_0 unknown): not reported.
- guidance_uncorrected: the gradient-guided proposal (scale `guidance`, 1 if 0) with constant
  lambda = 1 and its weights ignored (no resampling): what guidance alone samples.
- best_of_n: num_particles base samples in groups of `best_of`; the best of each group by reward
  (num_particles / best_of outputs, equally weighted). Same score cost as reward_smc.
- base: num_particles base samples, no reward at all.
- fkc_product: FKC (targets/diffusion/fkc.py) for the product of the prior and the Gaussian
  exp(r / alpha) as a second expert (a quadratic reward is a Gaussian N(c, alpha A^-1) up to a
  constant; its noised score is exact), which ends at p exp(r / alpha): the reward tilt as a
  product of experts, no reward evaluations at all.
- driftlite_vcg / driftlite_ecg: DriftLite (targets/diffusion/driftlite.py) on the twist of
  reward_smc (`exponents`), its control drift in the span of the reward-guidance direction
  chosen each step by the variance- or energy-controlling rule, exact divergences (d = 2), with
  `weights` "transition" (the proposal ratio, exact on the grid) or "rate" (Fokker-Planck). Each
  step also takes a gradient and d + 1 tangents of it, and with transition weights a second
  forward pass and gradient (counted in score_evals and score_vjps).
- dts / dts_star: Diffusion Tree Sampling and Search (targets/diffusion/dts.py) with the budget
  N x num_steps score evaluations and `branching`; dts draws num_particles samples from its tree,
  dts_star answers with its one best terminal state.
- rbf: Rollover Budget Forcing (targets/diffusion/rbf.py) with num_particles / best_of particles
  (best-of-N's number of outputs) under the same total budget: about best_of candidates per step.
dts_star and rbf are searches: their sw is the distance of what they return to the target,
not a claim to sample it.

Compute (per run, all particles): score_evals forward score evaluations (N x num_steps for every
method; psi adds its chains; dts, dts_star and rbf report what they spent, at most that),
score_vjps vector-Jacobian products through the score (guidance and pCNL). Metrics: mean_reward
vs exact_mean_reward (reward_error); sw: sliced Wasserstein-1 (64 directions) of the weighted
output to 8192 exact draws of the target; sw_floor: the same for as many exact draws as outputs;
ess_final (ESS / N of the output weights); modes: the effective number of the prior's modes in
the output, exp(entropy) of its weighted mass per nearest mode (diversity), against
exact_modes, the target's own; log_evidence vs exact_log_evidence (reward_smc and driftlite_*;
Z_hat is unbiased for Z up to the discretisation). The harness records each run's wall time
(run_time_s).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import smc
from experiments.harness import timing
from experiments.harness.config import param
from experiments.harness.registry import Demo, Experiment, Plan, register
from targets.diffusion import driftlite, dts, fkc, psi, rbf, reward, sde
from targets.toy import das, distance, gmm

VP = sde.VP()
METHODS = ("reward_smc", "psi", "guidance_uncorrected", "best_of_n", "base", "fkc_product",
           "driftlite_vcg", "driftlite_ecg", "dts", "dts_star", "rbf")
WEIGHTED = ("reward_smc", "psi", "fkc_product", "driftlite_vcg", "driftlite_ecg")  # SMC weights
SEARCHES = ("dts", "dts_star", "rbf")             # not FeynmanKac models: their own programs
REFERENCE_SIZE = 8192
NUM_PROJECTIONS = 64


@dataclasses.dataclass(frozen=True)
class DASConfig:
    method: str = param("reward_smc", "sampler (see the module doc)", choices=METHODS)
    num_particles: int = param(512, "particles N (base samples for best_of_n / base)", low=1)
    num_steps: int = param(100, "reverse VP steps on [1e-3, 1]", low=1)
    alpha: float = param(1.0, "reward temperature: target p exp(r / alpha)", low=0.0,
                         low_open=True)
    exponents: str = param("das", "reward_smc's lambda schedule", choices=reward.SCHEDULES)
    guidance: float = param(0.0, "gradient guidance scale (reward_smc, guidance_uncorrected)",
                            low=0.0)
    best_of: int = param(8, "best_of_n: group size (outputs = num_particles / best_of); rbf: "
                              "num_particles / best_of particles", low=1)
    branching: int = param(4, "dts, dts_star: most children per tree node", low=1)
    weights: str = param("transition", "driftlite_*: the proposal ratio of the discretised chain "
                         "or the Fokker-Planck rate", choices=driftlite.WEIGHTS)
    ess_threshold: float = param(0.5, "resample when ESS < threshold * N", low=0.0, high=1.0)

    def check(self) -> None:
        if self.method in ("best_of_n", "rbf") and self.num_particles % self.best_of:
            raise ValueError("best_of must divide num_particles")
        if self.method == "rbf" and self.best_of < 2:
            raise ValueError("rbf needs best_of >= 2 (its particles' budget must cover one "
                             "score at t_0 and a candidate per step)")
        if self.method == "psi" and self.num_particles % 4:
            raise ValueError("psi runs 4 chains: num_particles must be a multiple of 4")


def _model(config: DASConfig, toy: das.TiltedToy, times) -> smc.FeynmanKac:
    score = gmm.noised_score(toy.prior, VP)
    common = {"alpha": toy.alpha, "schedule": VP, "times": times, "dim": 2}
    if config.method == "psi":
        return psi.psi_sampler(score, toy.reward, guidance=config.guidance, **common)
    if config.method == "guidance_uncorrected":
        return reward.reward_smc(score, toy.reward, exponents="constant",
                                 guidance=config.guidance or 1.0, **common)
    if config.method == "reward_smc":
        return reward.reward_smc(score, toy.reward, exponents=config.exponents,
                                 guidance=config.guidance, **common)
    if config.method.startswith("driftlite"):
        return driftlite.reward(score, toy.reward, exponents=config.exponents,
                                control=config.method.split("_")[1], weights=config.weights,
                                **common)
    if config.method == "fkc_product":
        return fkc.product([score, gmm.noised_score(reward_expert(toy), VP)], schedule=VP,
                           times=times, dim=2)
    # base and best_of_n: the base chain alone (lambda = 0 until the exact terminal weight,
    # which they ignore).
    return reward.reward_smc(score, toy.reward, exponents=np.r_[np.zeros(len(times) - 1), 1.0],
                             **common)


def reward_expert(toy: das.TiltedToy) -> gmm.GaussianMixture:
    """exp(r / alpha) as a one-component mixture: N(c, alpha A^-1) for r = -(x-c)^T A (x-c) / 2."""
    covariance = toy.alpha * np.linalg.inv(np.asarray(toy.reward.precision, np.float64))
    return gmm.mixture([1.0], np.asarray(toy.reward.center, np.float64)[None], covariance[None])


def effective_modes(mix: gmm.GaussianMixture, x: jax.Array, w: jax.Array) -> jax.Array:
    """exp(entropy) of the weighted mass per nearest mode of `mix`: 1 to K."""
    mass = gmm.mode_weights(mix, x, w)
    return jnp.exp(-jnp.sum(jnp.where(mass > 0, mass * jnp.log(mass), 0.0)))


def num_outputs(config: DASConfig) -> int:
    """How many samples a method returns (sw_floor draws as many exact ones)."""
    if config.method in ("best_of_n", "rbf"):
        return config.num_particles // config.best_of
    return 1 if config.method == "dts_star" else config.num_particles


def _exact_modes(toy: das.TiltedToy) -> float:
    """The target's effective number of modes: exp(entropy) of its component weights (the
    tilted mixture keeps the prior's components, in order)."""
    weights = np.asarray(toy.target.weights, np.float64)
    return float(np.exp(-np.sum(weights * np.log(weights))))


def _search(config: DASConfig, toy: das.TiltedToy, times):
    """key -> (outputs x [M, 2], weights [M], score evaluations spent) of dts / dts_star / rbf."""
    score, n = gmm.noised_score(toy.prior, VP), config.num_particles
    common = {"schedule": VP, "times": times, "dim": 2}
    budget = n * (len(times) - 1)
    if config.method == "rbf":
        def run(key):
            out = rbf.search(key, score, toy.reward, num_particles=n // config.best_of,
                             max_evaluations=budget, **common)
            return out.x, jnp.full(n // config.best_of, config.best_of / n), out.score_evaluations
        return run
    tree = dts.search if config.method == "dts_star" else dts.sample

    def run(key):
        out = tree(key, score, toy.reward, alpha=toy.alpha, max_evaluations=budget,
                   branching=config.branching, num_samples=n, **common)
        if config.method == "dts_star":
            return out.best[None], jnp.ones(1), out.score_evaluations
        return out.samples, jnp.full(n, 1.0 / n), out.score_evaluations
    return run


def _cost(config: DASConfig, times) -> tuple[int, int]:
    """(forward score evaluations, vector-Jacobian products and tangents) of one run, all
    particles."""
    n, forward = config.num_particles, reward.score_evaluations(times)
    if config.method.startswith("driftlite"):
        cost = driftlite.reward_cost(times, dim=2, exponents=config.exponents,
                                     weights=config.weights)
        return n * cost.forward, n * (cost.gradient + cost.tangents)
    guided = config.method in ("reward_smc", "psi") and config.guidance > 0
    guided = guided or config.method == "guidance_uncorrected"
    evals, vjps = n * forward, n * forward if guided else 0
    if config.method == "psi":
        chains = psi.chain_evaluations(n)
        evals, vjps = evals + chains, vjps + chains
    return evals, vjps


@functools.lru_cache(maxsize=32)
def _program(toy_name: str, config: DASConfig, mesh: Mesh | None):
    toy = das.TOYS[toy_name](config.alpha)
    times = sde.time_grid(config.num_steps)
    n, weighted = config.num_particles, config.method in WEIGHTED
    threshold = config.ess_threshold if weighted else 0.0
    reference = gmm.sample(jax.random.PRNGKey(2026), toy.target, REFERENCE_SIZE)
    evals, vjps = _cost(config, times)
    if config.method in SEARCHES:
        search = _search(config, toy, times)
    else:
        model = _model(config, toy, times)

    def outputs(key):
        """(x [M, 2], weights [M], log Z_hat, resamplings, NaN increments, evaluations)."""
        if config.method in SEARCHES:
            x, w, spent = search(key)
            return x, w, jnp.nan, 0, 0, spent
        result = smc.run(key, model, n, ess_threshold=threshold, mesh=mesh)
        x = result.particles if config.method == "fkc_product" else result.particles.x
        if weighted:
            w = result.weights
        elif config.method == "best_of_n":
            groups = toy.reward(x).reshape(-1, config.best_of)
            best = jnp.argmax(groups, axis=1) + config.best_of * jnp.arange(groups.shape[0])
            w = jnp.zeros(n).at[best].set(1.0 / groups.shape[0])
        else:
            w = jnp.full(n, 1.0 / n)
        return (x, w, result.log_evidence, jnp.sum(result.resampled),
                jnp.sum(result.nonfinite_increments), evals)

    def program(key):
        key_run, key_sw, key_floor = jax.random.split(key, 3)
        x, w, log_z, resampled, nans, spent = outputs(key_run)
        sw = lambda points, weights: distance.sliced_wasserstein(
            key_sw, points, reference, weights, num_projections=NUM_PROJECTIONS)
        floor = sw(gmm.sample(key_floor, toy.target, num_outputs(config)), None)
        ess = 1.0 / (n * jnp.sum(w**2))
        return (w @ toy.reward(x), sw(x, w), floor, ess, effective_modes(toy.prior, x, w), log_z,
                resampled, nans, spent)

    return timing.jit(program), toy, (evals, vjps)


def _run(toy_name: str, config: DASConfig, key: jax.Array, mesh: Mesh | None = None) -> dict:
    program, toy, (_, vjps) = _program(toy_name, config, mesh)
    mean_reward, sw, floor, ess, modes, log_z, resampled, nans, spent = program(key)
    out: dict[str, Any] = {
        "mean_reward": float(mean_reward), "exact_mean_reward": toy.mean_reward,
        "reward_error": float(mean_reward) - toy.mean_reward,
        "sw": float(sw), "sw_floor": float(floor), "ess_final": float(ess),
        "modes": float(modes), "exact_modes": _exact_modes(toy),
        "score_evals": int(spent), "score_vjps": vjps, "num_resampled": int(resampled),
        "nonfinite_increments": int(nans)}
    if config.method == "reward_smc" or config.method.startswith("driftlite"):
        out.update(log_evidence=float(log_z), exact_log_evidence=toy.log_z,
                   error=float(log_z) - toy.log_z)
    return out


run_grid = functools.partial(_run, "grid")
run_ring = functools.partial(_run, "ring")

COLUMNS = ("mean_reward", "exact_mean_reward", "sw", "sw_floor", "ess_final", "modes",
           "score_evals")
SUMMARY = COLUMNS + ("exact_modes", "reward_error", "log_evidence", "exact_log_evidence",
                     "score_vjps")


def _demo(num_particles: int) -> Demo:
    # At equal forward score evaluations (N x num_steps): reward-guided SMC samples the tilted
    # mixture (mean reward and SW at the exact values); best-of-N over-optimises the reward
    # and loses modes; the base model ignores the reward.
    return Demo(
        full=Plan(grid={"method": list(METHODS)},
                  seeds=(0, 1), overrides={"num_particles": num_particles, "num_steps": 100}),
        quick=Plan(grid={"method": ["reward_smc", "best_of_n"]}, seeds=(0,),
                   overrides={"num_particles": 64, "num_steps": 20}),
        columns=COLUMNS, x="method", plot_metrics=("sw", "mean_reward"))


register(Experiment(
    name="das_grid",
    description="reward-guided SMC vs best-of-N on DAS's 9-mode grid, r = -x1^2/100 - x2^2, "
                "against the exact tilted mixture",
    config_type=DASConfig, run=run_grid, summary_metrics=SUMMARY, demo=_demo(512)))

register(Experiment(
    name="das_ring",
    description="reward-guided SMC vs best-of-N on DAS's 8-mode ring, r = -x1^2 - (x2-1)^2/10, "
                "against the exact tilted mixture",
    config_type=DASConfig, run=run_ring, summary_metrics=SUMMARY, demo=_demo(512)))
