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
from smc.feynman_kac import FeynmanKac, group_rows
from smc.validation import check_model, check_run_arguments

Array = jax.Array
PyTree = Any
Resampler = Callable[..., Array]
Summary = Callable[[PyTree, Array], PyTree]


class SMCState(NamedTuple):
    """particles (leading axis N), log_weights [N], log_evidence scalar (running log Z_hat).

    Inside a run of G groups (`FeynmanKac.groups`): particles and log_weights [G * N], group
    after group, and log_evidence [G].
    """

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
    """`reweight` given before = logsumexp(logw) of each group ([G], or a scalar for one group,
    the shape of log_evidence); also returns after = logsumexp(logw + G) per group."""
    log_weights = state.log_weights + log_increments
    after = logsumexp(log_weights.reshape(before.shape + (-1,)), axis=-1)
    increment = jnp.where(jnp.isneginf(before), -jnp.inf, after - before)
    return SMCState(state.particles, log_weights, state.log_evidence + increment), increment, after


def resample(key: Array, state: SMCState, resampling: Resampler) -> tuple[SMCState, Array]:
    """Draw ancestors, copy particles, reset log-weights to 0 (log Z_hat unchanged).

    Values are those of plain resampling; derivatives follow Scibior and Wood (2021)
    (docs/algorithms.md section 9): the new log-weight of slot i is 0 with the derivative of
    logw[a_i] (logw[a_i] - stop_gradient(logw[a_i])), and log Z_hat hands the derivative of its
    current term, logsumexp(logw), over to them, so that the derivative of the final log Z_hat is
    sum_i W_T[i] d logw_T[i] along each particle's ancestry. Ancestor indices carry no derivative.
    A dead cloud, or one with a NaN or +inf weight, is kept as it is (identity ancestors):
    resampling it would invent weights.
    """
    one_group = state._replace(log_evidence=state.log_evidence[None])
    new, ancestors = resample_groups(key[None], one_group, resampling, jnp.ones((1,), bool))
    return new._replace(log_evidence=new.log_evidence[0]), ancestors[0]


def resample_groups(keys: Array, state: SMCState, resampling: Resampler, flags: Array
                    ) -> tuple[SMCState, Array]:
    """`resample` for each of G groups whose flag [G] is set, each within itself with its own
    key (keys [G]); the others keep their particles and weights. Returns the state and the
    ancestors [G, N], indices within each group (identity where nothing was resampled)."""
    groups = flags.shape[0]
    log_weights = state.log_weights.reshape(groups, -1)
    n = log_weights.shape[1]
    log_total = logsumexp(log_weights, axis=-1)
    usable = flags & jnp.isfinite(log_total)
    safe_log_weights = jnp.where(usable[:, None], log_weights, 0.0)
    identity = identity_ancestors(groups, n)
    ancestors = jnp.where(usable[:, None], jax.vmap(resampling)(keys, safe_log_weights), identity)
    ancestors = jax.lax.stop_gradient(ancestors)
    rows = (ancestors + n * jnp.arange(groups, dtype=jnp.int32)[:, None]).reshape(-1)
    log_weights = jnp.where(jnp.repeat(usable, n),
                            zero_with_gradient(gather(state.log_weights, rows)),
                            state.log_weights)
    log_evidence = jnp.where(usable, state.log_evidence - zero_with_gradient(log_total),
                             state.log_evidence)
    return SMCState(gather(state.particles, rows), log_weights, log_evidence), ancestors


def identity_ancestors(groups: int, n: int) -> Array:
    """[G, N] ancestors that keep every particle where it is."""
    return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (groups, n))


