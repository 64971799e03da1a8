"""Exactness tests for the Psi-Sampler (targets/diffusion/psi.py).

- pCNL chains on N(u; 0, I) exp(Phi(u)) with a Gaussian-shaped Phi: the posterior is Gaussian
  (`gmm.tilt`), so chains started exactly must stay exact, and chains started at N(0, I) must
  reach it (also with the scaling x = sigma u for sigma_{t_0} != 1).
- The whole sampler on a Gaussian data law, where the discretised base chain is linear-Gaussian
  (tests/test_reward.py `discretised_law`): weighted particles against the exact tilted law, and
  Z_hat against Z / Z_0 (Z_0 = E_{N(0, sigma^2 I)}[exp Phi], closed form as Phi is quadratic).
  A VE schedule with sigma_max = 1.5 makes Phi informative at t_0, so counting it twice (as an
  initial weight on top of the chains) changes both.
- The sampler on a DAS toy against the exact tilted mixture.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smc
from proposals import mcmc
from targets.diffusion import psi, sde
from targets.toy import das, gmm
from tests.test_reward import (
    DATA_COV,
    DATA_MEAN,
    GAUSS_REWARD,
    GAUSS_SCORE,
    assert_close_in_sliced_wasserstein,
    cloud_statistics,
    discretised_law,
    mean_and_se,
    run_seeds,
)

CENTER, PRECISION = jnp.array([1.0, -2.0]), jnp.array([[1.5, 0.5], [0.5, 0.8]])


def bump(u):
    diff = u - CENTER
    return -0.5 * diff @ PRECISION @ diff


def gaussian_posterior(scale):
    """N(x; 0, scale^2 I) exp(bump(x)) / Z: mean [2], cov [2, 2]."""
    prior = gmm.mixture([1.0], [[0.0, 0.0]], std=scale)
    post, _ = gmm.tilt(prior, CENTER, PRECISION)
    return np.asarray(post.means[0], np.float64), np.asarray(post.covs[0], np.float64)


def assert_gaussian_moments(x, mean, cov):
    """Independent draws x [M, 2] against N(mean, cov): sample mean and covariance within 4 se."""
    m = x.shape[0]
    se_mean = np.sqrt(np.diag(cov) / m)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * se_mean), (x.mean(0), mean)
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / m)
    assert np.all(np.abs(np.cov(x.T) - cov) < 4 * se_cov), (np.cov(x.T), cov)


def test_pcnl_chains_keep_and_reach_the_gaussian_posterior():
    mean, cov = gaussian_posterior(1.0)
    start = jax.random.multivariate_normal(jax.random.PRNGKey(0), mean, cov, (4000,))
    kernel = functools.partial(mcmc.pcnl, log_likelihood=bump, step_size=0.5)
    kept = jax.jit(lambda key, x: mcmc.run_chain(key, kernel, x, 20).x)(jax.random.PRNGKey(1),
                                                                        start)
    assert_gaussian_moments(np.asarray(kept, np.float64), mean, cov)
    # Chains from N(0, I) in u = x / scale, one kept state per chain: independent exact draws.
    for scale in (1.0, 2.0):
        initial = psi.chain_initial(bump, scale=scale, dim=2, num_chains=4000, burn_in=50,
                                    thin=1, step_size=0.5)
        x = jax.jit(initial, static_argnums=1)(jax.random.PRNGKey(2), 4000)
        assert_gaussian_moments(np.asarray(x, np.float64), *gaussian_posterior(scale))


VE = sde.VE(sigma_max=1.5)
TIMES = sde.time_grid(50)


def psi_exact(schedule, times, alpha=1.0):
    """(tilted toy of p_theta, log Z_0): the target and the chains' normaliser, in closed form."""
    mu, s = discretised_law(DATA_MEAN, DATA_COV, schedule, times)
    toy = das.tilted(gmm.mixture([1.0], [mu], [s]), GAUSS_REWARD, alpha)
    # x0_hat(x, t_0) = a x + b for Gaussian data, so Phi = r(a x + b) / alpha is a bump in x.
    t0 = times[0]
    al, s2 = float(sde.alpha(schedule, t0)), float(schedule.sigma2(t0))
    lam_inv = np.linalg.inv(al**2 * DATA_COV + s2 * np.eye(2))
    a = (np.eye(2) - s2 * lam_inv) / al
    b = s2 * lam_inv @ (al * DATA_MEAN) / al
    precision = a.T @ np.asarray(GAUSS_REWARD.precision) @ a / alpha
    center = np.linalg.solve(a, np.asarray(GAUSS_REWARD.center) - b)
    _, log_z0 = gmm.tilt(gmm.mixture([1.0], [[0.0, 0.0]], std=np.sqrt(s2)), center, precision)
    return toy, float(log_z0) + GAUSS_REWARD.offset / alpha


