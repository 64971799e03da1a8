"""Forward noising SDEs dx = f(x, t) dt + g(t) dW, x_t = alpha_t x_0 + sigma_t eps.

docs/algorithms.md section 2.

A schedule gives log alpha_t, sigma_t^2 and their time derivatives; the rest follows for all:

    f(x, t) = x d/dt log alpha_t,    div f = d * d/dt log alpha_t,
    g^2(t)  = d/dt sigma_t^2 - 2 sigma_t^2 d/dt log alpha_t

(the last so that x_t | x_0 has variance sigma_t^2). t runs from 0 (data) to 1 (noise); samplers
walk a decreasing time grid ("reverse time", dtau = t_k - t_{k+1} > 0) inside the schedule's time
domain: (0, 1] for VP and VE, (0, 1) for the linear interpolant of flow models (alpha_1 = 0 there,
so f and g^2 are infinite). Scores are callables score(x [N, d], t scalar) -> [N, d]; the adapters
below build one from the usual network outputs (noise, data, v, flow velocity), and
`convert_score` moves a score from the schedule a model was trained on to another one by
matching signal-to-noise ratios (docs/algorithms.md section 10).

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

from proposals import sde as sde_proposals
from smc.validation import static_finite, static_int

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
ModelFn = Callable[[Array, Array], Array]


class Schedule(Protocol):
    """log alpha_t, sigma_t^2 and their time derivatives. Two optional methods: `time_domain()`
    (a `TimeDomain`; (0, 1] when absent) and `time_at_log_snr(log_snr)` (the inverse of
    `log_snr` in closed form; bisection when absent)."""

    def log_alpha(self, t): ...
    def dlog_alpha(self, t): ...
    def sigma2(self, t): ...
    def dsigma2(self, t): ...


class TimeDomain(NamedTuple):
    """The times a schedule is defined on: from `low` to `high`, each end included or not.

    The default, (0, 1], is VP's and VE's: t = 0 is left out because sigma_0 = 0 (or tiny) makes
    scores blow up there.
    """

    low: float = 0.0
    high: float = 1.0
    includes_low: bool = False
    includes_high: bool = True

    def __str__(self) -> str:
        return (f"{'[' if self.includes_low else '('}{self.low:g}, "
                f"{self.high:g}{']' if self.includes_high else ')'}")


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

    def time_at_log_snr(self, log_snr):
        """The t with log(alpha_t / sigma_t) = log_snr: alpha^2 = sigmoid(2 log_snr) makes
        -log alpha = L = softplus(-2 log_snr) / 2, and a t^2 + b t = L a quadratic (a = (b1 - b0)/4,
        b = b0/2), solved in the form that does not cancel near t = 0. Extrapolates past t = 1."""
        beta_min, beta_max = self.check()
        a, b = 0.25 * (beta_max - beta_min), 0.5 * beta_min
        minus_log_alpha = 0.5 * jax.nn.softplus(-2.0 * jnp.asarray(log_snr))
        return 2.0 * minus_log_alpha / (b + jnp.sqrt(b * b + 4.0 * a * minus_log_alpha))


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

    def time_at_log_snr(self, log_snr):
        """log_snr = -log sigma_t is linear in t. Extrapolates outside [0, 1]."""
        sigma_min, sigma_max = self.check()
        log_snr = jnp.asarray(log_snr)
        return (-log_snr - math.log(sigma_min)) / math.log(sigma_max / sigma_min)


class LinearInterpolant(NamedTuple):
    """The linear interpolant of flow matching: x_t = (1 - t) x0 + t eps, on t in (0, 1).

    log alpha_t = log(1 - t), sigma_t^2 = t^2, so f(x, t) = -x / (1 - t) and
    g^2 = 2t + 2t^2 / (1 - t) = 2t / (1 - t): both blow up at t = 1 (alpha_1 = 0), which the
    time domain (0, 1) leaves out. The reverse drift's stiffness grows like 1 / (1 - t), so an
    Euler-Maruyama step from t must be shorter than 2 (1 - t): on a grid uniform in t from 0.999
    in 100 steps the first step multiplies x by -9 and FKC's weights collapse.
    `matching_time(LinearInterpolant(), VP(), time_grid(T, t_min=1e-5))` is a stable grid (VP's
    signal-to-noise ratios) that ends at t = 1e-3 (docs/algorithms.md section 10).
    """

    def time_domain(self) -> TimeDomain:
        return TimeDomain(0.0, 1.0, includes_low=False, includes_high=False)

    def log_alpha(self, t):
        return jnp.log1p(-jnp.asarray(t))

    def dlog_alpha(self, t):
        return -1.0 / (1.0 - jnp.asarray(t))

    def sigma2(self, t):
        return jnp.asarray(t) ** 2

    def dsigma2(self, t):
        return 2.0 * jnp.asarray(t)

    def time_at_log_snr(self, log_snr):
        """log_snr = log((1 - t) / t), so t = sigmoid(-log_snr)."""
        return jax.nn.sigmoid(-jnp.asarray(log_snr))


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


def d_alpha(schedule: Schedule, t) -> Array:
    """d/dt alpha_t = alpha_t d/dt log alpha_t."""
    return alpha(schedule, t) * schedule.dlog_alpha(t)


def d_sigma(schedule: Schedule, t) -> Array:
    """d/dt sigma_t = (d/dt sigma_t^2) / (2 sigma_t)."""
    return schedule.dsigma2(t) / (2.0 * sigma(schedule, t))


def log_snr(schedule: Schedule, t) -> Array:
    """log(alpha_t / sigma_t): decreasing in t, from +inf (data) towards -inf (noise)."""
    return schedule.log_alpha(t) - 0.5 * jnp.log(schedule.sigma2(t))


def time_domain(schedule: Schedule) -> TimeDomain:
    """The schedule's `time_domain()`, or (0, 1] if it has none."""
    method = getattr(schedule, "time_domain", None)
    return method() if callable(method) else TimeDomain()


