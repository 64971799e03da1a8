"""The SMC engine: reweight, resample when the ESS drops, move, repeat.

log Z_hat = sum_t log sum_i W_{t-1}[i] exp(G_t[i]) is kept as a running total, so resampling
(which resets log-weights to zero) never changes it (reference.md section 1).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jax.sharding import Mesh

from smc import distributed
from smc import resampling as resampling_lib
from smc import weights as weights_lib
from smc.feynman_kac import FeynmanKac
from smc.validation import check_model, check_run_arguments

Array = jax.Array
PyTree = Any
Resampler = Callable[..., Array]


class SMCState(NamedTuple):
    """particles (leading axis N), log_weights [N], log_evidence scalar (running log Z_hat)."""

    particles: PyTree
    log_weights: Array
    log_evidence: Array


class Loop(NamedTuple):
    """The step loop's carry: the state, log_total = logsumexp(log_weights) and their ESS."""

    state: SMCState
    log_total: Array
    ess: Array


class SMCResult(NamedTuple):
    """Output of `run`. Traces have one entry per step; entry 0 is the initial weighting.

    ess [T+1]; log_evidence_increments [T+1]; resampled [T] (before step t); nan_increments [T+1]
    counts particles whose increment was NaN; ancestors [T, N] when recorded, else None.
    num_steps: steps actually taken (< T when `done` stopped early; traces past it are padding).
    degenerate: every weight is zero (log_evidence = -inf).
    """

    particles: PyTree
    log_weights: Array
    log_evidence: Array
    ess: Array
    log_evidence_increments: Array
    resampled: Array
    nan_increments: Array
    num_steps: Array
    degenerate: Array
    ancestors: Array | None = None

    @property
    def weights(self) -> Array:
        """Normalised weights W [N] (per run when runs are vmapped: [..., N])."""
        return weights_lib.normalize(self.log_weights)


def gather(particles: PyTree, ancestors: Array) -> PyTree:
    """particles[ancestors] along the leading axis of every leaf; ancestors must lie in [0, N).

    Resamplers return indices in range, so none are checked: no wrapping of negative indices and
    no NaN fill for out-of-range ones (jnp.take's default), which XLA fuses into the copy and
    which made it cost about twice a plain gather on CPU. XLA clamps out-of-range indices.
    """
    ancestors = ancestors.astype(jnp.int32)[:, None]

    def take(leaf: Array) -> Array:
        dims = jax.lax.GatherDimensionNumbers(offset_dims=tuple(range(1, leaf.ndim)),
                                              collapsed_slice_dims=(0,), start_index_map=(0,))
        return jax.lax.gather(leaf, ancestors, dims, (1,) + leaf.shape[1:],
                              mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)

    return jax.tree_util.tree_map(take, particles)


def reweight(state: SMCState, log_increments: Array) -> tuple[SMCState, Array]:
    """logw += G; log Z_hat += log sum W G. Returns the new state and the log Z increment.

    Once every weight is zero the evidence stays -inf (never -inf - -inf = NaN); a NaN increment
    propagates to log Z_hat so that it is visible, not hidden.
    """
    new, increment, _ = _reweight(state, log_increments, logsumexp(state.log_weights))
    return new, increment


def _reweight(state: SMCState, log_increments: Array, before: Array
              ) -> tuple[SMCState, Array, Array]:
    """`reweight` given before = logsumexp(logw); also returns after = logsumexp(logw + G)."""
    log_weights = state.log_weights + log_increments
    after = logsumexp(log_weights)
    increment = jnp.where(jnp.isneginf(before), -jnp.inf, after - before)
    return SMCState(state.particles, log_weights, state.log_evidence + increment), increment, after


def resample(key: Array, state: SMCState, resampling: Resampler) -> tuple[SMCState, Array]:
    """Draw ancestors, copy particles, reset log-weights to 0 (log Z_hat unchanged)."""
    n = state.log_weights.shape[0]
    dead = jnp.isneginf(logsumexp(state.log_weights))
    # Resampling a dead or NaN cloud would invent weights; keep it as it is so the result says so.
    usable = ~dead & ~jnp.any(jnp.isnan(state.log_weights))
    safe_log_weights = jnp.where(usable, state.log_weights, 0.0)
    ancestors = jnp.where(usable, resampling(key, safe_log_weights), jnp.arange(n, dtype=jnp.int32))
    log_weights = jnp.where(usable, jnp.zeros_like(state.log_weights), state.log_weights)
    return SMCState(gather(state.particles, ancestors), log_weights, state.log_evidence), ancestors


