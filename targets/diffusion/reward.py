"""Reward-guided SMC for score models (TDS, DAS, FK steering): p_theta(x0) exp(r(x0) / alpha).

Particles walk a decreasing time grid t_0 > ... > t_T (docs/algorithms.md section 3). Step k moves
x_k -> x_{k+1} with the base reverse kernel p_theta (Euler-Maruyama or ancestral), or with a
proposal q whose mean is shifted by guidance * (step variance) * grad log psi_k(x_k) (or by
(step variance) * a `Guidance` rule's direction, chosen from the cloud at t_k), and weighs

    G_0     = log psi_0(x_0),
    G_{k+1} = log p_theta(x_{k+1} | x_k) - log q(x_{k+1} | x_k) + log psi_{k+1} - log psi_k,
    log psi_k = lambda_k S_k / alpha,   log psi_T = r(x_T) / alpha exactly (terminal potential),

where S_k is a statistic of r_j = r(x0_hat(x_j)) along the particle's path: r_k ("difference",
the twist of TDS and DAS; FK steering's exp(lambda (r_t - r_{t+1}))), max_{j<=k} r_j ("max") or
sum_{j<=k} r_j ("sum"). The weights telescope, so the weighted particles at t_T target
p_theta(x_T) exp(r(x_T) / alpha) for every schedule, potential and guidance scale: these only
change the variance. p_theta is the law of the discretised base chain from N(0, sigma_{t_0}^2 I)
(or from `initial`), so it differs from the data law by the discretisation and the initial law.

lambda_k: "das" min((1 + gamma)^k - 1, 1); "constant" 1 (TDS, Psi-Sampler); an increasing
array [T + 1] in [0, 1] ending at 1; or "adaptive": lambda_{k+1} chosen by bisection
(`smc.tempering.next_exponent`) so that the conditional ESS of the exponent's share of the step's
increment, (lambda_{k+1} - lambda_k) S_{k+1} / alpha, on the current weighted particles (the
engine's log-weights, given to the step as a `weighted_step`, plus the rest of the increment) is
target_ess * N (with lambda_0 = 0).

The cached values (score, reward, statistic, twist, its gradient, lambda) are fields of the
particles, so the engine's resampling gathers them with x: no stale cache after resampling.

Cost per particle (`score_evaluations`): T forward score evaluations (t_0 .. t_{T-1}; the terminal
potential needs no score). With guidance > 0, each of them also takes one vector-Jacobian product
through the score (jax.value_and_grad of r(x0_hat(x))), about one more forward's worth.
The score must act on each row of x independently (no batch statistics), or gradients mix rows.

Non-finite values: a particle whose score, reward, gradient or new position is not finite gets a
NaN increment, which the engine counts in `SMCResult.nonfinite_increments` (log Z_hat becomes NaN).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import smc
from proposals import sde as sde_proposals
from smc.validation import check_fraction, static_finite, static_int, static_positive
from targets.diffusion import sde

Array = jax.Array
RewardFn = Callable[[Array], Array]
InitialFn = Callable[[Array, int], Array]

POTENTIALS = ("difference", "max", "sum")
KERNELS = ("euler_maruyama", "ancestral")
SCHEDULES = ("das", "constant", "adaptive")


class RewardParticles(NamedTuple):
    """One particle per row, everything the next step needs, gathered together on resampling.

    x [N, d] at the current time t_k; score [N, d] = score(x, t_k); reward [N] = r(x0_hat(x))
    (r(x) after the last step); statistic [N] = S_k; log_twist [N] = log psi_k; reward_grad
    [N, d] = grad_x r(x0_hat(x)) (zeros without guidance); exponent [N] = lambda_k (the same in
    every row).
    """

    x: Array
    score: Array
    reward: Array
    statistic: Array
    log_twist: Array
    reward_grad: Array
    exponent: Array


class Guidance(NamedTuple):
    """A guidance rule: the proposal's shift chosen at each step from the particles.

    direction(key, particles: RewardParticles, k, log_weights) -> [N, d], a direction in the
    units of a log-density gradient: the proposal mean moves by (step variance) * direction (a
    float `guidance` is the rule guidance * grad log psi_k). The direction may depend on anything
    known before the move (the cloud at t_k and its weights), never on the move's own noise: the
    weights then stay exact for every rule. weighted: the rule reads the engine's log-weights
    (they are None otherwise).
    """

    direction: Callable[[Array, RewardParticles, Array, Array | None], Array]
    weighted: bool = False


def das_exponents(num_steps: int, gamma: float = 0.008) -> np.ndarray:
    """DAS's lambda_k = min((1 + gamma)^k - 1, 1), k = 0..num_steps, float64 [num_steps + 1]."""
    gamma = static_positive("gamma", gamma)
    return np.minimum(np.expm1(np.arange(num_steps + 1) * np.log1p(gamma)), 1.0)