def time_at_log_snr(schedule: Schedule, value) -> Array:
    """The t with log_snr(schedule, t) = value, elementwise: the schedule's closed form
    (`time_at_log_snr` method) if it has one, else `bisect_log_snr`."""
    method = getattr(schedule, "time_at_log_snr", None)
    return method(value) if callable(method) else bisect_log_snr(schedule, value)


def bisect_log_snr(schedule: Schedule, value, num_iterations: int = 48) -> Array:
    """Bisection for log_snr(schedule, t) = value over the schedule's time domain, elementwise
    (jit- and vmap-able: a fixed number of halvings, 48 reaching float32 resolution at t = 1e-3).

    log-SNR is monotone (decreasing) in t for every schedule; a value outside the domain's range
    gives the nearer end of the domain.
    """
    num_iterations = static_int("num_iterations", num_iterations, 1)
    domain = time_domain(schedule)
    value = jnp.asarray(value)
    dtype = value.dtype if jnp.issubdtype(value.dtype, jnp.floating) else jnp.float32
    bounds = (jnp.full(value.shape, domain.low, dtype), jnp.full(value.shape, domain.high, dtype))

    def halve(_, bounds):
        low, high = bounds
        mid = 0.5 * (low + high)
        too_clean = log_snr(schedule, mid) > value     # still too much signal: go later
        return jnp.where(too_clean, mid, low), jnp.where(too_clean, high, mid)

    low, high = jax.lax.fori_loop(0, num_iterations, halve, bounds)
    return 0.5 * (low + high)


def matching_time(schedule: Schedule, other: Schedule, s) -> Array:
    """The time t on `schedule` with the signal-to-noise ratio `other` has at time s:
    alpha_t / sigma_t = alpha'_s / sigma'_s.

    Also turns a grid on one schedule into the same ratios on another, e.g.
    `matching_time(LinearInterpolant(), VP(), time_grid(100))`, a linear-interpolant grid as
    fine near t = 1 as VP's. A time outside the other schedule's log-SNR range maps outside
    `schedule`'s domain (closed forms extrapolate) or onto its end (bisection).
    """
    return time_at_log_snr(schedule, log_snr(other, s))


def check_schedule(schedule: Schedule, name: str = "schedule") -> Schedule:
    """schedule, after checking that it has the Schedule methods and, where it has a `check`,
    its parameters (TypeError / ValueError naming `name`)."""
    for method in ("log_alpha", "dlog_alpha", "sigma2", "dsigma2"):
        if not callable(getattr(schedule, method, None)):
            raise TypeError(f"{name} must be a schedule (sde.VP(), sde.VE(), "
                            f"sde.LinearInterpolant() or an object with log_alpha, dlog_alpha, "
                            f"sigma2 and dsigma2), got {schedule!r}")
    check = getattr(schedule, "check", None)
    if callable(check):
        check()
    return schedule


# ---------------------------------------------------------------------------------------------
# Time grids


