"""Sample-quality metrics for weighted image samples: weighted means, diversity, Frechet distance.

Every metric takes normalised weights W [N] (sum 1; uniform for an unweighted sample), so that an
SMC run's weighted particles and a plain sample are scored by the same self-normalised estimator;
with uniform weights each reduces to the usual unweighted one (sample covariance with ddof = 1,
mean over distinct pairs).
"""
from __future__ import annotations

import numpy as np


def check_weights(weights, n: int) -> np.ndarray:
    """float64 [n], finite, >= 0, sum 1 (within 1e-6); a clear error otherwise."""
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError("weights must be finite, >= 0 and sum to 1")
    return w


def uniform(n: int) -> np.ndarray:
    return np.full(n, 1.0 / n)


def ess(weights) -> float:
    """1 / sum W^2 (N for uniform weights)."""
    w = np.asarray(weights, np.float64)
    return float(1.0 / np.sum(w**2))


def weighted_mean(values, weights) -> float:
    """sum_i W_i v_i for values [N]."""
    values = np.asarray(values, np.float64)
    return float(check_weights(weights, values.shape[0]) @ values)


def weighted_moments(features, weights) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and covariance [F, F] of features [N, F] under weights W:

    mu = sum W f,  C = sum W (f - mu)(f - mu)^T / (1 - sum W^2)  (unbiased; ddof=1 when uniform).
    """
    f = np.asarray(features, np.float64)
    w = check_weights(weights, f.shape[0])
    mu = w @ f
    centred = f - mu
    denom = 1.0 - np.sum(w**2)
    if denom <= 0:
        raise ValueError("the covariance needs at least two particles with positive weight")
    return mu, (centred * w[:, None]).T @ centred / denom


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^{1/2} C2 C1^{1/2})^{1/2}): the squared 2-Wasserstein
    distance between N(mu1, C1) and N(mu2, C2). Symmetric square roots only (eigh), no sqrtm."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    root1 = _psd_sqrt(cov1)
    cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ cov2 @ root1), 0.0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(0.5 * (cov + cov.T))
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def weighted_frechet(features, weights, reference) -> float:
    """Frechet distance between weighted features [N, F] and an unweighted reference [M, F]."""
    mu1, cov1 = weighted_moments(features, weights)
    reference = np.asarray(reference, np.float64)
    mu2, cov2 = weighted_moments(reference, uniform(reference.shape[0]))
    return frechet_distance(mu1, cov1, mu2, cov2)


def mean_pairwise_distance(x, weights) -> float:
    """sum_{i != j} W_i W_j ||x_i - x_j|| / sum_{i != j} W_i W_j for x [N, d] (diversity)."""
    x = np.asarray(x, np.float64)
    w = check_weights(weights, x.shape[0])
    sq = np.sum(x**2, axis=1)
    dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0, None))
    pair = np.outer(w, w)
    np.fill_diagonal(pair, 0.0)
    total = pair.sum()
    if total <= 0:
        return 0.0  # one particle carries all the weight: no diversity
    return float(np.sum(pair * dist) / total)