def select_groups(flags: Array, new: PyTree, old: PyTree) -> PyTree:
    """Per group of rows: `new`'s rows where the group's flag [G] holds, else `old`'s."""
    def select(a: Array, b: Array) -> Array:
        rows = jnp.repeat(flags, a.shape[0] // flags.shape[0])
        return jnp.where(rows.reshape(rows.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree_util.tree_map(select, new, old)


def split_keys(keys: Array, num: int = 2) -> Array:
    """`jax.random.split` of each of G keys: [num, G] keys (so `a, b = split_keys(keys)`)."""
    return jax.vmap(lambda key: jax.random.split(key, num), out_axes=1)(keys)


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
    """Number of entries that are NaN or +inf along the last axis (int32): no weight can
    represent them, whereas -inf is a valid zero weight."""
    return jnp.sum(~(log_values < jnp.inf), axis=-1).astype(jnp.int32)


def resample_move(
    keys: Array,
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
    """Resample (and then move) each group whose ESS < threshold * N; threshold 1 = always,
    0 = never. G groups (keys [G], state.log_evidence [G]); a plain run is one group.

    Returns (state, resampled flags [G], ancestors [G, N] within each group). `allowed` (bool
    scalar or [G]) can veto resampling at this step. Nothing is gathered unless some group
    resamples (`lax.cond`); `branchless` computes the resampled state and selects instead
    (needed when particles are sharded). `ess` [G]: the current weights' ESS when the caller has
    it (else computed here).
    """
    groups = state.log_evidence.shape[0]
    n = state.log_weights.shape[0] // groups
    identity = identity_ancestors(groups, n)
    if ess_threshold <= 0.0:
        return state, jnp.zeros((groups,), bool), identity
    key_resample, key_move = split_keys(keys)
    if ess_threshold >= 1.0:
        flags = jnp.ones((groups,), bool)
    else:
        if ess is None:
            ess = weights_lib.ess(state.log_weights.reshape(groups, n))
        flags = ess < ess_threshold * n
    if allowed is not None:
        flags = flags & allowed
    every_group = ess_threshold >= 1.0 and allowed is None     # statically: all flags set

    def do(state: SMCState) -> tuple[SMCState, Array]:
        state, ancestors = resample_groups(key_resample, state, resampling, flags)
        if move is not None:
            # An MH move accepts or rejects, a discrete choice that no derivative sees, by a ratio
            # of the current target: refuse once its particles or weights (the target) depend on
            # what is differentiated.
            _, moved = refuse_gradient((state.log_weights, move(key_move, state.particles, t)),
                                       MOVE_REASON)
            if (groups > 1 or branchless) and not every_group:
                moved = select_groups(flags, moved, state.particles)
            state = state._replace(particles=moved)
        return state, ancestors

    if branchless or every_group:
        # Sharded: each device evaluates the predicate from its own all-reduce, whose rounding
        # may differ, and devices that branch apart deadlock in the next collective.
        state, ancestors = do(state)
        return state, flags, ancestors
    # Gather only at steps where some group resamples: the others keep identity ancestors.
    state, ancestors = jax.lax.cond(jnp.any(flags), do, lambda s: (s, identity), state)
    return state, flags, ancestors


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

    Groups: a model with `groups = G` is G independent problems in one program (G prompts, say),
    N particles each: every group is weighted, resampled (its own ESS decision) and its evidence
    estimated on its own, and nothing is gathered at a step where no group resamples. `key` is
    one key per group ([G] keys; a single key is split into G). Every field of the result has a
    leading [G] axis (particles [G, N, ...]) and equals G runs of the one-group model, group g's
    with key g, when the model uses its keys that way: `vmap` of `run` over keys, without the
    `vmap`'s full gather at every step. With `done`, a group stops where its own run would (every
    particle done, or a dead or NaN/+inf cloud): its weights and evidence stand still and its
    traces hold padding while the others go on. Its particles are still stepped: the step must
    leave done particles unchanged (LM rows that have ended are frozen; `smc.stack_groups`
    ensures it for any model), and the particles of a dead group, which carry no weight, are
    not its own run's (the result flags that group `degenerate`).

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
    groups = model.groups
    if islands and mesh is None:
        raise ValueError("islands=True needs a mesh")
    if islands and groups is not None:
        raise ValueError("islands=True runs a model of one group; this model has "
                         f"groups={groups}")
    num_groups = 1 if groups is None else groups
    rows = num_groups * num_particles
    devices = 1 if mesh is None else distributed.num_shards(mesh, axis_name, rows)
    local = num_particles // devices if islands else num_particles
    shapes = check_model(model, local)
    keys = group_keys(key, groups)
    dtype = log_weight_dtype(shapes.log_weights.dtype, shapes.increments.dtype)
    needed = memory.estimate_bytes(model, rows, record_ancestors=record_ancestors,
                                   summary=summary if groups is None else None,
                                   particles=shapes.particles, log_weight_dtype=dtype) // devices
    # a device of this process: another host's cannot be asked for its memory
    memory.check_fits(needed, None if mesh is None else mesh.local_devices[0])
    options = {"resampling": resampling, "ess_threshold": ess_threshold,
               "record_ancestors": record_ancestors, "summary": summary, "dtype": dtype}
    grouped = model if groups is not None else one_group(model)
    if islands:
        def run_island(key: Array) -> SMCResult:
            return first_group(_run(key[None], grouped, local, None, **options))

        return distributed.run_islands(run_island, key, mesh, axis_name, devices)
    sharding = None if mesh is None else distributed.particle_sharding(mesh, axis_name)
    result = _run(keys, grouped, num_particles, sharding, **options)
    return result if groups is not None else first_group(result)


def group_keys(key: Array, groups: int | None) -> Array:
    """[G] keys: `key[None]` for a plain model; for G groups, `key` if it holds G keys, else the
    single `key` split into G."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.ndim == (0 if typed else 1)
    if groups is None:
        if not single:
            raise ValueError(f"key must be one PRNG key for a model without groups, got shape "
                             f"{key.shape}")
        return key[None]
    if single:
        return jax.random.split(key, groups)
    if key.shape[0] != groups or key.ndim != (1 if typed else 2):
        raise ValueError(f"key must be one PRNG key or {groups} keys (one per group) for a "
                         f"model with groups={groups}, got shape {key.shape}")
    return key


def one_group(model: FeynmanKac) -> FeynmanKac:
    """A plain model as a model of one group: keys [1], done per group [1]."""
    def init(keys, n):
        return model.init(keys[0], n)

    def step(keys, particles, t, *log_weights):
        return model.step(keys[0], particles, t, *log_weights)

    move = None if model.move is None else (
        lambda keys, particles, t: model.move(keys[0], particles, t))
    done = None if model.done is None else (
        lambda particles: jnp.all(model.done(particles)).reshape(1))
    return model._replace(init=init, step=step, move=move, done=done, groups=1)


def first_group(result: SMCResult) -> SMCResult:
    """Group 0 of a result with a leading group axis on every field (a one-group run's result)."""
    return jax.tree_util.tree_map(lambda leaf: leaf[0], result)


def log_weight_dtype(*dtypes: Any) -> jnp.dtype:
    """The one dtype of log-weights and increments: the promotion of `dtypes`, at least float32
    (float64 only when x64 is enabled)."""
    promoted = jnp.float32
    for dtype in dtypes:
        promoted = jnp.promote_types(promoted, dtype)
    return jax.dtypes.canonicalize_dtype(promoted)


def _run(keys, model, num_particles, sharding, *, resampling, ess_threshold,
         record_ancestors, summary, dtype) -> SMCResult:
    """The loop, for a model of G = model.groups groups (keys [G]); every field of the result
    has a leading [G] axis."""
    constrain = _constrainer(sharding)
    n, groups = num_particles, model.groups
    num_steps = int(model.num_steps)
    mask = None if model.resample_mask is None else jnp.asarray(model.resample_mask, bool)

    key_init, key_loop = split_keys(keys)
    particles, log_weights = model.init(key_init, n)
    log_weights = constrain(log_weights.astype(dtype))
    # G0 is a reweighting of uniform weights, so log Z_hat starts at log mean exp(G0).
    uniform = SMCState(constrain(particles), jnp.zeros_like(log_weights),
                       jnp.zeros((groups,), log_weights.dtype))
    log_n = jnp.log(jnp.asarray(n, log_weights.dtype))
    state, increment0, total0 = _reweight(uniform, log_weights, jnp.full((groups,), log_n))
    nonfinite0 = count_nonfinite(log_weights.reshape(groups, n))
    ess0 = weights_lib.ess_given_total(state.log_weights.reshape(groups, n), total0)

    def summarise(state: SMCState) -> PyTree | None:
        if summary is None:
            return None
        values = jax.vmap(summary)(group_rows(state.particles, groups),
                                   state.log_weights.reshape(groups, n))
        return jax.tree_util.tree_map(jnp.asarray, values)

    summary0 = summarise(state)
    padding = Trace(jnp.zeros_like(ess0), jnp.zeros_like(ess0), jnp.zeros((groups,), bool),
                    jnp.zeros((groups,), jnp.int32),
                    identity_ancestors(groups, n)
                    if record_ancestors else None, _zeros_like(summary0))

    def one_step(keys: Array, loop: Loop, t: Array, active: Array | None):
        # The loop carries logsumexp(logw) and the ESS of the weights, so that each step makes
        # one pass over them for the evidence, the trace and the next resampling decision.
        # active [G] (None: every group): groups whose own run would still be going.
        key_resample, key_step = split_keys(keys)
        allowed = None if mask is None else mask[t]
        if active is not None:
            allowed = active if allowed is None else allowed & active
        state, flags, ancestors = resample_move(
            key_resample, loop.state, t, resampling=resampling, ess_threshold=ess_threshold,
            move=model.move, branchless=sharding is not None, allowed=allowed, ess=loop.ess)
        # resample resets usable weights to 0 (logsumexp = log n); it leaves dead, NaN or +inf
        # ones as they are
        before = jnp.where(flags & jnp.isfinite(loop.log_total), log_n, loop.log_total)
        if model.weighted_step:
            # The step chooses its target from the weights (e.g. a tempering exponent by
            # bisection): a discrete choice that no derivative sees.
            seen = refuse_gradient(state.log_weights, "through the log-weights that a "
                                   "`weighted_step` model chooses its target from")
            particles, log_increments = model.step(key_step, state.particles, t, seen)
        else:
            particles, log_increments = model.step(key_step, state.particles, t)
        log_increments = constrain(log_increments.astype(dtype))
        if active is not None:
            # A group whose own run has stopped gets no more weight (its particles are left to
            # the model: a done particle is a fixed point of the step, and a dead cloud carries
            # no weight). Selecting the old particles here would keep them alive across the
            # step, so that XLA could no longer update an LM's cache in place: a copy per step.
            log_increments = jnp.where(jnp.repeat(active, n), log_increments, 0.0)
        state, increment, after = _reweight(state._replace(particles=constrain(particles)),
                                            log_increments, before)
        ess = weights_lib.ess_given_total(state.log_weights.reshape(groups, n), after)
        trace = Trace(ess, increment, flags, count_nonfinite(log_increments.reshape(groups, n)),
                      ancestors if record_ancestors else None, summarise(state))
        if active is not None:
            trace = select_groups(active, trace, padding)
        return Loop(state, after, ess), trace

    # keys [T, G]: step t of group g uses its own key, as in the group's own run
    keys = jax.vmap(lambda key: jax.random.split(key, max(num_steps, 1))[:num_steps],
                    out_axes=1)(key_loop)
    loop = Loop(state, total0, ess0)
    if model.done is None:
        def scan_body(loop, inputs):
            key, t = inputs
            return one_step(key, loop, t, None)

        loop, traces = jax.lax.scan(scan_body, loop, (keys, jnp.arange(num_steps, dtype=jnp.int32)))
        steps_taken = jnp.full((groups,), num_steps, jnp.int32)
    else:
        loop, traces, steps_taken = _while(one_step, _group_done(model.done, groups), loop, keys,
                                           num_steps, padding, every_group_active=groups == 1)
    state = loop.state

    def prepend(first: PyTree, rest: PyTree) -> PyTree:
        # rest [T, G, ...] from the loop -> [G, T + 1, ...]
        return jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a[:, None], jnp.swapaxes(b, 0, 1)], axis=1), first, rest)

    return SMCResult(
        particles=group_rows(state.particles, groups),
        log_weights=state.log_weights.reshape(groups, n),
        log_evidence=state.log_evidence,
        ess=prepend(ess0, traces.ess),
        log_evidence_increments=prepend(increment0, traces.log_evidence_increment),
        resampled=jnp.swapaxes(traces.resampled, 0, 1),
        nonfinite_increments=prepend(nonfinite0, traces.nonfinite_increments),
        num_steps=steps_taken,
        degenerate=~jnp.isfinite(loop.log_total),
        ancestors=None if traces.ancestors is None else jnp.swapaxes(traces.ancestors, 0, 1),
        summaries=prepend(summary0, traces.summary),
    )


def _group_done(done: Callable[[PyTree], Array], groups: int) -> Callable[[PyTree], Array]:
    """done(particles) as bool [G]: a group is done once all its particles are."""
    def group_done(particles: PyTree) -> Array:
        flags = done(particles)
        if flags.shape == (groups,):
            return flags
        return jnp.all(flags.reshape(groups, -1), axis=1)

    return group_done


def _while(one_step, done, loop, keys, max_steps, padding: Trace, every_group_active: bool):
    """lax.while_loop over steps while some group is active: not `done` and its cloud neither
    dead nor holding a NaN or +inf weight, with static-size traces [max_steps, G, ...]: `padding`
    (one step's Trace) repeated, overwritten step by step. Returns (loop, traces, steps [G])."""
    traces = jax.tree_util.tree_map(
        lambda value: jnp.broadcast_to(value, (max_steps,) + value.shape), padding)

    def active(loop: Loop) -> Array:
        # A dead cloud (log_total = -inf) or one with a NaN or +inf weight can never recover.
        return jnp.isfinite(loop.log_total) & ~done(loop.state.particles)

    def cond(carry):
        t, loop, _, _ = carry
        return (t < max_steps) & jnp.any(active(loop))

    def body(carry):
        t, loop, traces, steps = carry
        now = active(loop)
        # one group: the loop runs only while it is active
        loop, trace = one_step(keys[t], loop, t, None if every_group_active else now)
        traces = jax.tree_util.tree_map(lambda buf, value: buf.at[t].set(value), traces, trace)
        return t + 1, loop, traces, steps + now.astype(jnp.int32)

    steps = jnp.zeros(loop.log_total.shape, jnp.int32)
    _, loop, traces, steps = jax.lax.while_loop(
        cond, body, (jnp.asarray(0, jnp.int32), loop, traces, steps))
    return loop, traces, steps


def _zeros_like(shapes: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _constrainer(sharding: Any) -> Callable[[PyTree], PyTree]:
    if sharding is None:
        return lambda tree: tree
    return lambda tree: distributed.constrain_particles(tree, sharding)