def time_grid(num_steps: int, t_max: float = 1.0, t_min: float = 1e-3) -> np.ndarray:
    """Uniform reverse-time grid t_0 = t_max > ... > t_T = t_min, float64 [num_steps + 1].

    num_steps: int >= 1; 0 < t_min < t_max <= 1. (For the linear interpolant, whose domain ends
    before t = 1, see `LinearInterpolant` and `matching_time`.)
    """
    num_steps = static_int("num_steps", num_steps, 1)
    t_max, t_min = static_finite("t_max", t_max), static_finite("t_min", t_min)
    if not 0.0 < t_min:
        raise ValueError(f"t_min must be > 0, got {t_min}")
    if not t_min < t_max <= 1.0:
        raise ValueError(f"t_max must lie in (t_min, 1] = ({t_min}, 1], got {t_max}")
    return check_time_grid(np.linspace(t_max, t_min, num_steps + 1))


def check_time_grid(times, schedule: Schedule | None = None) -> np.ndarray:
    """Validates a reverse-time grid: concrete, 1-D, >= 2 finite times, strictly decreasing, all
    in the schedule's time domain (`time_domain`: (0, 1] without a schedule, and for VP and VE;
    (0, 1) for the linear interpolant). The samplers (FKC, reward SMC, Psi-Sampler) call it with
    their schedule before compiling anything.

    t = 0 is excluded because sigma_0 = 0 there and scores blow up; t > 1 is outside the
    schedules' domain (a VP grid up to t = 5 gives meaningless weights); the linear interpolant
    also excludes t = 1 (alpha_1 = 0: infinite f and g^2). Returns float64 [T + 1].
    """
    if isinstance(times, jax.core.Tracer):
        raise TypeError("the time grid must be concrete (NumPy or a concrete array), not traced")
    domain = TimeDomain() if schedule is None else time_domain(check_schedule(schedule))
    times = np.asarray(times, np.float64)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"the time grid must be 1-D with at least 2 times, got {times.shape}")
    if not np.all(np.isfinite(times)):
        raise ValueError("the time grid has non-finite entries")
    if not np.all(np.diff(times) < 0):
        raise ValueError("the time grid must be strictly decreasing (reverse time, noise -> data)")
    where = "the schedules' domain" if schedule is None else (
        f"the domain of {type(schedule).__name__}")
    t_min, t_max = times[-1], times[0]
    if not (t_min >= domain.low if domain.includes_low else t_min > domain.low):
        relation = "at or above" if domain.includes_low else "above"
        raise ValueError(f"the time grid must stay {relation} t = {domain.low:g} ({where} is "
                         f"{domain}), got t_min = {t_min}")
    if not (t_max <= domain.high if domain.includes_high else t_max < domain.high):
        raise ValueError(f"the time grid must lie in {domain}, {where}, got t_max = {t_max}")
    return times


# ---------------------------------------------------------------------------------------------
# Network parameterisations -> score


def score_from_prediction(schedule: Schedule, model: ModelFn,
                          coefficients: Callable[[Array], tuple[Array, Array]],
                          name: str = "model") -> ScoreFn:
    """Score from a network predicting p = a_t x0 + b_t eps, where (a_t, b_t) = coefficients(t).

    x = alpha x0 + sigma eps gives eps = (a x - alpha p) / (a sigma - b alpha), score = -eps/sigma.
    One rule for every linear parameterisation (eps, x0, v, flow velocity). The model's output
    must have x's shape: checked while tracing (a ValueError naming `name` at the samplers'
    abstract evaluation, before compiling), since a broadcastable [N, 1] would pass silently.
    """
    if not callable(model):
        raise TypeError(f"{name} must be callable (x [N, d], t) -> [N, d], got {model!r}")

    def score(x: Array, t: Array) -> Array:
        a, b = coefficients(t)
        al, si = alpha(schedule, t), sigma(schedule, t)
        eps = (a * x - al * check_output(name, model(x, t), x)) / (a * si - b * al)
        return -eps / si

    return score


def check_output(name: str, out, x: Array) -> Array:
    """``out``, after checking that a network's output is a float array of x's shape (ValueError
    naming ``name`` otherwise); works on tracers and abstract values alike."""
    shape = getattr(out, "shape", None)
    if shape != tuple(x.shape) or not jnp.issubdtype(out.dtype, jnp.floating):
        got = f"{getattr(out, 'dtype', type(out).__name__)}{list(shape or [])}"
        raise ValueError(f"{name}(x, t) must return a float array of x's shape "
                         f"{tuple(x.shape)}, got {got}")
    return out