def test_psi_sampler_targets_the_exact_discretised_tilt_with_uniform_initial_weights():
    toy, log_z0 = psi_exact(VE, TIMES)
    model = psi.psi_sampler(GAUSS_SCORE(VE), GAUSS_REWARD, alpha=1.0, schedule=VE, times=TIMES,
                            dim=2, num_chains=8, burn_in=50, thin=5)
    particles, log_w = jax.jit(model.init, static_argnums=1)(jax.random.PRNGKey(0), 64)
    assert particles.x.shape == (64, 2) and np.all(np.asarray(log_w) == 0.0)
    means, rewards, log_z, _ = run_seeds(model, 512, 16, cloud_statistics(GAUSS_REWARD))
    exact_mean = np.asarray(toy.target.means[0])
    m, se = mean_and_se(means)
    assert np.all(np.abs(m - exact_mean) < 4 * se), (m, se, exact_mean)
    m, se = mean_and_se(rewards)
    assert abs(m - toy.mean_reward) < 4 * se, (m, se, toy.mean_reward)
    # Z_hat estimates Z / Z_0: the chains' normaliser is not seen by the SMC.
    ratio = np.exp(log_z - (toy.log_z - log_z0))
    assert abs(np.mean(ratio) - 1.0) < 4 * np.std(ratio, ddof=1) / np.sqrt(ratio.size), ratio


def test_psi_sampler_on_the_ring_hits_the_tilted_mixture():
    toy = das.ring()
    vp = sde.VP()
    # 32 chains (published: a few) keep the sequential chain part short: 50 + 5 x 16 steps.
    model = psi.psi_sampler(gmm.noised_score(toy.prior, vp), toy.reward, alpha=1.0, schedule=vp,
                            times=sde.time_grid(100), dim=2, num_chains=32)
    seeds, n = 16, 512
    x, w, rewards = run_seeds(model, n, seeds, lambda r: (r.particles.x, r.weights,
                                                          r.weights @ toy.reward(r.particles.x)))
    m, se = mean_and_se(rewards)
    allowance = 0.015  # discretisation bias at 100 VP steps (tests/test_reward.py)
    assert abs(m - toy.mean_reward) < 4 * se + allowance, (m, se, toy.mean_reward)
    masses = np.asarray(jax.vmap(gmm.mode_weights, (None, 0, 0))(toy.target, x, w))
    m, se = mean_and_se(masses)
    exact = np.asarray(toy.target.weights)
    assert np.all(np.abs(m - exact) < 4 * se + 0.01), (m, se, exact)
    assert_close_in_sliced_wasserstein(x, w, toy)


def test_bad_inputs_raise_clear_errors():
    kw = {"alpha": 1.0, "schedule": VE, "times": TIMES, "dim": 2}
    score = GAUSS_SCORE(VE)
    for name, value in (("num_chains", 0), ("burn_in", -1), ("thin", 0), ("num_chains", 2.5)):
        with pytest.raises(ValueError, match=name):
            psi.psi_sampler(score, GAUSS_REWARD, **kw, **{name: value})
    with pytest.raises(ValueError, match="step_size"):
        psi.psi_sampler(score, GAUSS_REWARD, step_size=0.0, **kw)
    with pytest.raises(ValueError, match="alpha"):
        psi.psi_sampler(score, GAUSS_REWARD, **{**kw, "alpha": -1.0})
    with pytest.raises(ValueError, match="exponents"):
        psi.psi_sampler(score, GAUSS_REWARD, exponents="das", **kw)
    model = psi.psi_sampler(score, GAUSS_REWARD, num_chains=3, **kw)
    with pytest.raises(ValueError, match="multiple of num_chains"):
        smc.run(jax.random.PRNGKey(0), model, 8)
    assert psi.chain_evaluations(512, num_chains=4, burn_in=50, thin=5) == 4 * (50 + 5 * 128)