def score_evaluations(times) -> int:
    """Forward score evaluations per particle of one run on this grid: T (see the module doc)."""
    return len(sde.check_time_grid(times)) - 1


def reward_smc(score: sde.ScoreFn, reward: RewardFn, *, alpha: float, schedule: sde.Schedule,
               times, dim: int, exponents="das", gamma: float = 0.008,
               target_ess: float = 0.5, potential: str = "difference", guidance: float = 0.0,
               kernel: str = "euler_maruyama", resample_every: int | None = None,
               initial: InitialFn | None = None) -> smc.FeynmanKac:
    """The reward-guided SMC model for p_theta(x0) exp(r(x0) / alpha) over particles [N, dim].

    score(x [N, d], t scalar) -> [N, d]; reward(x0 [N, d]) -> [N]; alpha > 0 (reward temperature);
    schedule: `sde.VP()`, `sde.VE()` or `sde.LinearInterpolant()` (a flow model); times: strictly
    decreasing grid in the schedule's time domain (`sde.time_grid`).
    exponents: "das" (with gamma), "constant", "adaptive" (with target_ess) or an array [T + 1].
    potential: "difference", "max" or "sum" (module doc). guidance >= 0: scale of the gradient
    shift of the proposal mean (0: the base kernel, no gradients); or a `Guidance` rule (e.g.
    DriftLite's control with transition weights, driftlite.reward). kernel: "euler_maruyama" or
    "ancestral" (DDPM posterior step with x0_hat). resample_every = k: resampling is allowed only
    before steps 0, k, 2k, ... (run with `ess_threshold=1.0` to resample at each of them).
    initial(key, N) -> x [N, d]: a sampler of the intermediate target at t_0,
    p_{t_0}(x) psi_0(x) / Z_0 (e.g. Psi-Sampler's chains): particles then start with uniform
    weights, and log Z_hat estimates log Z - log Z_0. Default: N(0, sigma_{t_0}^2 I) with
    G_0 = log psi_0.
    """
    alpha = check_alpha(alpha)
    rule = guidance if isinstance(guidance, Guidance) else None
    if rule is None:
        guidance = static_finite("guidance", guidance)
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
    elif not callable(rule.direction):
        raise TypeError(f"guidance.direction must be callable, got {rule.direction!r}")
    if potential not in POTENTIALS:
        raise ValueError(f"potential must be one of {POTENTIALS}, got {potential!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    dim = static_int("dim", dim, 1)
    times = sde.check_time_grid(times, schedule)
    num_steps = len(times) - 1
    adaptive = isinstance(exponents, str) and exponents == "adaptive"
    if adaptive:
        target_ess = check_fraction("target_ess", target_ess)
        if target_ess == 0.0:
            raise ValueError("target_ess must be > 0, or the exponent never moves")
        lambdas = np.zeros(num_steps + 1)
    else:
        lambdas = check_exponents(exponents, gamma, num_steps, SCHEDULES)
    mask = None
    if resample_every is not None:
        mask = np.arange(num_steps) % static_int("resample_every", resample_every, 1) == 0
    check_callables(score, reward, dim)
    if initial is not None and not callable(initial):
        raise TypeError(f"initial must be callable (key, N) -> x [N, dim], got {initial!r}")

    ts = jnp.asarray(times, jnp.float32)
    lambdas_j = jnp.asarray(lambdas, jnp.float32)
    use_grad = rule is not None or guidance > 0.0
    init_std = float(np.sqrt(schedule.sigma2(times[0])))

    def evaluate(x: Array, t: Array) -> tuple[Array, Array, Array]:
        """(score(x, t) [N, d], r(x0_hat(x)) [N], grad_x r(x0_hat(x)) [N, d] or zeros)."""
        def total(z):
            s = score(z, t)
            r = reward(sde.x0_hat(schedule, z, t, s))
            return jnp.sum(r), (s, r)

        if use_grad:
            (_, (s, r)), grad = jax.value_and_grad(total, has_aux=True)(x)
        else:
            _, (s, r) = total(x)
            grad = jnp.zeros_like(x)
        return s, r, grad

    def init(key: Array, num_particles: int):
        if initial is None:
            x = init_std * jax.random.normal(key, (num_particles, dim), jnp.float32)
        else:
            x = initial(key, num_particles)
            if getattr(x, "shape", None) != (num_particles, dim):
                raise ValueError(f"initial(key, N) must return x of shape {(num_particles, dim)}, "
                                 f"got {getattr(x, 'shape', type(x).__name__)}")
        s, r, grad = evaluate(x, ts[0])
        exponent = jnp.full((num_particles,), lambdas_j[0])
        log_twist = exponent * r / alpha
        particles = RewardParticles(x, s, r, r, log_twist, grad, exponent)
        finite = _all_finite(s, r, x, *([grad] if use_grad else []))
        start = jnp.zeros(num_particles) if initial is not None else log_twist
        return particles, jnp.where(finite, start, jnp.nan)

    def base_kernel(p: RewardParticles, k: Array) -> sde_proposals.Gaussian:
        t, t_next = ts[k], ts[k + 1]
        if kernel == "euler_maruyama":
            g2 = sde.g2(schedule, t)
            drift = -sde.f(schedule, p.x, t) + g2 * p.score
            return sde_proposals.euler_maruyama_kernel(p.x, drift, jnp.sqrt(g2), t - t_next)
        x0 = sde.x0_hat(schedule, p.x, t, p.score)
        return sde_proposals.ancestral_kernel(p.x, x0, sde.alpha(schedule, t),
                                              sde.sigma(schedule, t),
                                              sde.alpha(schedule, t_next),
                                              sde.sigma(schedule, t_next))

    def step(key: Array, p: RewardParticles, k: Array, log_weights: Array | None = None):
        base = base_kernel(p, k)
        if use_grad:
            # The twist's gradient, whatever the potential: any shift is exact once weighed.
            if rule is None:
                shift = guidance * base.std**2 * (p.exponent / alpha)[:, None] * p.reward_grad
            else:
                # The move keeps `key` (as without a rule); the rule draws from its own.
                shift = base.std**2 * rule.direction(jax.random.fold_in(key, 1), p, k,
                                                     log_weights)
            proposal = sde_proposals.Gaussian(base.mean + shift, base.std)
            x_new, log_q = sde_proposals.sample(key, proposal)
            log_ratio = sde_proposals.log_prob(base, x_new) - log_q
        else:
            x_new, _ = sde_proposals.sample(key, base)
            log_ratio = jnp.zeros(x_new.shape[0], x_new.dtype)
        last = k == num_steps - 1
        s, r, grad = jax.lax.cond(last, lambda x: _terminal(x, reward),
                                  lambda x: evaluate(x, ts[k + 1]), x_new)
        statistic = _update(potential, p.statistic, r)
        if adaptive:
            # Split the increment: rest + (lambda' - lambda) S' / alpha; bisect on the second part
            # over the cloud weighted by log_weights + rest, where the step leaves it but for it.
            rest = log_ratio + p.exponent * statistic / alpha - p.log_twist
            finite = _all_finite(rest, statistic) & ~jnp.isnan(log_weights)
            exponent = smc.tempering.next_exponent(
                jnp.where(finite, log_weights + rest, -jnp.inf),
                jnp.where(finite, statistic / alpha, 0.0), p.exponent[0], target_ess)
            exponent = jnp.full_like(p.exponent, exponent)
        else:
            exponent = jnp.full_like(p.exponent, lambdas_j[k + 1])
        log_twist = jnp.where(last, r / alpha, exponent * statistic / alpha)
        exponent = jnp.where(last, 1.0, exponent)
        increments = log_ratio + log_twist - p.log_twist
        finite = _all_finite(s, r, x_new, increments, *([grad] if use_grad else []))
        particles = RewardParticles(x_new, s, r, statistic, log_twist, grad, exponent)
        return particles, jnp.where(finite, increments, jnp.nan)

    return smc.FeynmanKac(init=init, step=step, num_steps=num_steps, resample_mask=mask,
                          weighted_step=adaptive or (rule is not None and rule.weighted))


def _terminal(x: Array, reward: RewardFn) -> tuple[Array, Array, Array]:
    # psi_T = exp(r(x_T) / alpha): no score, no gradient after the last step.
    return jnp.zeros_like(x), reward(x), jnp.zeros_like(x)


def _update(potential: str, statistic: Array, r: Array) -> Array:
    if potential == "max":
        return jnp.maximum(statistic, r)
    if potential == "sum":
        return statistic + r
    return r


def _all_finite(*arrays: Array) -> Array:
    """[N]: every entry of each row of every array is finite."""
    ok = jnp.ones(arrays[0].shape[0], bool)
    for a in arrays:
        ok = ok & jnp.all(jnp.isfinite(a).reshape(a.shape[0], -1), axis=1)
    return ok


# ---------------------------------------------------------------------------------------------
# Validation


def check_alpha(alpha) -> float:
    """alpha as a float; ValueError unless finite and > 0."""
    return static_positive("alpha", alpha)


def check_exponents(exponents, gamma: float, num_steps: int,
                    names: tuple[str, ...] = ("das", "constant")) -> np.ndarray:
    """lambda_0..lambda_T [T + 1] of a fixed twist schedule: "das" (with gamma), "constant", or an
    array; ValueError unless finite, in [0, 1], non-decreasing and ending at 1. `names`: the
    schedule names the caller accepts (for the message; "adaptive" is the caller's own)."""
    if isinstance(exponents, str):
        if exponents == "das":
            return das_exponents(num_steps, gamma)
        if exponents == "constant":
            return np.ones(num_steps + 1)
        raise ValueError(f"exponents must be one of {names} or an array, got {exponents!r}")
    if isinstance(exponents, jax.core.Tracer):
        raise TypeError("exponents must be concrete, not traced")
    lambdas = np.asarray(exponents, np.float64)
    if lambdas.shape != (num_steps + 1,):
        raise ValueError(f"exponents must have shape ({num_steps + 1},) (one per time of the "
                         f"grid), got {lambdas.shape}")
    if not np.all(np.isfinite(lambdas)) or lambdas.min() < 0 or lambdas.max() > 1:
        raise ValueError("exponents must be finite and lie in [0, 1]")
    if np.any(np.diff(lambdas) < 0) or lambdas[-1] != 1.0:
        raise ValueError("exponents must be non-decreasing and end at 1")
    return lambdas


def check_callables(score, reward, dim: int) -> None:
    """Abstract evaluation of score(x [2, dim], t) and reward(x0 [2, dim]): TypeError /
    ValueError naming the function, before any work (every reward-driven sampler uses it)."""
    for name, fn in (("score", score), ("reward", reward)):
        if not callable(fn):
            raise TypeError(f"{name} must be callable, got {fn!r}")
    x = jax.ShapeDtypeStruct((2, dim), jnp.float32)
    t = jax.ShapeDtypeStruct((), jnp.float32)
    _expect("score(x, t)", jax.eval_shape(score, x, t), (2, dim))
    _expect("reward(x0)", jax.eval_shape(reward, x), (2,))


def _expect(what: str, out, shape: tuple[int, ...]) -> None:
    got = getattr(out, "shape", None)
    if got != shape or not jnp.issubdtype(out.dtype, jnp.floating):
        kind = f"{getattr(out, 'dtype', type(out).__name__)}{list(got or [])}"
        raise ValueError(f"{what} must return a float array of shape {shape} for N = 2, "
                         f"got {kind}")
