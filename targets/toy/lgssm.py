"""Linear-Gaussian state-space model: Kalman filter (exact log-likelihood) and bootstrap filter.

x_0 ~ N(m0, P0), x_t = F x_{t-1} + N(0, Q), y_t = H x_t + N(0, R), t = 0..T-1.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import smc

Array = jax.Array


class LGSSM(NamedTuple):
    """Parameters; shapes m0 [d], P0 [d, d], F [d, d], Q [d, d], H [k, d], R [k, k]."""

    m0: np.ndarray
    P0: np.ndarray
    F: np.ndarray
    Q: np.ndarray
    H: np.ndarray
    R: np.ndarray


def default() -> LGSSM:
    """A 2-D rotating, damped state seen through one noisy, off-axis coordinate."""
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return LGSSM(m0=np.array([1.0, -0.5]), P0=np.diag([1.0, 0.5]), F=0.95 * rotation,
                 Q=np.diag([0.2, 0.1]), H=np.array([[1.0, 0.5]]), R=np.array([[0.5]]))


def simulate(key: Array, model: LGSSM, num_steps: int) -> tuple[Array, Array]:
    """Draw states [T, d] and observations [T, k]."""
    d, k = model.F.shape[0], model.H.shape[0]
    chol_p0, chol_q, chol_r = (np.linalg.cholesky(m) for m in (model.P0, model.Q, model.R))
    key_x0, key_states, key_obs = jax.random.split(key, 3)
    x0 = model.m0 + chol_p0 @ jax.random.normal(key_x0, (d,))

    def advance(x, key):
        x = model.F @ x + chol_q @ jax.random.normal(key, (d,))
        return x, x

    _, rest = jax.lax.scan(advance, x0, jax.random.split(key_states, num_steps - 1))
    states = jnp.concatenate([x0[None], rest])
    observations = states @ model.H.T + jax.random.normal(key_obs, (num_steps, k)) @ chol_r.T
    return states, observations


def kalman_log_likelihood(model: LGSSM, observations: np.ndarray) -> float:
    """Exact log p(y_0:T-1), in float64 numpy, by the Kalman filter."""
    y = np.asarray(observations, dtype=np.float64)
    mean, cov = np.asarray(model.m0, np.float64), np.asarray(model.P0, np.float64)
    total = 0.0
    for t in range(y.shape[0]):
        if t > 0:
            mean, cov = model.F @ mean, model.F @ cov @ model.F.T + model.Q
        innovation = y[t] - model.H @ mean
        s = model.H @ cov @ model.H.T + model.R
        total += _log_normal(innovation, s)
        gain = cov @ model.H.T @ np.linalg.inv(s)
        mean, cov = mean + gain @ innovation, cov - gain @ model.H @ cov
    return float(total)


def _log_normal(residual: np.ndarray, cov: np.ndarray) -> float:
    _, logdet = np.linalg.slogdet(cov)
    return float(-0.5 * (residual @ np.linalg.solve(cov, residual) + logdet
                         + residual.shape[0] * np.log(2 * np.pi)))


def bootstrap(model: LGSSM, observations: Array) -> smc.FeynmanKac:
    """Bootstrap filter: M_t the transition, G_t = log N(y_t; H x_t, R); particles [N, d].

    model.F may be a JAX array, traced included, to differentiate log Z_hat with respect to it
    (tests/test_gradients.py); the other parameters are static NumPy arrays.
    """
    y = jnp.asarray(observations, jnp.float32)
    d = model.F.shape[0]
    m0, F = jnp.asarray(model.m0, jnp.float32), jnp.asarray(model.F, jnp.float32)
    chol_p0 = jnp.asarray(np.linalg.cholesky(model.P0), jnp.float32)
    chol_q = jnp.asarray(np.linalg.cholesky(model.Q), jnp.float32)
    H = jnp.asarray(model.H, jnp.float32)
    r_inv = jnp.asarray(np.linalg.inv(model.R), jnp.float32)
    log_norm = float(-0.5 * (np.linalg.slogdet(model.R)[1] + model.R.shape[0] * np.log(2 * np.pi)))

    def log_obs(x: Array, t: Array) -> Array:
        residual = y[t] - x @ H.T
        return log_norm - 0.5 * jnp.einsum("ni,ij,nj->n", residual, r_inv, residual)

    def init(key: Array, num_particles: int):
        x = m0 + jax.random.normal(key, (num_particles, d)) @ chol_p0.T
        return x, log_obs(x, 0)

    def step(key: Array, x: Array, t: Array):
        x = x @ F.T + jax.random.normal(key, x.shape) @ chol_q.T
        return x, log_obs(x, t + 1)

    return smc.FeynmanKac(init=init, step=step, num_steps=int(y.shape[0]) - 1)