def resample_move(
    key: Array,
    state: SMCState,
    t: Array,
    *,
    resampling: Resampler,
    ess_threshold: float,
    move: Callable[[Array, PyTree, Array], PyTree] | None,
    branchless: bool = False,
    allowed: Array | None = None,
    ess: Array | None = None,
) -> tuple[SMCState, Array, Array]:
    """Resample (and then move) when ESS < threshold * N; threshold 1 = always, 0 = never.

    Returns (state, resampled flag, ancestors). `allowed` (bool scalar) can veto resampling at
    this step. `branchless` computes both outcomes and selects (needed when particles are
    sharded). `ess`: the current weights' ESS when the caller has it (else computed here).
    """
    n = state.log_weights.shape[0]
    identity = jnp.arange(n, dtype=jnp.int32)
    if ess_threshold <= 0.0:
        return state, jnp.asarray(False), identity
    key_resample, key_move = jax.random.split(key)

    def do(state: SMCState) -> tuple[SMCState, Array]:
        state, ancestors = resample(key_resample, state, resampling)
        if move is not None:
            state = state._replace(particles=move(key_move, state.particles, t))
        return state, ancestors

    if ess_threshold >= 1.0 and allowed is None:
        state, ancestors = do(state)
        return state, jnp.asarray(True), ancestors
    if ess_threshold < 1.0 and ess is None:
        ess = weights_lib.ess(state.log_weights)
    flag = jnp.asarray(True) if ess_threshold >= 1.0 else ess < ess_threshold * n
    if allowed is not None:
        flag = flag & allowed
    if not branchless:
        state, ancestors = jax.lax.cond(flag, do, lambda s: (s, identity), state)
        return state, flag, ancestors
    # Sharded: each device evaluates the predicate from its own all-reduce, whose rounding may
    # differ, and devices that branch apart deadlock in the next collective. Select instead.
    resampled, ancestors = do(state)
    state = jax.tree_util.tree_map(lambda new, old: jnp.where(flag, new, old), resampled, state)
    return state, flag, jnp.where(flag, ancestors, identity)


def run(
    key: Array,
    model: FeynmanKac,
    num_particles: int,
    resampling: Resampler = resampling_lib.systematic,
    ess_threshold: float = 0.5,
    *,
    record_ancestors: bool = False,
    mesh: Mesh | None = None,
    axis_name: str = "particles",
    islands: bool = False,
) -> SMCResult:
    """Run SMC on `model` with N = num_particles; pure in `key`, works under jit and vmap.

    A fixed-length model runs in `lax.scan`; a model with `done` runs in `lax.while_loop` for at
    most `num_steps` steps. With a `mesh`, particles are sharded over its `axis_name`: resampling is
    global (exact; XLA communicates) or, with `islands=True`, local to each device with the
    islands pooled by their evidence at the end (traces then carry a leading island axis).
    """
    check_run_arguments(num_particles, ess_threshold)
    options = dict(resampling=resampling, ess_threshold=ess_threshold,
                   record_ancestors=record_ancestors)
    if mesh is not None:
        devices = distributed.num_shards(mesh, axis_name, num_particles)
        if islands:
            local = num_particles // devices
            check_model(model, local)
            return distributed.run_islands(lambda k: _run(k, model, local, None, **options),
                                           key, mesh, axis_name, devices)
        check_model(model, num_particles)
        return _run(key, model, num_particles, distributed.particle_sharding(mesh, axis_name),
                    **options)
    if islands:
        raise ValueError("islands=True needs a mesh")
    check_model(model, num_particles)
    return _run(key, model, num_particles, None, **options)


