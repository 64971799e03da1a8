"""Forward noising SDEs dx = f(x, t) dt + g(t) dW, x_t = alpha_t x_0 + sigma_t eps.

docs/algorithms.md section 2.

A schedule gives log alpha_t, sigma_t^2 and their time derivatives; the rest follows for all:

    f(x, t) = x d/dt log alpha_t,    div f = d * d/dt log alpha_t,
    g^2(t)  = d/dt sigma_t^2 - 2 sigma_t^2 d/dt log alpha_t

(the last so that x_t | x_0 has variance sigma_t^2). t runs from 0 (data) to 1 (noise); samplers
walk a decreasing time grid ("reverse time", dtau = t_k - t_{k+1} > 0) inside (0, 1], the
schedules' domain. Scores are callables score(x [N, d], t scalar) -> [N, d]; the adapters below
build one from the usual network outputs.

Schedules check their parameters on first use rather than at construction: they are pytrees, and
JAX rebuilds pytrees from arbitrary leaves (tracers, gradients, tree_map results), so a check in
the constructor would refuse legitimate trees; traced parameters are not checked.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from smc.validation import static_finite, static_int

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
ModelFn = Callable[[Array, Array], Array]


class Schedule(Protocol):
    def log_alpha(self, t): ...
    def dlog_alpha(self, t): ...
    def sigma2(self, t): ...
    def dsigma2(self, t): ...


def _is_traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


def _check_increasing(kind: str, low_name: str, low, high_name: str, high) -> None:
    """Both finite and low < high, for concrete scalars (0-d arrays included)."""
    low = static_finite(f"{kind}.{low_name}", np.asarray(low)[()])
    high = static_finite(f"{kind}.{high_name}", np.asarray(high)[()])
    if not high > low:
        raise ValueError(f"{kind}.{high_name} must be > {low_name} ({low}), got {high}")


class VP(NamedTuple):
    """Variance preserving, linear beta(t) = b0 + t (b1 - b0), 0 <= b0 < b1, both finite.

    log alpha_t = -t^2 (b1 - b0) / 4 - t b0 / 2,  sigma_t^2 = 1 - alpha_t^2,  g^2 = beta(t).
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def check(self) -> VP:
        """self, after checking 0 <= beta_min < beta_max, finite (ValueError naming the field)."""
        if not _is_traced(*self):
            _check_increasing("VP", "beta_min", self.beta_min, "beta_max", self.beta_max)
            if not self.beta_min >= 0:
                raise ValueError(f"VP.beta_min must be >= 0, got {self.beta_min}")
        return self

    def log_alpha(self, t):
        beta_min, beta_max = self.check()
        return -0.25 * t**2 * (beta_max - beta_min) - 0.5 * t * beta_min

    def dlog_alpha(self, t):
        beta_min, beta_max = self.check()
        return -0.5 * (beta_min + t * (beta_max - beta_min))

    def sigma2(self, t):
        # 1 - alpha^2 without the cancellation near t = 0.
        return -jnp.expm1(2.0 * self.log_alpha(t))

    def dsigma2(self, t):
        return -2.0 * jnp.exp(2.0 * self.log_alpha(t)) * self.dlog_alpha(t)


