"""Gaussian reverse-time transitions for score-based samplers, over a batch x [N, d].

Every transition here is x' ~ N(mean, std^2 I) for some (mean, std): build the `Gaussian` with one
of the kernels, then draw from it with `sample` (which also returns log q(x' | x)) or score a given
x' with `log_prob`; reward-guided SMC needs both to weigh one kernel against another.

- Euler-Maruyama in reverse time with any drift: mean = x + drift dtau, std = g sqrt(dtau).
- Ancestral (DDPM) step from t to s < t: the Gaussian posterior q(x_s | x_t, x0 = x0_hat) of the
  forward process x_t = alpha_t x0 + sigma_t eps (VP; with alpha = 1 it is the VE / SMLD step).

No schedule is imported: callers pass the drift, g, alpha and sigma values (proposals know nothing
of targets).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Gaussian(NamedTuple):
    """N(mean, std^2 I) per particle: mean [N, d]; std a scalar or [N]."""

    mean: Array
    std: Array


def _std(kernel: Gaussian) -> Array:
    std = jnp.asarray(kernel.std, kernel.mean.dtype)
    return std[:, None] if std.ndim == 1 else std


def log_prob(kernel: Gaussian, x_new: Array) -> Array:
    """log N(x'; mean, std^2 I) = -||x' - mean||^2 / (2 std^2) - d log std - d/2 log 2 pi, [N]."""
    std = _std(kernel)
    z = (x_new - kernel.mean) / std
    return _log_density(z, std, x_new.shape[-1])


def sample(key: Array, kernel: Gaussian) -> tuple[Array, Array]:
    """x' = mean + std xi, xi ~ N(0, I). Returns (x' [N, d], log q(x') [N])."""
    std = _std(kernel)
    xi = jax.random.normal(key, kernel.mean.shape, kernel.mean.dtype)
    # The density from xi itself: no round-off from subtracting the mean back out.
    return kernel.mean + std * xi, _log_density(xi, std, kernel.mean.shape[-1])


def _log_density(z: Array, std: Array, dim: int) -> Array:
    log_std = jnp.broadcast_to(jnp.log(std), z.shape[:-1] + (1,))[..., 0]
    return -0.5 * jnp.sum(z**2, axis=-1) - dim * log_std - 0.5 * dim * math.log(2 * math.pi)


def euler_maruyama_kernel(x: Array, drift: Array, diffusion, dt) -> Gaussian:
    """x' = x + drift dt + g sqrt(dt) xi: N(x + drift dt, g^2 dt I). drift [N, d]; g [] or [N]."""
    diffusion = jnp.asarray(diffusion, x.dtype)
    dt = jnp.asarray(dt, x.dtype)
    return Gaussian(x + drift * dt, diffusion * jnp.sqrt(dt))


def euler_maruyama(key: Array, x: Array, drift: Array, diffusion, dt) -> tuple[Array, Array]:
    """One reverse-time Euler-Maruyama step: (x' [N, d], log N(x'; x + drift dt, g^2 dt I) [N])."""
    return sample(key, euler_maruyama_kernel(x, drift, diffusion, dt))


def euler_maruyama_log_prob(x_new: Array, x: Array, drift: Array, diffusion, dt) -> Array:
    """log N(x'; x + drift dt, g^2 dt I) of a given transition x -> x', [N]."""
    return log_prob(euler_maruyama_kernel(x, drift, diffusion, dt), x_new)


def ancestral_kernel(x: Array, x0_hat: Array, alpha_t, sigma_t, alpha_s, sigma_s) -> Gaussian:
    """q(x_s | x_t = x, x0 = x0_hat) for s < t, from alpha_{t|s} = alpha_t / alpha_s and
    sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2:

        mean = (alpha_{t|s} sigma_s^2 x + alpha_s sigma_{t|s}^2 x0_hat) / sigma_t^2,
        var  = sigma_{t|s}^2 sigma_s^2 / sigma_t^2.
    """
    alpha_ts = alpha_t / alpha_s
    var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    mean = (alpha_ts * sigma_s**2 * x + alpha_s * var_ts * x0_hat) / sigma_t**2
    return Gaussian(mean, jnp.sqrt(jnp.maximum(var_ts, 0.0) * sigma_s**2) / sigma_t)


def ancestral(key: Array, x: Array, x0_hat: Array, alpha_t, sigma_t, alpha_s, sigma_s
              ) -> tuple[Array, Array]:
    """One ancestral (DDPM) step t -> s. Returns (x_s [N, d], log q(x_s | x_t) [N])."""
    return sample(key, ancestral_kernel(x, x0_hat, alpha_t, sigma_t, alpha_s, sigma_s))
