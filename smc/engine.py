"""The SMC engine: reweight, resample when the ESS drops, move, repeat.

log Z_hat = sum_t log sum_i W_{t-1}[i] exp(G_t[i]) is kept as a running total, so resampling
(which resets log-weights to zero) never changes it (docs/algorithms.md section 1). Resampling
passes gradients on by the stop-gradient estimator of Scibior and Wood (2021), which leaves every
value unchanged (docs/algorithms.md section 9).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jax.sharding import Mesh

from smc import distributed, memory
from smc import resampling as resampling_lib
from smc import weights as weights_lib
from smc.feynman_kac import FeynmanKac
from smc.validation import check_model, check_run_arguments

Array = jax.Array
PyTree = Any
Resampler = Callable[..., Array]
Summary = Callable[[PyTree, Array], PyTree]


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


class Trace(NamedTuple):
    """What one step records; `run` stacks these over steps (None: not recorded)."""

    ess: Array
    log_evidence_increment: Array
    resampled: Array
    nonfinite_increments: Array
    ancestors: Array | None
    summary: PyTree | None


class SMCResult(NamedTuple):
    """Output of `run`. Traces have one entry per step; entry 0 is the initial weighting.

    ess [T+1]; log_evidence_increments [T+1]; resampled [T] (before step t);
    nonfinite_increments [T+1] counts particles whose initial log-weight (entry 0) or increment was
    NaN or +inf; ancestors [T, N] when recorded, else None; summaries: `run`'s
    summary(particles, log_weights) after init and after each step (every leaf with a leading axis
    [T+1]), else None.
    num_steps: steps actually taken (< T when `done` stopped early; traces past it are padding:
    zeros, identity ancestors).
    degenerate: the final weights cannot represent the target: every weight is zero
    (log_evidence = -inf), or some weight is NaN or +inf (log_evidence is then NaN or +inf, never
    a finite number). Such a cloud is never resampled (the engine keeps it as it is, identity
    ancestors), so a NaN or +inf weight, once there, stays to the end and sets this flag.
    Always check it (and `nonfinite_increments`) before using log_evidence or the particles.
    """

    particles: PyTree
    log_weights: Array
    log_evidence: Array
    ess: Array
    log_evidence_increments: Array
    resampled: Array
    nonfinite_increments: Array
    num_steps: Array
    degenerate: Array
    ancestors: Array | None = None
    summaries: PyTree | None = None

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

    Once every weight is zero the evidence stays -inf (never -inf - -inf = NaN); a NaN or +inf
    increment propagates to log Z_hat (NaN or +inf) so that it is visible, not hidden.
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
    """Draw ancestors, copy particles, reset log-weights to 0 (log Z_hat unchanged).

    Values are those of plain resampling; derivatives follow Scibior and Wood (2021)
    (docs/algorithms.md section 9): the new log-weight of slot i is 0 with the derivative of
    logw[a_i] (logw[a_i] - stop_gradient(logw[a_i])), and log Z_hat hands the derivative of its
    current term, logsumexp(logw), over to them, so that the derivative of the final log Z_hat is
    sum_i W_T[i] d logw_T[i] along each particle's ancestry. Ancestor indices carry no derivative.
    """
    n = state.log_weights.shape[0]
    log_total = logsumexp(state.log_weights)
    # Resampling a dead cloud, or one with a NaN or +inf weight, would invent weights; keep it as
    # it is so that the result says so.
    usable = jnp.isfinite(log_total)
    safe_log_weights = jnp.where(usable, state.log_weights, 0.0)
    ancestors = jnp.where(usable, resampling(key, safe_log_weights), jnp.arange(n, dtype=jnp.int32))
    ancestors = jax.lax.stop_gradient(ancestors)
    log_weights = jnp.where(usable, zero_with_gradient(gather(state.log_weights, ancestors)),
                            state.log_weights)
    log_evidence = jnp.where(usable, state.log_evidence - zero_with_gradient(log_total),
                             state.log_evidence)
    return SMCState(gather(state.particles, ancestors), log_weights, log_evidence), ancestors


@jax.custom_jvp
def zero_with_gradient(x: Array) -> Array:
    """Zeros shaped like x whose derivative is x's: x - stop_gradient(x) for finite x.

    Its value never depends on x, so without differentiation XLA removes the computation of x,
    and an x of -inf (a particle no resampler selects) gives 0, never -inf - -inf = NaN.
    """
    return jnp.zeros_like(x)


@zero_with_gradient.defjvp
def _zero_with_gradient_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return jnp.zeros_like(x), x_dot


MOVE_REASON = "through an MH move (`move`): its accept/reject is a discrete choice"


def refuse_gradient(tree: PyTree, reason: str) -> PyTree:
    """tree unchanged; differentiating through it raises ValueError(reason) while tracing.

    Marks the values through which the engine's gradient estimator cannot hold (docs/algorithms.md
    section 9): values not being differentiated pass without a word.
    """
    @jax.custom_jvp
    def identity(tree: PyTree) -> PyTree:
        return tree

    @identity.defjvp
    def refuse(primals, tangents):
        raise ValueError(f"smc.run cannot differentiate {reason}; see docs/algorithms.md "
                         f"section 9")

    return identity(tree)


def count_nonfinite(log_values: Array) -> Array:
    """Number of entries that are NaN or +inf (int32 scalar): no weight can represent them,
    whereas -inf is a valid zero weight."""
    return jnp.sum(~(log_values < jnp.inf)).astype(jnp.int32)


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
            # An MH move accepts or rejects, a discrete choice that no derivative sees, by a ratio
            # of the current target: refuse once its particles or weights (the target) depend on
            # what is differentiated.
            _, moved = refuse_gradient((state.log_weights, move(key_move, state.particles, t)),
                                       MOVE_REASON)
            state = state._replace(particles=moved)
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
    resampling: Resampler | str = resampling_lib.systematic,
    ess_threshold: float = 0.5,
    *,
    record_ancestors: bool = False,
    summary: Summary | None = None,
    mesh: Mesh | None = None,
    axis_name: str = "particles",
    islands: bool = False,
) -> SMCResult:
    """Run SMC on `model` with N = num_particles; pure in `key`, works under jit and vmap.

    A fixed-length model runs in `lax.scan`; a model with `done` runs in `lax.while_loop` until
    `done` holds, for at most `num_steps` steps, and also stops once the cloud is dead (every
    weight zero) or holds a NaN or +inf weight: no step can move on from there, since resampling
    it would invent weights (`SMCResult.degenerate` then says so).
    resampling: a scheme (key, log_weights, num_samples) -> ancestors, or its name in
    `smc.resampling.SCHEMES` ("systematic", "multinomial", ...).
    summary(particles, log_weights) -> pytree: recorded after init and after every step, returned
    as `SMCResult.summaries` (e.g. a tempering exponent, a weighted mean).
    With a `mesh`, particles are sharded over its `axis_name`: resampling is global (exact; XLA
    communicates) or, with `islands=True`, local to each device with the islands pooled by their
    evidence at the end (traces then carry a leading island axis).

    dtypes: init's log-weights and step's increments are cast to one dtype, their
    `jnp.promote_types` and at least float32 (float64 only when x64 is enabled); the log-weights,
    log_evidence and traces have it. Half precision cannot hold a log-evidence.

    Memory: before compiling, `smc.memory.check_fits` refuses (MemoryError, with the figures) a run
    whose `smc.memory.estimate_bytes` exceeds the device's memory, per device with a mesh; the
    estimate is for one run (a `vmap` over R runs needs about R times it) and is a lower bound.
    SMC_SKIP_MEMORY_CHECK=1 in the environment skips the check.

    Gradients (docs/algorithms.md section 9): `jax.grad` of log_evidence with respect to
    parameters that the model closes over is the estimator of Scibior and Wood (2021), a
    consistent estimate of grad log Z when each step's particles are differentiable functions of
    the parameters at fixed random numbers (reparameterised kernels) or do not depend on them.
    The forward pass is unchanged. Where it cannot hold, differentiating raises ValueError: through
    a `weighted_step` model's log-weights (the step chooses its target from them, a discrete
    choice: adaptive tempering) or through a `move` (MH accept/reject). A model with `done` runs in
    a while loop, which `jax.grad` refuses. Proposals that draw discrete values (tokens) from
    parameter-dependent probabilities miss the derivative of those draws: not detected.
    """
    check_run_arguments(num_particles, ess_threshold)
    resampling = resampling_lib.resolve(resampling)
    if summary is not None and not callable(summary):
        raise TypeError(f"summary must be callable (particles, log_weights) -> pytree, "
                        f"got {summary!r}")
    if islands and mesh is None:
        raise ValueError("islands=True needs a mesh")
    devices = 1 if mesh is None else distributed.num_shards(mesh, axis_name, num_particles)
    local = num_particles // devices if islands else num_particles
    shapes = check_model(model, local)
    dtype = log_weight_dtype(shapes.log_weights.dtype, shapes.increments.dtype)
    needed = memory.estimate_bytes(model, num_particles, record_ancestors=record_ancestors,
                                   summary=summary, particles=shapes.particles,
                                   log_weight_dtype=dtype) // devices
    # a device of this process: another host's cannot be asked for its memory
    memory.check_fits(needed, None if mesh is None else mesh.local_devices[0])
    options = {"resampling": resampling, "ess_threshold": ess_threshold,
               "record_ancestors": record_ancestors, "summary": summary, "dtype": dtype}
    if islands:
        return distributed.run_islands(lambda k: _run(k, model, local, None, **options),
                                       key, mesh, axis_name, devices)
    sharding = None if mesh is None else distributed.particle_sharding(mesh, axis_name)
    return _run(key, model, num_particles, sharding, **options)


def log_weight_dtype(*dtypes: Any) -> jnp.dtype:
    """The one dtype of log-weights and increments: the promotion of `dtypes`, at least float32
    (float64 only when x64 is enabled)."""
    promoted = jnp.float32
    for dtype in dtypes:
        promoted = jnp.promote_types(promoted, dtype)
    return jax.dtypes.canonicalize_dtype(promoted)


def _run(key, model, num_particles, sharding, *, resampling, ess_threshold,
         record_ancestors, summary, dtype) -> SMCResult:
    constrain = _constrainer(sharding)
    n = num_particles
    num_steps = int(model.num_steps)
    mask = None if model.resample_mask is None else jnp.asarray(model.resample_mask, bool)

    key_init, key_loop = jax.random.split(key)
    particles, log_weights = model.init(key_init, n)
    log_weights = constrain(log_weights.astype(dtype))
    # G0 is a reweighting of uniform weights, so log Z_hat starts at log mean exp(G0).
    uniform = SMCState(constrain(particles), jnp.zeros_like(log_weights),
                       jnp.zeros((), log_weights.dtype))
    log_n = jnp.log(jnp.asarray(n, log_weights.dtype))
    state, increment0, total0 = _reweight(uniform, log_weights, log_n)
    nonfinite0 = count_nonfinite(log_weights)
    ess0 = weights_lib.ess_given_total(state.log_weights, total0)

    def summarise(state: SMCState) -> PyTree | None:
        if summary is None:
            return None
        return jax.tree_util.tree_map(jnp.asarray, summary(state.particles, state.log_weights))

    summary0 = summarise(state)

    def one_step(key: Array, loop: Loop, t: Array):
        # The loop carries logsumexp(logw) and the ESS of the weights, so that each step makes
        # one pass over them for the evidence, the trace and the next resampling decision.
        key_resample, key_step = jax.random.split(key)
        state, flag, ancestors = resample_move(
            key_resample, loop.state, t, resampling=resampling, ess_threshold=ess_threshold,
            move=model.move, branchless=sharding is not None,
            allowed=None if mask is None else mask[t], ess=loop.ess)
        # resample resets usable weights to 0 (logsumexp = log n); it leaves dead, NaN or +inf
        # ones as they are
        before = jnp.where(flag & jnp.isfinite(loop.log_total), log_n, loop.log_total)
        if model.weighted_step:
            # The step chooses its target from the weights (e.g. a tempering exponent by
            # bisection): a discrete choice that no derivative sees.
            seen = refuse_gradient(state.log_weights, "through the log-weights that a "
                                   "`weighted_step` model chooses its target from")
            particles, log_increments = model.step(key_step, state.particles, t, seen)
        else:
            particles, log_increments = model.step(key_step, state.particles, t)
        log_increments = constrain(log_increments.astype(dtype))
        state, increment, after = _reweight(state._replace(particles=constrain(particles)),
                                            log_increments, before)
        ess = weights_lib.ess_given_total(state.log_weights, after)
        trace = Trace(ess, increment, flag, count_nonfinite(log_increments),
                      ancestors if record_ancestors else None, summarise(state))
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
        padding = Trace(jnp.zeros((), ess0.dtype), jnp.zeros((), ess0.dtype),
                        jnp.asarray(False), jnp.zeros((), jnp.int32),
                        jnp.arange(n, dtype=jnp.int32) if record_ancestors else None,
                        _zeros_like(summary0))
        loop, traces, steps_taken = _while(one_step, model.done, loop, keys, num_steps, padding)
    state = loop.state

    def prepend(first: PyTree, rest: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)

    return SMCResult(
        particles=state.particles,
        log_weights=state.log_weights,
        log_evidence=state.log_evidence,
        ess=prepend(ess0, traces.ess),
        log_evidence_increments=prepend(increment0, traces.log_evidence_increment),
        resampled=traces.resampled,
        nonfinite_increments=prepend(nonfinite0, traces.nonfinite_increments),
        num_steps=steps_taken,
        degenerate=~jnp.isfinite(loop.log_total),
        ancestors=traces.ancestors,
        summaries=prepend(summary0, traces.summary),
    )


def _while(one_step, done, loop, keys, max_steps, padding: Trace):
    """lax.while_loop over steps until done(particles) holds for all or the cloud is dead or holds
    a NaN or +inf weight, with static-size traces: `padding` (one step's Trace) repeated max_steps
    times, overwritten step by step."""
    traces = jax.tree_util.tree_map(
        lambda value: jnp.broadcast_to(value, (max_steps,) + value.shape), padding)

    def cond(carry):
        t, loop, _ = carry
        # A dead cloud (log_total = -inf) or one with a NaN or +inf weight can never recover.
        alive = jnp.isfinite(loop.log_total)
        return (t < max_steps) & alive & ~jnp.all(done(loop.state.particles))

    def body(carry):
        t, loop, traces = carry
        loop, trace = one_step(keys[t], loop, t)
        traces = jax.tree_util.tree_map(lambda buf, value: buf.at[t].set(value), traces, trace)
        return t + 1, loop, traces

    t, loop, traces = jax.lax.while_loop(cond, body, (jnp.asarray(0, jnp.int32), loop, traces))
    return loop, traces, t


def _zeros_like(shapes: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _constrainer(sharding: Any) -> Callable[[PyTree], PyTree]:
    if sharding is None:
        return lambda tree: tree
    return lambda tree: distributed.constrain_particles(tree, sharding)
