"""Tempering from a prior to prior(x) * L(x): fixed schedules and adaptive exponents.

gamma_lambda(x) = prior(x) L(x)^lambda, lambda from 0 to 1. Moving lambda -> lambda' weights each
particle by exp((lambda' - lambda) log L(x)). The adaptive rule picks lambda' by bisection so that the
conditional ESS of those increments on the *current weighted* particles equals target_ess * N.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smc import resampling as resampling_lib
from smc import weights as weights_lib
from smc.engine import SMCResult, SMCState, gather, resample_move, reweight
from smc.feynman_kac import FeynmanKac
from smc.validation import check_fraction, check_num_particles, check_particles

Array = jax.Array
PyTree = Any
SamplePrior = Callable[[Array, int], PyTree]        # (key, N) -> particles
LogLikelihood = Callable[[PyTree], Array]           # one particle -> scalar
TemperedMove = Callable[[Array, PyTree, Array], PyTree]  # (key, particles, lambda) -> particles


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
    """A FeynmanKac model for a fixed schedule 0 <= lambda_0 < ... < lambda_T = 1 (static).

    Step t moves with a kernel invariant for gamma_{lambda_t}, then weights by
    (lambda_{t+1} - lambda_t) log L at the moved particles.
    """
    schedule = np.asarray(exponents, dtype=np.float32)
    if schedule.ndim != 1 or schedule.size < 2:
        raise ValueError("exponents must be a 1-D schedule with at least two entries")
    if np.any(np.diff(schedule) < 0) or schedule[0] < 0 or schedule[-1] > 1:
        raise ValueError("exponents must be non-decreasing and lie in [0, 1]")
    schedule = jnp.asarray(schedule)
    batched = jax.vmap(log_likelihood)

    def init(key: Array, num_particles: int):
        particles = sample_prior(key, num_particles)
        return particles, _increments(schedule[0], batched(particles))

    def step(key: Array, particles: PyTree, t: Array):
        particles = move(key, particles, schedule[t])
        return particles, _increments(schedule[t + 1] - schedule[t], batched(particles))

    return FeynmanKac(init=init, step=step, num_steps=int(schedule.shape[0]) - 1)


def adaptive(
    key: Array,
    sample_prior: SamplePrior,
    log_likelihood: LogLikelihood,
    move: TemperedMove,
    num_particles: int,
    target_ess: float = 0.5,
    resampling: Callable[..., Array] = resampling_lib.systematic,
    ess_threshold: float = 1.0,
    max_steps: int = 100,
    waste_free_chains: int | None = None,
) -> TemperedResult:
    """Adaptive tempered SMC: reweight to the next lambda, resample (ESS rule), move at lambda'.

    Stops at lambda = 1 or after `max_steps` (check `exponents`). With `waste_free_chains = M`
    (Dau and Chopin 2022) each step resamples M particles and keeps every state of M chains of
    N / M applications of `move`, instead of resampling N and moving each once.
    """
    check_num_particles(num_particles)
    check_fraction("target_ess", target_ess)
    check_fraction("ess_threshold", ess_threshold)
    if target_ess == 0.0:
        raise ValueError("target_ess must be > 0, or the exponent never moves")
    if waste_free_chains is not None and (waste_free_chains < 1
                                          or num_particles % waste_free_chains):
        raise ValueError(f"waste_free_chains must divide num_particles={num_particles}, "
                         f"got {waste_free_chains}")
    n = num_particles
    batched = jax.vmap(log_likelihood)
    key_init, key_loop = jax.random.split(key)
    particles = sample_prior(key_init, n)
    check_particles(particles, n, "sample_prior")
    log_weights = jnp.zeros((n,), jnp.float32)
    state = SMCState(particles, log_weights, jnp.zeros((), jnp.float32))

    def body(carry):
        t, exponent, state, traces = carry
        key_resample, key_move = jax.random.split(jax.random.fold_in(key_loop, t))
        log_likelihoods = batched(state.particles)
        new_exponent = next_exponent(state.log_weights, log_likelihoods, exponent, target_ess)
        increments = _increments(new_exponent - exponent, log_likelihoods)
        state, increment = reweight(state, increments)
        if waste_free_chains is None:
            state, flag, _ = resample_move(key_resample, state, t, resampling=resampling,
                                           ess_threshold=ess_threshold, move=None)
            state = state._replace(particles=move(key_move, state.particles, new_exponent))
        else:
            state = _waste_free(key_resample, key_move, state, new_exponent, move, resampling,
                                waste_free_chains)
            flag = jnp.asarray(True)
        ess_trace, inc_trace, flags, nans, exps = traces
        traces = (ess_trace.at[t + 1].set(weights_lib.ess(state.log_weights)),
                  inc_trace.at[t + 1].set(increment), flags.at[t].set(flag),
                  nans.at[t + 1].set(jnp.sum(jnp.isnan(increments)).astype(jnp.int32)),
                  exps.at[t + 1].set(new_exponent))
        return t + 1, new_exponent, state, traces

    def cond(carry):
        t, exponent, state, _ = carry
        alive = jnp.isfinite(state.log_evidence)  # a dead or NaN cloud cannot move on
        return (t < max_steps) & (exponent < 1.0) & alive

    traces = (jnp.zeros(max_steps + 1).at[0].set(float(n)), jnp.zeros(max_steps + 1),
              jnp.zeros(max_steps, bool), jnp.zeros(max_steps + 1, jnp.int32),
              jnp.zeros(max_steps + 1))
    start = (jnp.asarray(0, jnp.int32), jnp.asarray(0.0, jnp.float32), state, traces)
    t, exponent, state, traces = jax.lax.while_loop(cond, body, start)
    ess_trace, inc_trace, flags, nans, exps = traces
    result = SMCResult(
        particles=state.particles, log_weights=state.log_weights, log_evidence=state.log_evidence,
        ess=ess_trace, log_evidence_increments=inc_trace, resampled=flags, nan_increments=nans,
        num_steps=t, degenerate=jnp.isneginf(state.log_evidence))
    return TemperedResult(smc=result, exponents=exps)


def _waste_free(key_resample, key_move, state, exponent, move, resampling, num_chains):
    """Resample M starting points, run M chains of N/M states each, keep every state."""
    n = state.log_weights.shape[0]
    length = n // num_chains
    ancestors = resampling(key_resample, state.log_weights, num_chains)
    start = gather(state.particles, ancestors)

    def advance(particles, key):
        moved = move(key, particles, exponent)
        return moved, moved

    _, later = jax.lax.scan(advance, start, jax.random.split(key_move, length - 1))
    chains = jax.tree_util.tree_map(
        lambda first, rest: jnp.concatenate([first[None], rest]).reshape((n,) + first.shape[1:]),
        start, later)
    return SMCState(chains, jnp.zeros_like(state.log_weights), state.log_evidence)
