"""Argument and shape checks that run before any compilation (via `jax.eval_shape`)."""
from __future__ import annotations

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from smc.feynman_kac import FeynmanKac


def _refuse_traced(name: str, value: Any) -> None:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a static Python number, not a traced value")


def static_int(name: str, value: Any, minimum: int | None = None) -> int:
    """int(value) for a Python/numpy integer (not a bool, float or string), >= minimum if given."""
    _refuse_traced(name, value)
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def static_finite(name: str, value: Any) -> float:
    """float(value) for a real number (not a bool or string), refusing traced and non-finite ones."""
    _refuse_traced(name, value)
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def static_positive(name: str, value: Any) -> float:
    """A finite real number > 0 (`static_finite` and the sign)."""
    value = static_finite(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def static_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_fraction(name: str, value: Any) -> float:
    """A real number in [0, 1] (`static_finite` and the range)."""
    value = static_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def check_num_particles(num_particles: Any) -> int:
    try:
        return static_int("num_particles", num_particles, 1)
    except TypeError:
        raise TypeError(f"num_particles must be a Python int, got "
                        f"{type(num_particles).__name__}") from None


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """`static_int` for a count set by a user (chains, burn-in, thinning) where every bad value,
    a float such as 2.5 included, is a ValueError naming `name`."""
    try:
        return static_int(name, value, minimum)
    except TypeError as error:
        raise ValueError(str(error)) from None


def check_run_arguments(num_particles: Any, ess_threshold: Any) -> None:
    check_num_particles(num_particles)
    check_fraction("ess_threshold", ess_threshold)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    x = jnp.asarray(x) if not hasattr(x, "shape") else x
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def check_particles(particles: Any, num_particles: int, where: str) -> None:
    leaves = jax.tree_util.tree_leaves(particles)
    if not leaves:
        raise ValueError(f"{where}: particles are an empty pytree")
    for leaf in leaves:
        if leaf.ndim == 0 or leaf.shape[0] != num_particles:
            raise ValueError(
                f"{where}: every particle leaf needs leading axis {num_particles}, got shape {leaf.shape}")


def check_log_weights(log_weights: Any, num_particles: int, where: str) -> None:
    if getattr(log_weights, "shape", None) != (num_particles,):
        raise ValueError(f"{where}: log-weights must have shape ({num_particles},), "
                         f"got {getattr(log_weights, 'shape', type(log_weights).__name__)}")
    if not jnp.issubdtype(log_weights.dtype, jnp.floating):
        raise TypeError(f"{where}: log-weights must be floating point, got {log_weights.dtype}")


class ModelShapes(NamedTuple):
    """What `check_model` traced, as jax.ShapeDtypeStructs: init's particles and log-weights and
    step's log-increments."""

    particles: Any
    log_weights: jax.ShapeDtypeStruct
    increments: jax.ShapeDtypeStruct


def check_model(model: FeynmanKac, num_particles: int, key: Any = None) -> ModelShapes:
    """Trace init, step, move and done abstractly and check every shape against N (G * N
    rows and [G] keys for a model of G groups).

    A `weighted_step` model's step is traced with init's log-weights as its fourth argument.
    Returns the traced shapes (`ModelShapes`).
    """
    if not isinstance(model, FeynmanKac):
        raise TypeError(f"model must be an smc.FeynmanKac, got {type(model).__name__}")
    for name in ("init", "step"):
        if not callable(getattr(model, name)):
            raise TypeError(f"model.{name} must be callable")
    num_steps = model.num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (numbers.Integral, np.integer)):
        raise TypeError(f"model.num_steps must be a static int, got {type(num_steps).__name__}")
    if num_steps < 0:
        raise ValueError(f"model.num_steps must be >= 0, got {num_steps}")
    if model.resample_mask is not None:
        mask = np.asarray(model.resample_mask)
        if mask.dtype != np.bool_ or mask.shape != (num_steps,):
            raise ValueError(f"resample_mask must be a static bool array of shape ({num_steps},), "
                             f"got {mask.dtype}{list(mask.shape)}")
    groups = model.groups
    if groups is not None:
        groups = static_int("model.groups", groups, 1)
    if key is None:
        key = jax.random.PRNGKey(0)
        key = key if groups is None else jax.random.split(key, groups)
    key = _abstract(key)
    rows = num_particles * (groups or 1)     # groups: every group's particles, one after another
    t = jax.ShapeDtypeStruct((), jnp.int32)
    particles, log_weights = jax.eval_shape(lambda k: model.init(k, num_particles), key)
    check_particles(particles, rows, "init")
    check_log_weights(log_weights, rows, "init")
    weighted = static_bool("model.weighted_step", model.weighted_step)
    step_inputs = (key, particles, t) + ((log_weights,) if weighted else ())
    new_particles, increments = jax.eval_shape(model.step, *step_inputs)
    _check_same_structure(particles, new_particles, "step")
    check_log_weights(increments, rows, "step")
    if model.move is not None:
        moved = jax.eval_shape(model.move, key, particles, t)
        _check_same_structure(particles, moved, "move")
    if model.done is not None:
        done = jax.eval_shape(model.done, particles)
        shapes = ((), (rows,)) if groups is None else ((groups,), (rows,))
        if done.shape not in shapes or done.dtype != jnp.bool_:
            raise ValueError(f"done must return bool of shape {' or '.join(map(str, shapes))}, "
                             f"got {done.dtype}{list(done.shape)}")
    return ModelShapes(particles, log_weights, increments)


def _check_same_structure(before: Any, after: Any, where: str) -> None:
    tree_before = jax.tree_util.tree_structure(before)
    tree_after = jax.tree_util.tree_structure(after)
    if tree_before != tree_after:
        raise ValueError(f"{where} must return particles with the structure of init's: "
                         f"{tree_before} vs {tree_after}")
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(f"{where} changed a particle leaf from {a.dtype}{list(a.shape)} "
                             f"to {b.dtype}{list(b.shape)}")
