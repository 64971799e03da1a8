"""Sliced Wasserstein-1 distance between two weighted point clouds, for checking samplers.

SW_1(P, Q) = E_theta W_1(theta^T P, theta^T Q) over random unit directions theta, and in 1-D
W_1 = int |F_P(z) - F_Q(z)| dz, computed exactly for weighted samples by sorting the union of the
projected points (the two CDFs are step functions that change only there).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.jit
def wasserstein_1d(x: Array, y: Array, x_weights: Array | None = None,
                   y_weights: Array | None = None) -> Array:
    """W_1 between weighted 1-D samples x [N] and y [M] (weights normalised; None = uniform)."""
    wx = _normalised(x_weights, x.shape[0])
    wy = _normalised(y_weights, y.shape[0])
    points = jnp.concatenate([x, y])
    order = jnp.argsort(points)
    gaps = jnp.diff(points[order])
    cdf_difference = jnp.cumsum(jnp.concatenate([wx, -wy])[order])[:-1]
    return jnp.sum(jnp.abs(cdf_difference) * gaps)


@functools.partial(jax.jit, static_argnames="num_projections")
def sliced_wasserstein(key: Array, x: Array, y: Array, x_weights: Array | None = None,
                       y_weights: Array | None = None, num_projections: int = 64) -> Array:
    """Monte Carlo SW_1 over `num_projections` uniform directions; x [N, d], y [M, d]."""
    theta = jax.random.normal(key, (num_projections, x.shape[-1]), x.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=-1, keepdims=True)
    per_direction = jax.vmap(lambda u: wasserstein_1d(x @ u, y @ u, x_weights, y_weights))(theta)
    return jnp.mean(per_direction)


def _normalised(weights: Array | None, n: int) -> Array:
    if weights is None:
        return jnp.full(n, 1.0 / n)
    return weights / jnp.sum(weights)
