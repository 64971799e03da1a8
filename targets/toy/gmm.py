"""Gaussian mixtures with exact answers for score-model targets: noised scores, products, tilts.

p(x) = sum_k w_k N(x; mu_k, C_k). Closed forms used here:
- Noising x_t = alpha x0 + sigma eps maps p to the mixture with means alpha mu_k and covariances
  alpha^2 C_k + sigma^2 I, so the exact score of every diffusion marginal is known, and Gaussian
  conditioning per component gives E[x0 | x_t], E[eps | x_t] and the exact flow velocity.
- A Gaussian times an unnormalised Gaussian bump is a scaled Gaussian (A PSD, may be singular):
      N(x; mu, C) exp(-(x - c)^T A (x - c) / 2)
          = |I + C A|^{-1/2} exp(-(mu - c)^T A (I + C A)^{-1} (mu - c) / 2) N(x; mu', C'),
      C' = (I + C A)^{-1} C,  mu' = mu + C' A (c - mu).
  Products of mixtures and Gaussian-shaped reward tilts are both this one rule.
- p^beta has no closed form; `anneal_grid` is exact on a 2-D grid and `anneal_separated` is the
  well-separated limit, weights proportional to w_k^beta |C_k|^{(1 - beta)/2}.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from targets.diffusion import sde

Array = jax.Array


class GaussianMixture(NamedTuple):
    """weights [K] (summing to 1), means [K, d], covs [K, d, d]."""

    weights: Array
    means: Array
    covs: Array

    @property
    def dim(self) -> int:
        return int(self.means.shape[-1])

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])


def mixture(weights, means, covs=None, *, std=None) -> GaussianMixture:
    """Validated mixture, weights normalised; covs [K, d, d] or isotropic std (scalar or [K])."""
    means = np.asarray(means, np.float64)
    if means.ndim != 2:
        raise ValueError(f"means must be [K, d], got shape {means.shape}")
    k, d = means.shape
    weights = np.asarray(weights, np.float64)
    if weights.shape != (k,) or not np.all(weights > 0) or not np.all(np.isfinite(weights)):
        raise ValueError(f"weights must be {k} positive finite numbers, got {weights}")
    if (covs is None) == (std is None):
        raise ValueError("give exactly one of covs and std")
    if covs is None:
        std = np.broadcast_to(np.asarray(std, np.float64), (k,))
        covs = std[:, None, None] ** 2 * np.eye(d)
    covs = np.asarray(covs, np.float64)
    if covs.shape != (k, d, d) or not np.allclose(covs, np.swapaxes(covs, -1, -2)):
        raise ValueError(f"covs must be symmetric [{k}, {d}, {d}], got shape {covs.shape}")
    if not np.all(np.linalg.eigvalsh(covs) > 0):
        raise ValueError("covs must be positive definite")
    return GaussianMixture(jnp.asarray(weights / weights.sum(), jnp.float32),
                           jnp.asarray(means, jnp.float32), jnp.asarray(covs, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Densities, scores, sampling


def _whiten(gmm: GaussianMixture, x: Array) -> tuple[Array, Array, Array]:
    """Returns log w_k N(x; mu_k, C_k) [..., K] and C_k^{-1} (mu_k - x) [..., K, d]."""
    chol = jnp.linalg.cholesky(gmm.covs)
    precision = jax.vmap(lambda c: jax.scipy.linalg.cho_solve((c, True), jnp.eye(gmm.dim)))(chol)
    diff = gmm.means - x[..., None, :]
    pulled = jnp.einsum("kde,...ke->...kd", precision, diff)
    maha = jnp.sum(diff * pulled, axis=-1)
    log_det = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)
    log_comp = jnp.log(gmm.weights) - 0.5 * (maha + log_det + gmm.dim * math.log(2 * math.pi))
    return log_comp, pulled, precision


@jax.jit
def component_log_probs(gmm: GaussianMixture, x: Array) -> Array:
    """log w_k + log N(x; mu_k, C_k), [..., K]."""
    return _whiten(gmm, x)[0]


@jax.jit
def log_prob(gmm: GaussianMixture, x: Array) -> Array:
    """log p(x), x [..., d] -> [...]."""
    return logsumexp(component_log_probs(gmm, x), axis=-1)


@jax.jit
def score(gmm: GaussianMixture, x: Array) -> Array:
    """grad log p(x) = sum_k r_k(x) C_k^{-1} (mu_k - x), r = responsibilities; [..., d]."""
    log_comp, pulled, _ = _whiten(gmm, x)
    r = jax.nn.softmax(log_comp, axis=-1)
    return jnp.einsum("...k,...kd->...d", r, pulled)


@functools.partial(jax.jit, static_argnames="n")
def sample(key: Array, gmm: GaussianMixture, n: int) -> Array:
    """n exact samples, [n, d]."""
    key_k, key_z = jax.random.split(key)
    k = jax.random.categorical(key_k, jnp.log(gmm.weights), shape=(n,))
    z = jax.random.normal(key_z, (n, gmm.dim))
    chol = jnp.linalg.cholesky(gmm.covs)
    return gmm.means[k] + jnp.einsum("nde,ne->nd", chol[k], z)


@jax.jit
def moments(gmm: GaussianMixture) -> tuple[Array, Array]:
    """Mean [d] and covariance [d, d] of the mixture."""
    mean = gmm.weights @ gmm.means
    centred = gmm.means - mean
    cov = (jnp.einsum("k,kde->de", gmm.weights, gmm.covs)
           + jnp.einsum("k,kd,ke->de", gmm.weights, centred, centred))
    return mean, cov


# ---------------------------------------------------------------------------------------------
# Diffusion marginals


def noised(gmm: GaussianMixture, alpha, sigma) -> GaussianMixture:
    """Law of alpha x0 + sigma eps: means alpha mu_k, covariances alpha^2 C_k + sigma^2 I."""
    eye = jnp.eye(gmm.dim, dtype=gmm.covs.dtype)
    return GaussianMixture(gmm.weights, alpha * gmm.means, alpha**2 * gmm.covs + sigma**2 * eye)


def _at(gmm: GaussianMixture, schedule: sde.Schedule, t) -> GaussianMixture:
    return noised(gmm, sde.alpha(schedule, t), sde.sigma(schedule, t))


def noised_score(gmm: GaussianMixture, schedule: sde.Schedule) -> sde.ScoreFn:
    """Exact score of the diffusion marginal: (x [..., d], t) -> grad log p_t(x), [..., d]."""
    return lambda x, t: score(_at(gmm, schedule, t), x)


def noised_log_prob(gmm: GaussianMixture,
                    schedule: sde.Schedule) -> Callable[[Array, Array], Array]:
    """Exact log-density of the diffusion marginal: (x [..., d], t) -> log p_t(x), [...]."""
    return lambda x, t: log_prob(_at(gmm, schedule, t), x)


def posterior_means(gmm: GaussianMixture, schedule: sde.Schedule,
                    x: Array, t) -> tuple[Array, Array]:
    """(E[x0 | x_t = x], E[eps | x_t = x]), each [..., d], by Gaussian conditioning per component.

    Given component k, (x0, x_t) is jointly Gaussian with Lambda_k = alpha^2 C_k + sigma^2 I:
        E[x0 | x_t, k]  = mu_k + alpha C_k Lambda_k^{-1} (x_t - alpha mu_k),
        E[eps | x_t, k] = sigma Lambda_k^{-1} (x_t - alpha mu_k),
    averaged with the responsibilities P(k | x_t) of the noised mixture.
    """
    al, si = sde.alpha(schedule, t), sde.sigma(schedule, t)
    log_comp, pulled, _ = _whiten(noised(gmm, al, si), x)    # pulled: Lambda_k^{-1} (alpha mu_k - x)
    r = jax.nn.softmax(log_comp, axis=-1)
    x0 = gmm.means - al * jnp.einsum("kde,...ke->...kd", gmm.covs, pulled)
    return jnp.einsum("...k,...kd->...d", r, x0), -si * jnp.einsum("...k,...kd->...d", r, pulled)


def noised_velocity(gmm: GaussianMixture, schedule: sde.Schedule) -> sde.ModelFn:
    """Exact flow velocity of the path: (x [..., d], t) -> E[alpha'_t x0 + sigma'_t eps | x_t = x],
    [..., d]; on `sde.LinearInterpolant` that is E[eps - x0 | x_t], what flow matching learns."""
    def velocity(x: Array, t: Array) -> Array:
        x0, eps = posterior_means(gmm, schedule, x, t)
        return sde.d_alpha(schedule, t) * x0 + sde.d_sigma(schedule, t) * eps

    return velocity


# ---------------------------------------------------------------------------------------------
# Products and tilts


def _bump(means: Array, covs: Array, center: Array, precision: Array):
    """N(x; mu, C) exp(-(x-c)^T A (x-c)/2) = exp(log_scale) N(x; mean', C') for each component.

    Returns (log_scale [K], means' [K, d], covs' [K, d, d]).
    """
    eye = jnp.eye(means.shape[-1], dtype=means.dtype)
    m = eye + covs @ precision                      # I + C A
    new_covs = jnp.linalg.solve(m, covs)            # (I + C A)^{-1} C = (C^{-1} + A)^{-1}
    new_covs = 0.5 * (new_covs + jnp.swapaxes(new_covs, -1, -2))
    diff = center - means
    new_means = means + jnp.einsum("kde,ef,kf->kd", new_covs, precision, diff)
    # A (I + C A)^{-1} = (I + A C)^{-1} A: solve with the transpose of (I + C A).
    pulled = jnp.linalg.solve(jnp.swapaxes(m, -1, -2), jnp.broadcast_to(precision, m.shape))
    quad = jnp.einsum("kd,kde,ke->k", diff, pulled, diff)
    log_scale = -0.5 * (jnp.linalg.slogdet(m)[1] + quad)
    return log_scale, new_means, new_covs


def _normalise(log_weights: Array, means: Array, covs: Array) -> tuple[GaussianMixture, Array]:
    log_z = logsumexp(log_weights)
    return GaussianMixture(jnp.exp(log_weights - log_z), means, covs), log_z


@jax.jit
def tilt(gmm: GaussianMixture, center, precision) -> tuple[GaussianMixture, Array]:
    """p(x) exp(r(x)) / Z for r(x) = -(x - c)^T A (x - c) / 2, A symmetric PSD [d, d].

    Returns (the tilted mixture, log Z = log E_p[exp r(X)]). A reward r/alpha: pass A / alpha.
    """
    center = jnp.asarray(center, gmm.means.dtype)
    precision = jnp.asarray(precision, gmm.means.dtype)
    log_scale, means, covs = _bump(gmm.means, gmm.covs, center, precision)
    return _normalise(jnp.log(gmm.weights) + log_scale, means, covs)


@jax.jit
def product(a: GaussianMixture, b: GaussianMixture) -> tuple[GaussianMixture, Array]:
    """p_a(x) p_b(x) / Z: a mixture over pairs (i, j) (index i * K_b + j); log Z = log int p_a p_b.

    Each N(x; m_j, C_j) of b is a bump with A = C_j^{-1}, c = m_j, times (2 pi)^{-d/2} |C_j|^{-1/2}.
    """
    d = a.dim

    def with_component(weight, mean, cov):
        log_scale, means, covs = _bump(a.means, a.covs, mean, jnp.linalg.inv(cov))
        log_norm = -0.5 * (jnp.linalg.slogdet(cov)[1] + d * math.log(2 * math.pi))
        return jnp.log(a.weights) + jnp.log(weight) + log_norm + log_scale, means, covs

    log_w, means, covs = jax.vmap(with_component, out_axes=1)(b.weights, b.means, b.covs)
    return _normalise(log_w.reshape(-1), means.reshape(-1, d), covs.reshape(-1, d, d))


# ---------------------------------------------------------------------------------------------
# Powers p^beta


@jax.jit
def anneal_separated(gmm: GaussianMixture, beta: float) -> GaussianMixture:
    """Well-separated approximation of p^beta / Z: components N(mu_k, C_k / beta), weights
    proportional to w_k^beta |C_k|^{(1 - beta) / 2} (the mass of (w_k N_k)^beta). Exact as the modes
    separate; use `anneal_grid` when they overlap."""
    log_det = jnp.linalg.slogdet(gmm.covs)[1]
    log_w = beta * jnp.log(gmm.weights) + 0.5 * (1.0 - beta) * log_det
    return _normalise(log_w, gmm.means, gmm.covs / beta)[0]


class Grid(NamedTuple):
    """A density on a regular grid: points [M, d], probabilities [M] (cell masses, summing to 1),
    and log_normaliser = log of the Riemann sum of the unnormalised density."""

    points: Array
    probs: Array
    log_normaliser: Array


def on_grid(log_density: Callable[[Array], Array], low, high, num: int = 400) -> Grid:
    """Midpoint-rule discretisation of exp(log_density) on the square [low, high]^2.

    log_density: x [M, 2] -> [M]. Accurate when the density is negligible outside the square.
    """
    edges = np.linspace(low, high, num + 1)
    centres = 0.5 * (edges[1:] + edges[:-1])
    cell = (edges[1] - edges[0]) ** 2
    points = jnp.asarray(np.stack(np.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2),
                         jnp.float32)
    values = jax.jit(log_density)(points)
    log_z = logsumexp(values)
    return Grid(points, jnp.exp(values - log_z), log_z + math.log(cell))


def anneal_grid(gmm: GaussianMixture, beta: float, low, high, num: int = 400) -> Grid:
    """p^beta / Z on a 2-D grid (exact up to the midpoint rule)."""
    return on_grid(lambda x: beta * log_prob(gmm, x), low, high, num)


# ---------------------------------------------------------------------------------------------
# Summaries of (weighted) samples


@jax.jit
def weighted_moments(x: Array, weights: Array | None = None) -> tuple[Array, Array]:
    """Mean [d] and covariance [d, d] of points x [N, d] under weights [N] (uniform if None)."""
    w = jnp.full(x.shape[0], 1.0 / x.shape[0]) if weights is None else weights / jnp.sum(weights)
    mean = w @ x
    centred = x - mean
    return mean, jnp.einsum("n,nd,ne->de", w, centred, centred)


@jax.jit
def nearest_mode(gmm: GaussianMixture, x: Array) -> Array:
    """Index of the closest component mean (Euclidean), int32 [...]."""
    dist = jnp.sum((x[..., None, :] - gmm.means) ** 2, axis=-1)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


@jax.jit
def mode_weights(gmm: GaussianMixture, x: Array, weights: Array | None = None) -> Array:
    """Mass of (weighted) points x [N, d] nearest to each mode, [K] summing to 1."""
    w = jnp.full(x.shape[0], 1.0 / x.shape[0]) if weights is None else weights / jnp.sum(weights)
    return jax.ops.segment_sum(w, nearest_mode(gmm, x), num_segments=gmm.num_components)


# ---------------------------------------------------------------------------------------------
# The FKC paper's toys


def four_modes(weights=None) -> GaussianMixture:
    """FKC's 4-mode toy: means (+-1.5, +-1.5), std 0.4, equal weights unless given (order
    (-,-), (-,+), (+,-), (+,+))."""
    means = np.array([[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]])
    return mixture(np.ones(4) if weights is None else weights, means, std=0.4)


def forty_modes(seed: int = 0) -> GaussianMixture:
    """The 40-mode toy of FKC's annealing experiment (inherited from FAB / iDEM): 40 equally
    weighted modes, means uniform in [-40, 40]^2, per-coordinate std softplus(1) = 1.3133.

    The published means come from torch.manual_seed(0); ours from NumPy's generator with `seed`, so
    the layout differs but its law is the same. (The published code also divides the data by 50
    before training its score model; scale it yourself if you need that.)
    """
    rng = np.random.default_rng(seed)
    means = rng.uniform(-40.0, 40.0, size=(40, 2))
    return mixture(np.ones(40), means, std=math.log1p(math.e))
