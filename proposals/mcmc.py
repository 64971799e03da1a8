"""Metropolis-Hastings kernels over a batch of particles: RWMH, MALA, pCN, pCNL.

Every kernel is a pure function ``kernel(key, x, log_fn, step_size) -> (x_new, MoveInfo)``:

- ``x`` is a batch of N particles: an array [N, d], or any pytree whose leaves share the leading
  axis N (each particle is flattened with ``jax.flatten_util.ravel_pytree``, so a d-vector is
  what the kernel sees and a pytree of the same structure is what it returns).
- ``log_fn`` is the log-density of *one* particle (a scalar); it is vmapped here, and its
  gradient comes from ``jax.grad``.
- ``step_size`` is a positive scalar, or an array [N] with one step per particle (adaptive
  schemes).

Targets: ``rwmh`` and ``mala`` leave exp(log_density) invariant; ``pcn`` and ``pcnl`` leave
N(x; 0, I) exp(Phi(x)) invariant, with Phi = log_likelihood (the Psi-Sampler initial target,
docs/algorithms.md section 4).

Non-finite values: a proposal whose log-density, gradient or coordinates are not finite is
rejected, so particles never become NaN and never enter a region of log-density -inf. A particle
whose *current* log-density is not finite stays where it is (every move from it is rejected):
start chains inside the support.

A call evaluates the log-density (and gradient) at the current point and at the proposal, unless
``cache=`` passes back the values the previous call returned in ``MoveInfo.cache`` (same kernel,
same log-density); ``run_chain`` does so, so a chain costs one evaluation per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from smc.validation import static_bool, static_finite, static_int

Array = jax.Array
PyTree = object
LogFn = Callable[[PyTree], Array]
KernelFn = Callable[[Array, PyTree], tuple[PyTree, "MoveInfo"]]


class MoveInfo(NamedTuple):
    """Per-particle outcome of one MH step.

    accepted: bool [N].
    log_accept_ratio: float [N], log of the acceptance probability, min(0, log a); -inf for a
        proposal rejected because something was not finite. exp(log_accept_ratio) averaged over
        particles is a lower-variance estimate of the acceptance rate than ``accepted``.
    cache: the log-density (and its gradient, for MALA and pCNL) at the returned particles, a
        tuple to pass back as ``cache=`` to the next call of the same kernel and log-density, so
        that each step evaluates the log-density once, at the proposal (``run_chain`` does this).
    """

    accepted: Array
    log_accept_ratio: Array
    cache: Any = None


class ChainResult(NamedTuple):
    """Result of ``run_chain``.

    x: final particles (same structure as the input).
    acceptance_rate: float [N], mean acceptance probability of each particle over the steps.
    states: the particles after every step, each leaf [num_steps, N, ...] (the input x not
        included); None unless ``return_all=True``.
    """

    x: PyTree
    acceptance_rate: Array
    states: PyTree | None


class AdaptiveChainResult(NamedTuple):
    """Result of ``run_adaptive_chain``.

    x: final particles. acceptance_rate: float [N], mean acceptance probability over the steps.
    step_size: the adapted step size after the last step (scalar or [N], as given).
    """

    x: PyTree
    acceptance_rate: Array
    step_size: Array


# --------------------------------------------------------------------------------------------
# Validation and flattening


def _num_particles(x: PyTree) -> int:
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ValueError("x has no array leaves; expected particles with a leading axis N")
    if len(leaves) == 1 and leaves[0] is x and jnp.ndim(x) != 2:
        raise ValueError(f"x must be a 2-D array [N, d]; got shape {jnp.shape(x)}")
    shapes = [jnp.shape(leaf) for leaf in leaves]
    if any(len(s) == 0 for s in shapes):
        raise ValueError(f"every leaf of x needs a leading particle axis; got shapes {shapes}")
    n = shapes[0][0]
    if any(s[0] != n for s in shapes):
        raise ValueError(f"leaves of x disagree on the number of particles; got shapes {shapes}")
    return n


def _check_step_size(step_size, n: int | None = None) -> Array:
    """Returns step_size as an array of shape [] or [N] (any shape if n is None); checks that it
    is positive and finite when concrete."""
    shape = jnp.shape(step_size)
    if n is not None and shape not in ((), (n,)):
        raise ValueError(f"step_size must be a scalar or have shape ({n},); got shape {shape}")
    # A traced step size (under jit/scan) cannot be checked; only concrete values are.
    if not isinstance(step_size, jax.core.Tracer):
        value = np.asarray(step_size)
        if not np.all((value > 0) & np.isfinite(value)):
            raise ValueError(f"step_size must be positive and finite; got {value}")
    return jnp.asarray(step_size)


def _check_target(target) -> float:
    target = static_finite("target", target)
    if not 0.0 < target < 1.0:
        raise ValueError(f"target acceptance must be in (0, 1); got {target}")
    return target


def _check_rate(rate):
    """A finite rate >= 0 (a negative one would drive the acceptance away from the target);
    a traced rate (e.g. decreasing over rounds inside a scan) is not checked."""
    if isinstance(rate, jax.core.Tracer):
        return rate
    rate = static_finite("rate", rate)
    if rate < 0:
        raise ValueError(f"rate must be >= 0; got {rate}")
    return rate


def _flatten(x: PyTree) -> tuple[Array, Callable[[Array], PyTree], Callable[[Array], PyTree]]:
    """[N, D] view of the particles, the map back to x's structure, and the per-particle map."""
    if isinstance(x, (jax.Array, np.ndarray)):
        identity = lambda flat: flat
        return jnp.asarray(x), identity, identity
    _, unravel_one = ravel_pytree(jax.tree.map(lambda leaf: leaf[0], x))
    flat = jax.vmap(lambda p: ravel_pytree(p)[0])(x)
    return flat, jax.vmap(unravel_one), unravel_one