def score_from_eps(schedule: Schedule, eps_model: ModelFn) -> ScoreFn:
    """Noise prediction: score = -eps_hat / sigma_t."""
    return score_from_prediction(schedule, eps_model, lambda t: (0.0, 1.0), "eps_model")


def score_from_x0(schedule: Schedule, x0_model: ModelFn) -> ScoreFn:
    """Data prediction: score = (alpha_t x0_hat - x) / sigma_t^2."""
    return score_from_prediction(schedule, x0_model, lambda t: (1.0, 0.0), "x0_model")


def score_from_v(schedule: Schedule, v_model: ModelFn) -> ScoreFn:
    """v-prediction (Salimans and Ho): v = alpha_t eps - sigma_t x0."""
    return score_from_prediction(schedule, v_model,
                                 lambda t: (-sigma(schedule, t), alpha(schedule, t)), "v_model")


def score_from_velocity(schedule: Schedule, velocity: ModelFn) -> ScoreFn:
    """Flow-matching velocity: velocity(x [N, d], t) ~ E[u | x_t = x], where u is the forward-time
    velocity of the path, u = d/dt x_t = alpha'_t x0 + sigma'_t eps.

    On the linear interpolant (`LinearInterpolant`, x_t = (1 - t) x0 + t eps) that is u = eps - x0,
    the regression target of flow matching, and the score is -(x + (1 - t) v) / t
    (E[eps | x] = x + (1 - t) v, E[x0 | x] = x - t v). On any other schedule, the velocity of that
    schedule's path. A velocity of another shape than x: ValueError naming `velocity` while tracing.
    """
    return score_from_prediction(
        schedule, velocity, lambda t: (d_alpha(schedule, t), d_sigma(schedule, t)), "velocity")


def x0_hat(schedule: Schedule, x: Array, t, score: Array) -> Array:
    """Tweedie's denoiser E[x0 | x_t] = (x_t + sigma_t^2 score(x_t)) / alpha_t, [..., d]."""
    return (x + schedule.sigma2(t) * score) / alpha(schedule, t)


# ---------------------------------------------------------------------------------------------
# Interpolant conversion


def convert_score(score: ScoreFn, model_schedule: Schedule,
                  sampling_schedule: Schedule) -> ScoreFn:
    """The score along `sampling_schedule` of a model trained on `model_schedule` (Kim et al.
    2025: sample a flow model along VP, or a VP model along the linear interpolant).

    At time s of the sampling schedule (alpha', sigma'), take the model's time t with the same
    signal-to-noise ratio, alpha_t / sigma_t = alpha'_s / sigma'_s (`matching_time`), and
    c = alpha_t / alpha'_s (= sigma_t / sigma'_s). Then c x'_s = alpha_t x0 + sigma_t eps has the
    model's marginal p_t, so p'_s(x') = c^d p_t(c x') and

        score'(x', s) = c score(c x', t).

    The data law, and every marginal, is unchanged; only the path's time and scale change. Keep
    the sampling grid inside the log-SNR range the model was trained on (`matching_time` of the
    grid shows where it lands).
    """
    if not callable(score):
        raise TypeError(f"score must be callable (x [N, d], t) -> [N, d], got {score!r}")
    check_schedule(model_schedule, "model_schedule")
    check_schedule(sampling_schedule, "sampling_schedule")

    def converted(x: Array, s: Array) -> Array:
        t = matching_time(model_schedule, sampling_schedule, s)
        scale = jnp.exp(model_schedule.log_alpha(t) - sampling_schedule.log_alpha(s))
        return scale * score(scale * x, t)

    return converted


def reverse_kernel(schedule: Schedule, kernel: str, x: Array, score: Array, t, t_next
                   ) -> sde_proposals.Gaussian:
    """The base reverse kernel t -> t_next (Euler-Maruyama, or "ancestral": the DDPM posterior
    step with x0_hat) for x [N, d] with its score [N, d]: the proposal of the reward-driven
    samplers without guidance."""
    if kernel == "euler_maruyama":
        diffusion2 = g2(schedule, t)
        drift = -f(schedule, x, t) + diffusion2 * score
        return sde_proposals.euler_maruyama_kernel(x, drift, jnp.sqrt(diffusion2), t - t_next)
    x0 = x0_hat(schedule, x, t, score)
    return sde_proposals.ancestral_kernel(x, x0, alpha(schedule, t), sigma(schedule, t),
                                          alpha(schedule, t_next),
                                          sigma(schedule, t_next))