def _run(key, model, num_particles, sharding, *, resampling, ess_threshold,
         record_ancestors) -> SMCResult:
    constrain = _constrainer(sharding)
    n = num_particles
    num_steps = int(model.num_steps)
    mask = None if model.resample_mask is None else jnp.asarray(model.resample_mask, bool)

    key_init, key_loop = jax.random.split(key)
    particles, log_weights = model.init(key_init, n)
    log_weights = constrain(log_weights)
    # G0 is a reweighting of uniform weights, so log Z_hat starts at log mean exp(G0).
    uniform = SMCState(constrain(particles), jnp.zeros_like(log_weights),
                       jnp.zeros((), log_weights.dtype))
    log_n = jnp.log(jnp.asarray(n, log_weights.dtype))
    state, increment0, total0 = _reweight(uniform, log_weights, log_n)
    nan0 = jnp.sum(jnp.isnan(log_weights)).astype(jnp.int32)
    ess0 = weights_lib.ess_given_total(state.log_weights, total0)

    def one_step(key: Array, loop: Loop, t: Array):
        # The loop carries logsumexp(logw) and the ESS of the weights, so that each step makes
        # one pass over them for the evidence, the trace and the next resampling decision.
        key_resample, key_step = jax.random.split(key)
        state, flag, ancestors = resample_move(
            key_resample, loop.state, t, resampling=resampling, ess_threshold=ess_threshold,
            move=model.move, branchless=sharding is not None,
            allowed=None if mask is None else mask[t], ess=loop.ess)
        # resample resets usable weights to 0 (logsumexp = log n); it leaves dead or NaN ones
        usable = ~jnp.isneginf(loop.log_total) & ~jnp.isnan(loop.log_total)
        before = jnp.where(flag & usable, log_n, loop.log_total)
        particles, log_increments = model.step(key_step, state.particles, t)
        state, increment, after = _reweight(state._replace(particles=constrain(particles)),
                                            constrain(log_increments), before)
        ess = weights_lib.ess_given_total(state.log_weights, after)
        trace = (ess, increment, flag, jnp.sum(jnp.isnan(log_increments)).astype(jnp.int32))
        if record_ancestors:
            trace = trace + (ancestors,)
        return Loop(state, after, ess), trace

    keys = jax.random.split(key_loop, max(num_steps, 1))[:num_steps]
    loop = Loop(state, total0, ess0)
    if model.done is None:
        def scan_body(loop, inputs):
            key, t = inputs
            return one_step(key, loop, t)

        loop, traces = jax.lax.scan(scan_body, loop, (keys, jnp.arange(num_steps, dtype=jnp.int32)))
        steps_taken = jnp.asarray(num_steps, jnp.int32)
    else:
        loop, traces, steps_taken = _while(one_step, model.done, loop, keys, num_steps,
                                           record_ancestors, n, ess0.dtype)
    state = loop.state

    ess_trace, increments, flags, nans = traces[:4]
    ess_all = jnp.concatenate([ess0[None], ess_trace])
    increments_all = jnp.concatenate([increment0[None], increments])
    nans_all = jnp.concatenate([nan0[None], nans])
    degenerate = jnp.isneginf(loop.log_total)
    return SMCResult(
        particles=state.particles,
        log_weights=state.log_weights,
        log_evidence=state.log_evidence,
        ess=ess_all,
        log_evidence_increments=increments_all,
        resampled=flags,
        nan_increments=nans_all,
        num_steps=steps_taken,
        degenerate=degenerate,
        ancestors=traces[4] if record_ancestors else None,
    )


def _while(one_step, done, loop, keys, max_steps, record_ancestors, n, dtype):
    """lax.while_loop over steps until done(particles) holds for all, with static-size traces."""
    traces = (jnp.zeros(max_steps, dtype), jnp.zeros(max_steps, dtype),
              jnp.zeros(max_steps, bool), jnp.zeros(max_steps, jnp.int32))
    if record_ancestors:
        traces = traces + (jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (max_steps, n)),)

    def cond(carry):
        t, loop, _ = carry
        return (t < max_steps) & ~jnp.all(done(loop.state.particles))

    def body(carry):
        t, loop, traces = carry
        loop, trace = one_step(keys[t], loop, t)
        traces = tuple(buf.at[t].set(value) for buf, value in zip(traces, trace))
        return t + 1, loop, traces

    t, loop, traces = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), loop, traces))
    return loop, traces, t


def _constrainer(sharding: Any) -> Callable[[PyTree], PyTree]:
    if sharding is None:
        return lambda tree: tree
    return lambda tree: jax.lax.with_sharding_constraint(tree, sharding)
