"""Exact Gaussian-mixture answers (targets/toy/gmm.py) against autodiff, sampling and 2-D grids."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from targets.diffusion import sde
from targets.toy import distance, gmm

jax.config.update("jax_enable_x64", False)

# Anisotropic, correlated, unequal weights: a sign or transpose error shows.
A = gmm.mixture([0.6, 0.4], [[-1.0, 0.5], [1.2, -0.3]],
                covs=[[[0.5, 0.2], [0.2, 0.3]], [[0.2, -0.05], [-0.05, 0.6]]])
B = gmm.mixture([0.3, 0.5, 0.2], [[0.0, -1.0], [0.8, 1.0], [-1.5, 0.0]],
                covs=[[[0.7, 0.1], [0.1, 0.4]], 0.3 * np.eye(2), [[0.4, 0.0], [0.0, 0.9]]])
GRID = {"low": -7.0, "high": 7.0, "num": 300}


def z_scores_moments(x, mean, cov):
    """|sample - exact| / SE for the mean and the covariance entries (SE from the exact fourth
    moments would be better; Gaussian-formula SEs times 2 cover a mixture's heavier tails)."""
    x, mean, cov = np.asarray(x, np.float64), np.asarray(mean), np.asarray(cov)
    n = x.shape[0]
    var = np.diag(cov)
    z_mean = np.abs(x.mean(0) - mean) / np.sqrt(var / n)
    z_cov = np.abs(np.cov(x.T) - cov) / (2 * np.sqrt((np.outer(var, var) + cov**2) / n))
    return np.concatenate([z_mean, z_cov.ravel()])


@pytest.mark.parametrize("schedule", [sde.VP(), sde.VE(0.01, 10.0)], ids=["vp", "ve"])
def test_noised_score_is_the_gradient_of_the_noised_log_density(schedule):
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    score = jax.jit(gmm.noised_score(B, schedule))
    log_p = gmm.noised_log_prob(B, schedule)
    autodiff = jax.jit(jax.vmap(jax.grad(log_p), in_axes=(0, None)))
    for t in (0.01, 0.3, 0.9):
        np.testing.assert_allclose(score(x, t), autodiff(x, t), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("schedule", [sde.VP(), sde.VE(0.01, 10.0)], ids=["vp", "ve"])
def test_noised_mixture_is_the_law_of_the_noised_data(schedule):
    key_x, key_e = jax.random.split(jax.random.PRNGKey(1))
    n, t = 200_000, 0.4
    x0 = gmm.sample(key_x, A, n)
    xt = sde.alpha(schedule, t) * x0 + sde.sigma(schedule, t) * jax.random.normal(key_e, x0.shape)
    mean, cov = gmm.moments(gmm.noised(A, sde.alpha(schedule, t), sde.sigma(schedule, t)))
    assert np.all(z_scores_moments(xt, mean, cov) < 4.5)


def test_sampling_moments_and_normalisation():
    x = gmm.sample(jax.random.PRNGKey(2), B, 200_000)
    mean, cov = gmm.moments(B)
    assert np.all(z_scores_moments(x, mean, cov) < 4.5)
    grid = gmm.on_grid(lambda z: gmm.log_prob(B, z), **GRID)
    assert abs(float(grid.log_normaliser)) < 1e-3
    gm, gc = gmm.weighted_moments(grid.points, grid.probs)
    np.testing.assert_allclose(gm, mean, atol=2e-3)
    np.testing.assert_allclose(gc, cov, atol=2e-3)


def check_against_grid(mixture, log_z, log_unnormalised):
    """The closed form must equal log_unnormalised - log Z pointwise, and on the grid."""
    grid = gmm.on_grid(log_unnormalised, **GRID)
    np.testing.assert_allclose(float(log_z), float(grid.log_normaliser), atol=2e-3)
    pts = grid.points[grid.probs > 1e-6]
    np.testing.assert_allclose(gmm.log_prob(mixture, pts), log_unnormalised(pts) - log_z,
                               atol=2e-3, rtol=1e-4)
    mean, cov = gmm.moments(mixture)
    gm, gc = gmm.weighted_moments(grid.points, grid.probs)
    np.testing.assert_allclose(mean, gm, atol=2e-3)
    np.testing.assert_allclose(cov, gc, atol=2e-3)


def test_product_of_two_mixtures_against_a_grid():
    prod, log_z = gmm.product(A, B)
    assert prod.num_components == 6
    check_against_grid(prod, log_z, lambda x: gmm.log_prob(A, x) + gmm.log_prob(B, x))


@pytest.mark.parametrize("precision", [[[2.0, 0.5], [0.5, 0.8]], [[0.0, 0.0], [0.0, 1.5]]],
                         ids=["full", "singular"])
def test_gaussian_reward_tilt_against_a_grid(precision):
    center = jnp.array([0.7, -0.4])
    prec = jnp.asarray(precision)

    def reward(x):
        d = x - center
        return -0.5 * jnp.einsum("...d,de,...e->...", d, prec, d)

    tilted, log_z = gmm.tilt(B, center, prec)
    check_against_grid(tilted, log_z, lambda x: gmm.log_prob(B, x) + reward(x))


def test_annealed_mixture_separated_formula_against_grid():
    # Separated modes with different spreads: the |C_k|^{(1 - beta)/2} factor matters.
    mix = gmm.mixture([0.5, 0.3, 0.2], [[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], std=[0.4, 0.8, 0.6])
    beta = 3.0
    approx = gmm.anneal_separated(mix, beta)
    grid = gmm.anneal_grid(mix, beta, low=-7.0, high=7.0, num=300)
    np.testing.assert_allclose(gmm.mode_weights(mix, grid.points, grid.probs), approx.weights,
                               atol=1e-4)
    mean, cov = gmm.moments(approx)
    gm, gc = gmm.weighted_moments(grid.points, grid.probs)
    np.testing.assert_allclose(mean, gm, atol=1e-3)
    np.testing.assert_allclose(cov, gc, atol=1e-3)
    # The plain w^beta weights (a missing determinant factor) would be far off.
    naive = np.array([0.5, 0.3, 0.2]) ** beta
    assert np.max(np.abs(naive / naive.sum() - np.asarray(approx.weights))) > 0.1


def test_fkc_toys():
    four = gmm.four_modes()
    np.testing.assert_allclose(np.abs(four.means), 1.5)
    np.testing.assert_allclose(four.covs, 0.16 * np.broadcast_to(np.eye(2), (4, 2, 2)), rtol=1e-6)
    np.testing.assert_allclose(four.weights, 0.25)
    np.testing.assert_allclose(gmm.four_modes([4, 3, 2, 1]).weights, [0.4, 0.3, 0.2, 0.1],
                               rtol=1e-6)
    forty = gmm.forty_modes()
    assert forty.num_components == 40 and np.all(np.abs(forty.means) <= 40)
    np.testing.assert_allclose(forty.covs[:, 0, 0], math.log1p(math.e) ** 2, rtol=1e-6)
    np.testing.assert_allclose(forty.weights, 1 / 40, rtol=1e-6)


def test_nearest_mode_and_mode_weights():
    four = gmm.four_modes()
    x = four.means + 0.3 * jnp.array([[1.0, -1.0]])
    np.testing.assert_array_equal(gmm.nearest_mode(four, x), [0, 1, 2, 3])
    w = jnp.array([1.0, 0.0, 3.0, 0.0])
    np.testing.assert_allclose(gmm.mode_weights(four, x, w), [0.25, 0.0, 0.75, 0.0])
    samples = gmm.sample(jax.random.PRNGKey(3), gmm.four_modes([4, 3, 2, 1]), 100_000)
    np.testing.assert_allclose(gmm.mode_weights(four, samples), [0.4, 0.3, 0.2, 0.1], atol=0.006)


def test_sliced_wasserstein():
    x = jax.random.normal(jax.random.PRNGKey(4), (500, 2))
    key = jax.random.PRNGKey(5)
    assert float(distance.sliced_wasserstein(key, x, x)) < 1e-6
    # A shift by delta: every projection moves by <theta, delta>; W1 = |<theta, delta>|.
    delta = jnp.array([0.3, -0.4])
    theta = jax.random.normal(key, (64, 2))
    theta = theta / jnp.linalg.norm(theta, axis=-1, keepdims=True)
    np.testing.assert_allclose(distance.sliced_wasserstein(key, x + delta, x),
                               jnp.mean(jnp.abs(theta @ delta)), rtol=1e-4)
    # Weights act like repeated points.
    a, b = jnp.array([0.0, 1.0]), jnp.array([0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(distance.wasserstein_1d(a, jnp.array([0.5]), jnp.array([1.0, 3.0])),
                               distance.wasserstein_1d(b, jnp.array([0.5])), rtol=1e-6)


def test_bad_mixtures():
    with pytest.raises(ValueError, match="positive"):
        gmm.mixture([1.0, -1.0], [[0.0], [1.0]], std=1.0)
    with pytest.raises(ValueError, match="exactly one"):
        gmm.mixture([1.0], [[0.0]])
    with pytest.raises(ValueError, match="positive definite"):
        gmm.mixture([1.0], [[0.0, 0.0]], covs=[[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match=r"\[K, d\]"):
        gmm.mixture([1.0], [0.0, 1.0], std=1.0)