class VE(NamedTuple):
    """Variance exploding: alpha_t = 1, sigma_t = sigma_min (sigma_max / sigma_min)^t, f = 0,
    with 0 < sigma_min < sigma_max, both finite."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def check(self) -> VE:
        """self, after checking 0 < sigma_min < sigma_max, finite (ValueError naming the field)."""
        if not _is_traced(*self):
            _check_increasing("VE", "sigma_min", self.sigma_min, "sigma_max", self.sigma_max)
            if not self.sigma_min > 0:
                raise ValueError(f"VE.sigma_min must be > 0, got {self.sigma_min}")
        return self

    def log_alpha(self, t):
        self.check()
        return jnp.zeros_like(jnp.asarray(t, jnp.float32))

    def dlog_alpha(self, t):
        self.check()
        return jnp.zeros_like(jnp.asarray(t, jnp.float32))

    def sigma2(self, t):
        sigma_min, sigma_max = self.check()
        return (sigma_min * (sigma_max / sigma_min) ** t) ** 2

    def dsigma2(self, t):
        sigma_min, sigma_max = self.check()
        return 2.0 * math.log(sigma_max / sigma_min) * self.sigma2(t)


# ---------------------------------------------------------------------------------------------
# Quantities derived from any schedule


def alpha(schedule: Schedule, t) -> Array:
    """alpha_t."""
    return jnp.exp(schedule.log_alpha(t))


def sigma(schedule: Schedule, t) -> Array:
    """sigma_t."""
    return jnp.sqrt(schedule.sigma2(t))


def f(schedule: Schedule, x: Array, t) -> Array:
    """Forward drift f(x, t) = x d/dt log alpha_t, [..., d]."""
    return x * schedule.dlog_alpha(t)


def div_f(schedule: Schedule, t, dim: int) -> Array:
    """div f = d * d/dt log alpha_t (f is linear, so this does not depend on x)."""
    return dim * schedule.dlog_alpha(t)


def g2(schedule: Schedule, t) -> Array:
    """g^2(t) = d/dt sigma_t^2 - 2 sigma_t^2 d/dt log alpha_t."""
    return schedule.dsigma2(t) - 2.0 * schedule.sigma2(t) * schedule.dlog_alpha(t)


# ---------------------------------------------------------------------------------------------
# Time grids


def time_grid(num_steps: int, t_max: float = 1.0, t_min: float = 1e-3) -> np.ndarray:
    """Uniform reverse-time grid t_0 = t_max > ... > t_T = t_min, float64 [num_steps + 1].

    num_steps: int >= 1; 0 < t_min < t_max <= 1.
    """
    num_steps = static_int("num_steps", num_steps, 1)
    t_max, t_min = static_finite("t_max", t_max), static_finite("t_min", t_min)
    if not 0.0 < t_min:
        raise ValueError(f"t_min must be > 0, got {t_min}")
    if not t_min < t_max <= 1.0:
        raise ValueError(f"t_max must lie in (t_min, 1] = ({t_min}, 1], got {t_max}")
    return check_time_grid(np.linspace(t_max, t_min, num_steps + 1))


def check_time_grid(times) -> np.ndarray:
    """Validates a reverse-time grid: concrete, 1-D, >= 2 finite times, strictly decreasing, all
    in (0, 1].

    t = 0 is excluded because sigma_0 = 0 there and scores blow up; t > 1 is outside the
    schedules' domain (a VP grid up to t = 5 gives meaningless weights). Returns float64 [T + 1].
    """
    if isinstance(times, jax.core.Tracer):
        raise TypeError("the time grid must be concrete (NumPy or a concrete array), not traced")
    times = np.asarray(times, np.float64)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"the time grid must be 1-D with at least 2 times, got {times.shape}")
    if not np.all(np.isfinite(times)):
        raise ValueError("the time grid has non-finite entries")
    if not np.all(np.diff(times) < 0):
        raise ValueError("the time grid must be strictly decreasing (reverse time, noise -> data)")
    if times[-1] <= 0:
        raise ValueError(f"the time grid must stay above t = 0, got t_min = {times[-1]}")
    if times[0] > 1:
        raise ValueError(f"the time grid must lie in (0, 1], the schedules' domain, got "
                         f"t_max = {times[0]}")
    return times


# ---------------------------------------------------------------------------------------------
# Network parameterisations -> score


def score_from_prediction(schedule: Schedule, model: ModelFn,
                          coefficients: Callable[[Array], tuple[Array, Array]]) -> ScoreFn:
    """Score from a network predicting p = a_t x0 + b_t eps, where (a_t, b_t) = coefficients(t).

    x = alpha x0 + sigma eps gives eps = (a x - alpha p) / (a sigma - b alpha), score = -eps/sigma.
    One rule for every linear parameterisation (eps, x0, v, flow velocity).
    """
    def score(x: Array, t: Array) -> Array:
        a, b = coefficients(t)
        al, si = alpha(schedule, t), sigma(schedule, t)
        eps = (a * x - al * model(x, t)) / (a * si - b * al)
        return -eps / si

    return score


def score_from_eps(schedule: Schedule, eps_model: ModelFn) -> ScoreFn:
    """Noise prediction: score = -eps_hat / sigma_t."""
    return score_from_prediction(schedule, eps_model, lambda t: (0.0, 1.0))


def score_from_x0(schedule: Schedule, x0_model: ModelFn) -> ScoreFn:
    """Data prediction: score = (alpha_t x0_hat - x) / sigma_t^2."""
    return score_from_prediction(schedule, x0_model, lambda t: (1.0, 0.0))


def score_from_v(schedule: Schedule, v_model: ModelFn) -> ScoreFn:
    """v-prediction (Salimans and Ho): v = alpha_t eps - sigma_t x0."""
    return score_from_prediction(schedule, v_model,
                                 lambda t: (-sigma(schedule, t), alpha(schedule, t)))


def score_from_flow(schedule: Schedule, velocity_model: ModelFn) -> ScoreFn:
    """Flow-matching velocity u = dx_t/dt = alpha_t' x0 + sigma_t' eps (forward time)."""
    def coefficients(t):
        d_alpha = alpha(schedule, t) * schedule.dlog_alpha(t)
        d_sigma = schedule.dsigma2(t) / (2.0 * sigma(schedule, t))
        return d_alpha, d_sigma

    return score_from_prediction(schedule, velocity_model, coefficients)


def x0_hat(schedule: Schedule, x: Array, t, score: Array) -> Array:
    """Tweedie's denoiser E[x0 | x_t] = (x_t + sigma_t^2 score(x_t)) / alpha_t, [..., d]."""
    return (x + schedule.sigma2(t) * score) / alpha(schedule, t)