def _prepare(x: PyTree, log_fn: LogFn, step_size) -> tuple[Array, Callable, Callable, Array]:
    n = _num_particles(x)
    h = _check_step_size(step_size, n)
    flat, unravel, unravel_one = _flatten(x)
    flat_log_fn = lambda z: log_fn(unravel_one(z))
    out = jax.eval_shape(flat_log_fn, jax.ShapeDtypeStruct(flat.shape[1:], flat.dtype))
    if out.shape != ():
        raise ValueError(f"the log-density must return a scalar per particle; got {out.shape}")
    # One step per particle, broadcast against [N, D].
    h = jnp.broadcast_to(h.astype(flat.dtype), (n,))[:, None]
    return flat, unravel, flat_log_fn, h


def _value(log_fn: Callable, z: Array) -> Array:
    return jax.vmap(log_fn)(z)


def _value_and_grad(log_fn: Callable, z: Array) -> tuple[Array, Array]:
    return jax.vmap(jax.value_and_grad(log_fn))(z)


def _accept(
    key: Array, x: Array, x_prop: Array, log_ratio: Array, current: tuple, proposed: tuple
) -> tuple[Array, MoveInfo]:
    """MH accept/reject; anything non-finite (log a, x', the values in `current` and `proposed`)
    rejects. `current`/`proposed`: the log-density (and gradient) at x and x'; the info's cache
    holds them at the returned particles."""
    ok = jnp.isfinite(log_ratio) & jnp.all(jnp.isfinite(x_prop), axis=-1)
    for value in current + proposed:
        ok = ok & jnp.all(jnp.isfinite(value).reshape(value.shape[0], -1), axis=-1)
    log_u = jnp.log(jax.random.uniform(key, log_ratio.shape, dtype=log_ratio.dtype))
    accepted = ok & (log_u < log_ratio)
    # `where` selects x, so a NaN proposal never leaks into the particles.
    x_new = jnp.where(accepted[:, None], x_prop, x)
    log_prob = jnp.where(ok, jnp.minimum(log_ratio, 0.0), -jnp.inf)
    cache = tuple(jnp.where(accepted.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
                  for old, new in zip(current, proposed))
    return x_new, MoveInfo(accepted=accepted, log_accept_ratio=log_prob, cache=cache)


def _pcn_rho(h: Array) -> tuple[Array, Array]:
    """rho = (1 - h/4)/(1 + h/4) and sqrt(1 - rho^2) = sqrt(h)/(1 + h/4) (no cancellation)."""
    return (1.0 - h / 4.0) / (1.0 + h / 4.0), jnp.sqrt(h) / (1.0 + h / 4.0)


# --------------------------------------------------------------------------------------------
# Kernels


def rwmh(key: Array, x: PyTree, log_density: LogFn, step_size, cache=None
         ) -> tuple[PyTree, MoveInfo]:
    """Random-walk Metropolis: x' = x + step_size * xi, log a = log p(x') - log p(x).

    x: [N, d] (or pytree, leading axis N); step_size: scalar or [N], the proposal's standard
    deviation. Returns (x_new, MoveInfo).
    """
    flat, unravel, log_fn, h = _prepare(x, log_density, step_size)
    key_xi, key_u = jax.random.split(key)
    x_prop = flat + h * jax.random.normal(key_xi, flat.shape, flat.dtype)
    (logp,) = (_value(log_fn, flat),) if cache is None else cache
    logp_prop = _value(log_fn, x_prop)
    x_new, info = _accept(key_u, flat, x_prop, logp_prop - logp, (logp,), (logp_prop,))
    return unravel(x_new), info


def mala(key: Array, x: PyTree, log_density: LogFn, step_size, cache=None
         ) -> tuple[PyTree, MoveInfo]:
    """MALA: x' = x + (h/2) grad log p(x) + sqrt(h) xi, h = step_size (a variance).

    log a = log p(x') - log p(x) + log q(x | x') - log q(x' | x),
    log q(z | y) = -||z - y - (h/2) grad log p(y)||^2 / (2h) + const.
    x: [N, d] (or pytree); step_size: scalar or [N]. Returns (x_new, MoveInfo).
    """
    flat, unravel, log_fn, h = _prepare(x, log_density, step_size)
    key_xi, key_u = jax.random.split(key)
    logp, grad = _value_and_grad(log_fn, flat) if cache is None else cache
    x_prop = flat + 0.5 * h * grad + jnp.sqrt(h) * jax.random.normal(key_xi, flat.shape, flat.dtype)
    logp_prop, grad_prop = _value_and_grad(log_fn, x_prop)

    def log_q(z, y, grad_y):
        return -jnp.sum((z - y - 0.5 * h * grad_y) ** 2, axis=-1) / (2.0 * h[:, 0])

    log_ratio = logp_prop - logp + log_q(flat, x_prop, grad_prop) - log_q(x_prop, flat, grad)
    x_new, info = _accept(key_u, flat, x_prop, log_ratio, (logp, grad), (logp_prop, grad_prop))
    return unravel(x_new), info


def pcn(key: Array, x: PyTree, log_likelihood: LogFn, step_size, cache=None
        ) -> tuple[PyTree, MoveInfo]:
    """Preconditioned Crank-Nicolson for N(x; 0, I) exp(Phi(x)), Phi = log_likelihood.

    x' = rho x + sqrt(1 - rho^2) xi, log a = Phi(x') - Phi(x) (the move is reversible for the
    prior). Parametrised like pCNL: step_size = h, rho = (1 - h/4)/(1 + h/4), so the same h gives
    the same autoregression in both kernels. x: [N, d] (or pytree); step_size: scalar or [N].
    """
    flat, unravel, log_fn, h = _prepare(x, log_likelihood, step_size)
    key_xi, key_u = jax.random.split(key)
    rho, scale = _pcn_rho(h)
    x_prop = rho * flat + scale * jax.random.normal(key_xi, flat.shape, flat.dtype)
    (phi,) = (_value(log_fn, flat),) if cache is None else cache
    phi_prop = _value(log_fn, x_prop)
    x_new, info = _accept(key_u, flat, x_prop, phi_prop - phi, (phi,), (phi_prop,))
    return unravel(x_new), info


def pcnl(key: Array, x: PyTree, log_likelihood: LogFn, step_size, cache=None
         ) -> tuple[PyTree, MoveInfo]:
    """Preconditioned Crank-Nicolson Langevin for N(x; 0, I) exp(Phi(x)) (docs/algorithms.md section 4).

    rho = (1 - h/4)/(1 + h/4), h = step_size;
    x' = rho x + sqrt(1 - rho^2) (xi + (sqrt(h)/2) grad Phi(x));
    log a = G(x', x) - G(x, x'),
    G(y, z) = Phi(y) - (h/8)||grad Phi(y)||^2 + (sqrt(h)/2) <(z - rho y)/sqrt(1 - rho^2), grad Phi(y)>.
    x: [N, d] (or pytree); step_size: scalar or [N]. Returns (x_new, MoveInfo).
    """
    flat, unravel, log_fn, h = _prepare(x, log_likelihood, step_size)
    key_xi, key_u = jax.random.split(key)
    rho, scale = _pcn_rho(h)
    half_sqrt_h = 0.5 * jnp.sqrt(h)
    phi, grad = _value_and_grad(log_fn, flat) if cache is None else cache
    xi = jax.random.normal(key_xi, flat.shape, flat.dtype)
    x_prop = rho * flat + scale * (xi + half_sqrt_h * grad)
    phi_prop, grad_prop = _value_and_grad(log_fn, x_prop)

    def big_g(y, z, phi_y, grad_y):
        inner = jnp.sum((z - rho * y) / scale * grad_y, axis=-1)
        sq = jnp.sum(grad_y**2, axis=-1)
        return phi_y - (h[:, 0] / 8.0) * sq + half_sqrt_h[:, 0] * inner

    log_ratio = big_g(x_prop, flat, phi_prop, grad_prop) - big_g(flat, x_prop, phi, grad)
    x_new, info = _accept(key_u, flat, x_prop, log_ratio, (phi, grad), (phi_prop, grad_prop))
    return unravel(x_new), info


# --------------------------------------------------------------------------------------------
# Chains and step-size adaptation

# Asymptotically optimal acceptance rates: RWMH 0.234 and MALA 0.574 (Roberts and Rosenthal,
# product targets, d -> infinity). pCN and pCNL have no dimension scaling to optimise, so they
# borrow the rates of the finite-dimensional moves they reduce to (random walk, Langevin).
TARGET_ACCEPTANCE: dict[Callable, float] = {rwmh: 0.234, mala: 0.574, pcn: 0.234, pcnl: 0.574}


def _accepts_cache(fn: Callable) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def run_chain(
    key: Array, kernel_fn: KernelFn, x: PyTree, num_steps: int, return_all: bool = False
) -> ChainResult:
    """Runs num_steps of ``kernel_fn(key, x) -> (x, MoveInfo)`` with lax.scan.

    kernel_fn is any kernel with its log-density and step size bound, e.g.
    ``functools.partial(mala, log_density=f, step_size=0.5)``. num_steps and return_all are
    static. Returns ChainResult(x, acceptance_rate [N], states [num_steps, N, ...] or None).
    """
    num_steps = static_int("num_steps", num_steps, 1)
    return_all = static_bool("return_all", return_all)

    keys = jax.random.split(key, num_steps)
    # The first step computes the log-density (and gradient) at x; later steps reuse the values
    # the previous step returned in `info.cache` (a kernel without a cache recomputes).
    x, info = kernel_fn(keys[0], x)
    cache = info.cache if _accepts_cache(kernel_fn) else None

    def body(carry, step_key):
        x, cache = carry
        x, info = kernel_fn(step_key, x) if cache is None else kernel_fn(step_key, x, cache=cache)
        carry = (x, None if cache is None else info.cache)
        return carry, (jnp.exp(info.log_accept_ratio), x if return_all else None)

    first = (jnp.exp(info.log_accept_ratio), x if return_all else None)
    (x, _), rest = jax.lax.scan(body, (x, cache), keys[1:])
    accept_prob, states = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
    return ChainResult(x=x, acceptance_rate=jnp.mean(accept_prob, axis=0), states=states)


def adapt_step_size(step_size, acceptance_rate, target: float, rate: float = 1.0) -> Array:
    """Robbins-Monro step on the log step size: log h += rate * (acceptance_rate - target).

    step_size: scalar or [N]; acceptance_rate: scalar (population mean) or [N] (per particle).
    Targets per kernel are in TARGET_ACCEPTANCE. A decreasing `rate` over rounds makes the
    iteration converge rather than fluctuate. step_size: positive and finite; acceptance_rate in
    [0, 1]; target a static float in (0, 1); rate finite >= 0 (the first two and rate are checked
    only when concrete).
    """
    step_size = _check_step_size(step_size)
    if not isinstance(acceptance_rate, jax.core.Tracer):  # traced inside run_adaptive_chain
        value = np.asarray(acceptance_rate)
        if not np.all((value >= 0) & (value <= 1)):
            raise ValueError(f"acceptance_rate must lie in [0, 1]; got {value}")
    target, rate = _check_target(target), _check_rate(rate)
    return jnp.exp(jnp.log(step_size) + rate * (acceptance_rate - target))


def run_adaptive_chain(
    key: Array,
    kernel: Callable,
    x: PyTree,
    log_fn: LogFn,
    step_size,
    num_steps: int,
    target: float | None = None,
    rate: float = 1.0,
) -> AdaptiveChainResult:
    """num_steps of ``kernel(key, x, log_fn, h)``, adapting h after each step from its acceptance.

    A scalar h adapts from the mean acceptance probability over particles, an [N] h from each
    particle's own. target defaults to TARGET_ACCEPTANCE[kernel]. Adapting from the current
    particles makes the chain only approximately invariant; for an exactly invariant move (e.g.
    in resample-move SMC), run ``run_chain`` with the returned step size, i.e. adapt between SMC
    steps from the previous step's acceptance.
    """
    if target is None:
        if kernel not in TARGET_ACCEPTANCE:
            raise ValueError("unknown kernel: pass `target` (the acceptance rate to aim for)")
        target = TARGET_ACCEPTANCE[kernel]
    target, rate = _check_target(target), _check_rate(rate)
    num_steps = static_int("num_steps", num_steps, 1)
    h0 = _check_step_size(step_size, _num_particles(x)).astype(jnp.result_type(float))

    def body(carry, step_key):
        x, h = carry
        x, info = kernel(step_key, x, log_fn, h)
        prob = jnp.exp(info.log_accept_ratio)
        h = adapt_step_size(h, prob if h.ndim else jnp.mean(prob), target, rate)
        return (x, h), prob

    (x, h), prob = jax.lax.scan(body, (x, h0), jax.random.split(key, num_steps))
    return AdaptiveChainResult(x=x, acceptance_rate=jnp.mean(prob, axis=0), step_size=h)
