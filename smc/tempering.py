"""Tempering from a prior to prior(x) * L(x): fixed schedules and adaptive exponents.

gamma_lambda(x) = prior(x) L(x)^lambda, lambda from 0 to 1. Moving lambda -> lambda' weights each
particle by exp((lambda' - lambda) log L(x)). The adaptive rule picks lambda' by bisection so that
the conditional ESS of those increments on the *current weighted* particles equals target_ess * N
(docs/algorithms.md section 1). Both are Feynman-Kac models run by `smc.run`: the adaptive one is
a `weighted_step` model whose particles carry lambda, `done` once lambda = 1.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smc import resampling as resampling_lib
from smc import weights as weights_lib
from smc.engine import MOVE_REASON, SMCResult, refuse_gradient, run
from smc.feynman_kac import FeynmanKac
from smc.validation import check_fraction, static_int

Array = jax.Array
PyTree = Any
SamplePrior = Callable[[Array, int], PyTree]        # (key, N) -> particles
LogLikelihood = Callable[[PyTree], Array]           # one particle -> scalar
TemperedMove = Callable[[Array, PyTree, Array], PyTree]  # (key, particles, lambda) -> particles
Resampler = Callable[..., Array]


def _increments(delta: Array, log_likelihoods: Array) -> Array:
    # 0 * -inf would be NaN: a zero step leaves every weight as it is.
    return jnp.where(delta > 0, delta * log_likelihoods, 0.0)


def next_exponent(
    log_weights: Array,
    log_likelihoods: Array,
    exponent: Array,
    target_ess: float,
    num_iterations: int = 50,
) -> Array:
    """lambda' in (lambda, 1] with CESS(W, (lambda' - lambda) log L) = target_ess * N, by bisection.

    Returns 1 when the whole remaining step keeps CESS above the target.
    """
    n = log_weights.shape[0]
    target = target_ess * n
    # The normalised weights are loop-invariant: computed once, not once per bisection step.
    log_w = weights_lib.log_normalize(log_weights)

    def cess(next_exp: Array) -> Array:
        return weights_lib.conditional_ess(
            log_w, _increments(next_exp - exponent, log_likelihoods), normalized=True)

    def running(carry):
        # Stop early once the bracket can no longer change; the result is the same as running all
        # num_iterations. mid == high: high failed the target (or is the initial 1, which the
        # final check overrides), so the step keeps (low, high). mid == low: a low that moved
        # passed the target, so the step keeps (low, high); the initial low (= exponent) was
        # never tested, so keep iterating then.
        i, low, high = carry
        mid = 0.5 * (low + high)
        return (i < num_iterations) & (mid != high) & ((mid != low) | (low == exponent))

    def bisect(carry):
        i, low, high = carry
        mid = 0.5 * (low + high)
        above = cess(mid) >= target
        return i + 1, jnp.where(above, mid, low), jnp.where(above, high, mid)

    one = jnp.ones_like(exponent)
    _, low, high = jax.lax.while_loop(running, bisect,
                                      (jnp.asarray(0, jnp.int32), exponent, one))
    # `low` keeps CESS >= target; step at least to `high` if `low` did not move (tiny target ESS).
    solution = jnp.where(low > exponent, low, high)
    return jnp.where(cess(one) >= target, 1.0, solution)


class TemperedParticles(NamedTuple):
    """The adaptive model's particles: x (the prior's pytree, leading axis N) and the current
    exponent lambda [N], the same in every row (a field, so that resampling keeps it aligned)."""

    x: PyTree
    exponent: Array


class TemperedResult(NamedTuple):
    """`smc` holds the usual SMCResult (traces padded to max_steps); exponents [max_steps + 1]."""

    smc: SMCResult
    exponents: Array


def fixed(
    exponents: Any,
    sample_prior: SamplePrior,
    log_likelihood: LogLikelihood,
    move: TemperedMove,
) -> FeynmanKac:
    """A FeynmanKac model for a fixed schedule 0 <= lambda_0 <= ... <= lambda_T = 1 (static).

    Step t moves with a kernel invariant for gamma_{lambda_t}, then weights by
    (lambda_{t+1} - lambda_t) log L at the moved particles.
    """
    schedule = _check_schedule(exponents)
    batched = jax.vmap(log_likelihood)

    def init(key: Array, num_particles: int):
        particles = sample_prior(key, num_particles)
        return particles, _increments(schedule[0], batched(particles))

    def step(key: Array, particles: PyTree, t: Array):
        particles = move(key, particles, schedule[t])
        increments = _increments(schedule[t + 1] - schedule[t], batched(particles))
        # The move is MH, inside the step where the engine cannot see it (`run`'s docstring).
        return refuse_gradient((particles, increments), MOVE_REASON)

    return FeynmanKac(init=init, step=step, num_steps=int(schedule.shape[0]) - 1)


def adaptive_model(
    sample_prior: SamplePrior,
    log_likelihood: LogLikelihood,
    move: TemperedMove,
    *,
    target_ess: float = 0.5,
    max_steps: int = 100,
    waste_free_chains: int | None = None,
) -> FeynmanKac:
    """The adaptive tempering model over `TemperedParticles`, for `smc.run` (see `adaptive`).

    Step t moves x with `move` at the particles' lambda (not at t = 0: prior draws are exact),
    picks lambda' = `next_exponent` on the current weighted cloud (a `weighted_step`) and weights
    by (lambda' - lambda) log L; `done` once lambda = 1, within `max_steps` steps. Resampling is
    never allowed before step 0, where the prior draws have equal weights.

    waste_free_chains = M (Dau and Chopin 2022): the step does not move; run with
    resampling=`waste_free_resampling(resampling, M)` and ess_threshold=1.0, and the model's
    `move` (after each resampling) runs M chains of N / M states from the M resampled particles
    and keeps every state. N must be a multiple of M.
    """
    target_ess = check_fraction("target_ess", target_ess)
    if target_ess == 0.0:
        raise ValueError("target_ess must be > 0, or the exponent never moves")
    max_steps = static_int("max_steps", max_steps, 1)
    waste_free = waste_free_chains is not None
    if waste_free:
        waste_free_chains = static_int("waste_free_chains", waste_free_chains, 1)
    batched = jax.vmap(log_likelihood)

    def init(key: Array, num_particles: int):
        if waste_free and num_particles % waste_free_chains:
            raise ValueError(f"waste_free_chains must divide num_particles={num_particles}, "
                             f"got {waste_free_chains}")
        x = sample_prior(key, num_particles)
        zeros = jnp.zeros((num_particles,), jnp.float32)
        return TemperedParticles(x, zeros), zeros

    def step(key: Array, particles: TemperedParticles, t: Array, log_weights: Array):
        exponent = particles.exponent[0]
        x = particles.x
        if not waste_free:
            x = jax.lax.cond(t > 0, lambda x: move(key, x, exponent), lambda x: x, x)
        log_likelihoods = batched(x)
        new_exponent = next_exponent(log_weights, log_likelihoods, exponent, target_ess)
        particles = TemperedParticles(x, jnp.full_like(particles.exponent, new_exponent))
        return particles, _increments(new_exponent - exponent, log_likelihoods)

    def done(particles: TemperedParticles) -> Array:
        return particles.exponent >= 1.0

    if waste_free:
        return FeynmanKac(init=init, step=step, num_steps=max_steps, done=done,
                          move=_chains(move, waste_free_chains), weighted_step=True)
    return FeynmanKac(init=init, step=step, num_steps=max_steps, done=done,
                      resample_mask=np.arange(max_steps) > 0, weighted_step=True)


def waste_free_resampling(resampling: Resampler, num_chains: int) -> Resampler:
    """A resampler that draws `num_chains` = M ancestors with `resampling` and tiles them into the
    N slots (slot i gets draw i mod M), the layout that the waste-free move expects. Unbiased:
    each draw fills N / M slots."""
    num_chains = static_int("num_chains", num_chains, 1)

    def resample(key: Array, log_weights: Array, num_samples: int | None = None) -> Array:
        n = log_weights.shape[0] if num_samples is None else num_samples
        return jnp.tile(resampling(key, log_weights, num_chains), n // num_chains)

    return resample


def _chains(move: TemperedMove, num_chains: int):
    """The waste-free move: M chains of N / M states at the particles' lambda, every state kept.

    Chain m starts from slot m (the tiled draws make slots m, m + M, ... copies of it); state j
    of chain m goes to slot j M + m.
    """
    def run_chains(key: Array, particles: TemperedParticles, t: Array) -> TemperedParticles:
        n = particles.exponent.shape[0]
        exponent = particles.exponent[0]
        start = jax.tree_util.tree_map(lambda leaf: leaf[:num_chains], particles.x)

        def advance(x, key):
            moved = move(key, x, exponent)
            return moved, moved

        _, later = jax.lax.scan(advance, start, jax.random.split(key, n // num_chains - 1))
        x = jax.tree_util.tree_map(
            lambda first, rest: jnp.concatenate([first[None], rest]).reshape(
                (n,) + first.shape[1:]), start, later)
        return particles._replace(x=x)

    return run_chains


def adaptive(
    key: Array,
    sample_prior: SamplePrior,
    log_likelihood: LogLikelihood,
    move: TemperedMove,
    num_particles: int,
    target_ess: float = 0.5,
    resampling: Resampler = resampling_lib.systematic,
    ess_threshold: float = 1.0,
    max_steps: int = 100,
    waste_free_chains: int | None = None,
) -> TemperedResult:
    """Adaptive tempered SMC: move at lambda, reweight to the next lambda, resample (ESS rule).

    `smc.run` on `adaptive_model`. Stops at lambda = 1 or after `max_steps` (check `exponents`);
    the final particles are weighted draws at lambda = 1, not moved there. With
    `waste_free_chains = M` (Dau and Chopin 2022) every step resamples M particles and keeps every
    state of M chains of N / M applications of `move`, instead of resampling N and moving each
    once (ess_threshold is then ignored).
    """
    check_fraction("ess_threshold", ess_threshold)
    model = adaptive_model(sample_prior, log_likelihood, move, target_ess=target_ess,
                           max_steps=max_steps, waste_free_chains=waste_free_chains)
    if waste_free_chains is not None:
        resampling = waste_free_resampling(resampling, waste_free_chains)
        ess_threshold = 1.0
    result = run(key, model, num_particles, resampling, ess_threshold, summary=_exponent)
    return TemperedResult(smc=result._replace(particles=result.particles.x),
                          exponents=result.summaries)


def _exponent(particles: TemperedParticles, log_weights: Array) -> Array:
    return particles.exponent[0]


def _check_schedule(exponents: Any) -> Array:
    """A static schedule: 1-D, >= 2 entries, finite, non-decreasing from >= 0, ending at 1."""
    if isinstance(exponents, jax.core.Tracer):
        raise TypeError("exponents must be a static schedule, not a traced value")
    schedule = np.asarray(exponents, dtype=np.float64)
    if schedule.ndim != 1 or schedule.size < 2:
        raise ValueError(f"exponents must be a 1-D schedule with at least two entries, "
                         f"got shape {schedule.shape}")
    if not np.all(np.isfinite(schedule)):
        raise ValueError(f"exponents must be finite, got {schedule}")
    if np.any(np.diff(schedule) < 0) or schedule[0] < 0:
        raise ValueError(f"exponents must be non-decreasing from >= 0, got {schedule}")
    if schedule[-1] != 1.0:
        raise ValueError(f"exponents must end at 1 (the posterior), got {schedule[-1]}")
    return jnp.asarray(schedule, jnp.float32)
