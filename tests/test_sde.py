"""Schedules, parameterisation adapters and Gaussian reverse-time steps (targets/diffusion/sde.py,
proposals/sde.py).

Sampling tests use Gaussian data, whose reverse-time samplers are linear-Gaussian: the exact law of
the discretised chain is computed by a moment recursion (float64): the samples are checked against
it within Monte Carlo error, and it against the data law (the discretisation bias).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import multivariate_normal

from proposals import sde as steps
from targets.diffusion import sde
from targets.toy import gmm

SCHEDULES = [sde.VP(), sde.VP(0.5, 10.0), sde.VE(), sde.VE(0.05, 5.0)]
IDS = ["vp", "vp2", "ve", "ve2"]

MEAN = np.array([1.0, -0.5])
COV = np.array([[0.5, 0.2], [0.2, 0.3]])
DATA = gmm.mixture([1.0], [MEAN], covs=[COV])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_schedule_derivatives_and_diffusion(schedule):
    ts = jnp.linspace(0.01, 1.0, 7)
    grad = jax.vmap(jax.grad(lambda t: jnp.asarray(schedule.log_alpha(t), jnp.float32)))
    np.testing.assert_allclose(schedule.dlog_alpha(ts), grad(ts), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(schedule.dsigma2(ts), jax.vmap(jax.grad(schedule.sigma2))(ts),
                               rtol=1e-3)
    np.testing.assert_allclose(sde.f(schedule, jnp.ones((3, 2)), 0.5),
                               schedule.dlog_alpha(0.5) * jnp.ones((3, 2)))
    np.testing.assert_allclose(sde.div_f(schedule, 0.5, 4), 4 * schedule.dlog_alpha(0.5))
    if isinstance(schedule, sde.VP):
        beta_t = schedule.beta_min + ts * (schedule.beta_max - schedule.beta_min)
        np.testing.assert_allclose(sde.g2(schedule, ts), beta_t, rtol=1e-4)
        np.testing.assert_allclose(sde.alpha(schedule, ts) ** 2 + schedule.sigma2(ts), 1.0,
                                   rtol=1e-6)
        b0, b1 = schedule.beta_min, schedule.beta_max
        np.testing.assert_allclose(schedule.log_alpha(1.0), -0.25 * (b1 - b0) - 0.5 * b0, rtol=1e-6)
    else:
        np.testing.assert_allclose(sde.alpha(schedule, ts), 1.0)
        np.testing.assert_allclose(sde.g2(schedule, ts), schedule.dsigma2(ts), rtol=1e-6)
        np.testing.assert_allclose(sde.sigma(schedule, jnp.array([0.0, 1.0])),
                                   [schedule.sigma_min, schedule.sigma_max], rtol=1e-5)


@pytest.mark.parametrize("schedule", [sde.VP(), sde.VE(0.01, 3.0), sde.LinearInterpolant()],
                         ids=["vp", "ve", "linear"])
def test_forward_sde_has_the_schedule_marginals(schedule):
    # dx = f dt + g dW from x_0 = 1 must give mean alpha_t and variance sigma_t^2: f and g^2 are
    # consistent with (alpha, sigma) only if both are right.
    n, num = 20_000, 400
    ts = np.linspace(0.0, 0.6, num + 1)

    def body(x, inputs):
        key, t, dt = inputs
        noise = jax.random.normal(key, x.shape)
        return x + sde.f(schedule, x, t) * dt + jnp.sqrt(sde.g2(schedule, t) * dt) * noise, None

    keys = jax.random.split(jax.random.PRNGKey(0), num)
    x, _ = jax.lax.scan(body, jnp.ones((n, 1)), (keys, ts[:-1], np.diff(ts)))
    x = np.asarray(x[:, 0], np.float64)
    var = float(schedule.sigma2(0.6))
    assert abs(x.mean() - float(sde.alpha(schedule, 0.6))) < 4.5 * np.sqrt(var / n) + 2e-3
    assert abs(x.var() - var) < 4.5 * var * np.sqrt(2 / n) + 0.01 * var


def test_time_grid_and_its_validation():
    times = sde.time_grid(4, 1.0, 0.2)
    np.testing.assert_allclose(times, [1.0, 0.8, 0.6, 0.4, 0.2])
    for bad, match in [([1.0, 0.5, 0.7], "decreasing"), ([1.0, 1.0], "decreasing"),
                       ([1.0, 0.0], "above t = 0"), ([0.5], "at least 2"),
                       ([[1.0, 0.5]], "1-D"), ([1.0, np.nan], "non-finite")]:
        with pytest.raises(ValueError, match=match):
            sde.check_time_grid(bad)
    with pytest.raises(ValueError, match="num_steps"):
        sde.time_grid(0)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(sde.check_time_grid)(jnp.array([1.0, 0.5]))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_parameterisation_adapters_recover_the_score(schedule):
    x = gmm.sample(jax.random.PRNGKey(1), DATA, 16) * 2.0
    t = 0.37
    score = gmm.noised_score(DATA, schedule)(x, t)
    al, si = sde.alpha(schedule, t), sde.sigma(schedule, t)
    eps = -si * score
    x0 = sde.x0_hat(schedule, x, t, score)
    np.testing.assert_allclose(al * x0 + si * eps, x, rtol=1e-4, atol=1e-4)
    d_alpha = al * schedule.dlog_alpha(t)
    d_sigma = schedule.dsigma2(t) / (2 * si)
    cases = [(sde.score_from_eps, eps), (sde.score_from_x0, x0),
             (sde.score_from_v, al * eps - si * x0),
             (sde.score_from_velocity, d_alpha * x0 + d_sigma * eps)]
    for adapter, prediction in cases:
        recovered = adapter(schedule, lambda z, s, p=prediction: p)(x, t)
        scale = float(jnp.abs(score).max())
        np.testing.assert_allclose(recovered, score, rtol=1e-3, atol=1e-3 * scale)


def test_tweedie_is_the_posterior_mean_for_gaussian_data():
    schedule, t = sde.VP(), 0.3
    x = jax.random.normal(jax.random.PRNGKey(2), (8, 2))
    al, s2 = float(sde.alpha(schedule, t)), float(schedule.sigma2(t))
    # E[x0 | x_t] = m + alpha C (alpha^2 C + sigma^2 I)^{-1} (x_t - alpha m).
    gain = al * COV @ np.linalg.inv(al**2 * COV + s2 * np.eye(2))
    exact = MEAN + (np.asarray(x) - al * MEAN) @ gain.T
    score = gmm.noised_score(DATA, schedule)(x, t)
    np.testing.assert_allclose(sde.x0_hat(schedule, x, t, score), exact, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Reverse-time samplers on Gaussian data


def _gaussian_marginal(schedule, t):
    """(alpha_t, sigma_t^2, Lambda_t = alpha^2 C + sigma^2 I) in float64."""
    al, s2 = float(sde.alpha(schedule, t)), float(schedule.sigma2(t))
    return al, s2, al**2 * COV + s2 * np.eye(2)


def euler_law(schedule, times):
    """Exact law (mean, cov) of the Euler-Maruyama chain x' = x + (-f + g^2 s) dtau + g sqrt(dtau)
    xi with s(x) = -Lambda_t^{-1} (x - alpha_t m), started at N(0, sigma_{t_0}^2 I)."""
    mean, cov = np.zeros(2), float(schedule.sigma2(times[0])) * np.eye(2)
    for t, dtau in zip(times[:-1], -np.diff(times)):
        al, _, lam = _gaussian_marginal(schedule, t)
        g2, dla = float(sde.g2(schedule, t)), float(schedule.dlog_alpha(t))
        precision = np.linalg.inv(lam)
        a = np.eye(2) * (1 - dla * dtau) - g2 * dtau * precision
        b = g2 * dtau * precision @ (al * MEAN)
        mean, cov = a @ mean + b, a @ cov @ a.T + g2 * dtau * np.eye(2)
    return mean, cov


def ancestral_law(schedule, times):
    """Exact law of the ancestral chain with the exact Tweedie denoiser (affine in x)."""
    mean, cov = np.zeros(2), float(schedule.sigma2(times[0])) * np.eye(2)
    for t, s in itertools.pairwise(times):
        al_t, s2_t, lam = _gaussian_marginal(schedule, t)
        al_s, s2_s, _ = _gaussian_marginal(schedule, s)
        gain = al_t * COV @ np.linalg.inv(lam)             # x0_hat = m + gain (x - alpha_t m)
        a_ts = al_t / al_s
        v_ts = s2_t - a_ts**2 * s2_s
        a = (a_ts * s2_s * np.eye(2) + al_s * v_ts * gain) / s2_t
        b = al_s * v_ts * (MEAN - gain @ (al_t * MEAN)) / s2_t
        mean, cov = a @ mean + b, a @ cov @ a.T + v_ts * s2_s / s2_t * np.eye(2)
    return mean, cov


def run_sampler(kind, schedule, times, n, key):
    score = gmm.noised_score(DATA, schedule)
    times32 = jnp.asarray(times, jnp.float32)

    def body(x, inputs):
        key, t, s = inputs
        value = score(x, t)
        if kind == "euler":
            drift = -sde.f(schedule, x, t) + sde.g2(schedule, t) * value
            x, _ = steps.euler_maruyama(key, x, drift, jnp.sqrt(sde.g2(schedule, t)), t - s)
        else:
            x0 = sde.x0_hat(schedule, x, t, value)
            x, _ = steps.ancestral(key, x, x0, sde.alpha(schedule, t), sde.sigma(schedule, t),
                                   sde.alpha(schedule, s), sde.sigma(schedule, s))
        return x, None

    x = sde.sigma(schedule, times[0]) * jax.random.normal(key, (n, 2))
    keys = jax.random.split(key, len(times) - 1)
    return jax.jit(lambda x: jax.lax.scan(body, x, (keys, times32[:-1], times32[1:]))[0])(x)


# Discretisation bias of each 200-step chain against the data law, from the recursions: 0.004 and
# 0.026 (the ancestral step drops Var[x0 | x_t]); both shrink as O(1/T) (0.0003 and 0.0017 at
# T = 3200).
@pytest.mark.parametrize("kind, bias", [("euler", 0.01), ("ancestral", 0.03)])
def test_reverse_samplers_reproduce_gaussian_data(kind, bias):
    schedule, times, n = sde.VP(), sde.time_grid(200), 20_000
    x = np.asarray(run_sampler(kind, schedule, times, n, jax.random.PRNGKey(3)), np.float64)
    mean, cov = (euler_law if kind == "euler" else ancestral_law)(schedule, times)
    var = np.diag(cov)
    assert np.all(np.abs(x.mean(0) - mean) < 4.5 * np.sqrt(var / n))
    assert np.all(np.abs(np.cov(x.T) - cov) < 4.5 * np.sqrt((np.outer(var, var) + cov**2) / n))
    np.testing.assert_allclose(mean, MEAN, atol=bias)
    np.testing.assert_allclose(cov, COV, atol=bias)


logpdf = jax.jit(jax.vmap(lambda x, m, v: multivariate_normal.logpdf(x, m, v * jnp.eye(len(x)))))


def test_transition_log_densities_are_the_gaussian_formula():
    key_x, key_d, key_s = jax.random.split(jax.random.PRNGKey(4), 3)
    x = jax.random.normal(key_x, (5, 3))
    drift = jax.random.normal(key_d, (5, 3))
    for g in (0.7, jnp.linspace(0.5, 1.5, 5)):
        dt = 0.02
        x_new, log_q = steps.euler_maruyama(key_s, x, drift, g, dt)
        var = (jnp.broadcast_to(g, (5,)) ** 2 * dt)
        exact = logpdf(x_new, x + drift * dt, var)
        np.testing.assert_allclose(log_q, exact, rtol=1e-5)
        np.testing.assert_allclose(steps.euler_maruyama_log_prob(x_new, x, drift, g, dt), exact,
                                   rtol=1e-5)
    # Ancestral: the same Gaussian formula with its own mean and variance.
    x0 = jax.random.normal(key_d, (5, 3))
    kernel = steps.ancestral_kernel(x, x0, 0.6, 0.8, 0.9, 0.43)
    x_new, log_q = steps.sample(key_s, kernel)
    a_ts, v_ts = 0.6 / 0.9, 0.8**2 - (0.6 / 0.9) ** 2 * 0.43**2
    mean = (a_ts * 0.43**2 * x + 0.9 * v_ts * x0) / 0.8**2
    var = v_ts * 0.43**2 / 0.8**2
    exact = logpdf(x_new, mean, jnp.full(5, var))
    np.testing.assert_allclose(log_q, exact, rtol=1e-5)
    np.testing.assert_allclose(steps.log_prob(kernel, x_new), exact, rtol=1e-5)
