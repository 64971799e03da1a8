"""Psi-Sampler (Yoon et al. 2025): pCNL initial particles, then reward-guided SMC with lambda = 1.

The reward SMC of `reward.py` with constant lambda = 1 has, at t_0, the intermediate target

    pi_T(x) ~ N(x; 0, sigma_{t_0}^2 I) exp(Phi(x)),   Phi(x) = r(x0_hat(x, t_0)) / alpha.

Chains of pCNL (`proposals.mcmc.pcnl`) leave N(u; 0, I) exp(Phi(sigma_{t_0} u)) invariant, so
x = sigma_{t_0} u samples pi_T for any sigma_{t_0} (VP: about 1; VE: sigma_max). The chains' states
(after burn-in, every `thin`-th) are the initial particles, with UNIFORM initial weights: they
already follow pi_T, so adding Phi again as a weight (as the published code does) would count the
reward twice. log Z_hat then estimates log Z - log Z_0, Z_0 = E_{N(0, sigma^2 I)}[exp(Phi)]
(unknown), so it is not comparable with a plain reward SMC's.

Published defects not copied: the double-counted initial weight; ancestor indices reused when no
resampling happens (the engine returns the identity then); cached twist values not re-indexed after
resampling (they are fields of the particles here, gathered by the engine).

Cost per particle: `chain_evaluations` score evaluations with gradient (one per chain step, the
chains reuse the previous step's values) spread over the particles, plus the SMC's (see reward.py).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import smc
from proposals import mcmc
from smc.validation import check_count, static_positive
from targets.diffusion import reward as reward_lib
from targets.diffusion import sde

Array = jax.Array


def log_potential(score: sde.ScoreFn, reward: reward_lib.RewardFn, *, alpha: float,
                  schedule: sde.Schedule, t) -> Callable[[Array], Array]:
    """Phi(x) = r(x0_hat(x, t)) / alpha for one particle x [d] -> scalar (what pCNL needs)."""
    def phi(x: Array) -> Array:
        batch = x[None]
        x0 = sde.x0_hat(schedule, batch, t, score(batch, t))
        return reward(x0)[0] / alpha

    return phi


def chain_initial(phi, *, scale: float, dim: int, num_chains: int, burn_in: int, thin: int,
                  step_size: float):
    """initial(key, N) -> x [N, dim]: num_chains pCNL chains on N(u; 0, I) exp(phi(scale u)),
    started from N(0, I), burn_in steps dropped, then every `thin`-th state, x = scale u.

    N must be a multiple of num_chains; each chain runs burn_in + thin * N / num_chains steps.
    """
    def log_likelihood(u: Array) -> Array:
        return phi(scale * u)

    kernel = functools.partial(mcmc.pcnl, log_likelihood=log_likelihood, step_size=step_size)

    def initial(key: Array, num_particles: int) -> Array:
        if num_particles % num_chains:
            raise ValueError(f"num_particles={num_particles} must be a multiple of "
                             f"num_chains={num_chains}")
        per_chain = num_particles // num_chains
        key_start, key_chain = jax.random.split(key)
        u = jax.random.normal(key_start, (num_chains, dim), jnp.float32)
        states = mcmc.run_chain(key_chain, kernel, u, burn_in + thin * per_chain,
                                return_all=True).states
        kept = states[burn_in + thin - 1::thin]                 # [per_chain, num_chains, dim]
        return scale * kept.reshape(num_particles, dim)

    return initial


def chain_evaluations(num_particles: int, num_chains: int = 4, burn_in: int = 50,
                      thin: int = 5) -> int:
    """Score evaluations (each with one vector-Jacobian product) the chains take in all."""
    return num_chains * (burn_in + thin * (num_particles // num_chains))


def psi_sampler(score: sde.ScoreFn, reward: reward_lib.RewardFn, *, alpha: float,
                schedule: sde.Schedule, times, dim: int, step_size: float = 0.5,
                num_chains: int = 4, burn_in: int = 50, thin: int = 5,
                **options) -> smc.FeynmanKac:
    """Psi-Sampler's model: init runs pCNL chains on pi_T, then reward SMC with lambda = 1.

    score(x [N, d], t) -> [N, d]; reward(x0 [N, d]) -> [N]; alpha > 0; times: decreasing grid.
    step_size: pCNL's h (published 0.5); num_chains, burn_in, thin: see `chain_initial` (N passed
    to smc.run must be a multiple of num_chains). options: more `reward.reward_smc` keywords
    (guidance, potential, kernel, resample_every); the exponents are fixed to "constant".
    Particles are `reward.RewardParticles` (field x).
    """
    if "exponents" in options or "initial" in options:
        raise ValueError("psi_sampler fixes exponents='constant' and its own initial particles")
    num_chains = check_count("num_chains", num_chains, 1)
    burn_in = check_count("burn_in", burn_in, 0)
    thin = check_count("thin", thin, 1)
    step_size = static_positive("step_size", step_size)
    alpha = reward_lib.check_alpha(alpha)
    times = sde.check_time_grid(times, schedule)
    t0 = jnp.float32(times[0])
    phi = log_potential(score, reward, alpha=alpha, schedule=schedule, t=t0)
    initial = chain_initial(phi, scale=float(np.sqrt(schedule.sigma2(times[0]))), dim=dim,
                            num_chains=num_chains, burn_in=burn_in, thin=thin,
                            step_size=step_size)
    return reward_lib.reward_smc(score, reward, alpha=alpha, schedule=schedule, times=times,
                                 dim=dim, exponents="constant", initial=initial, **options)
