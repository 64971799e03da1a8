"""The DAS toys (Kim et al. 2025): Gaussian mixtures tilted by a Gaussian-shaped reward, exactly.

Target p(x) exp(r(x) / alpha) with r(x) = r_max - (x - c)^T A (x - c) / 2: a mixture times a
Gaussian bump is a mixture (`gmm.tilt` with precision A / alpha), so the tilted target, its
normaliser log Z = log E_p[exp(r(X) / alpha)] and its mean reward are closed forms.

- `grid`: 9 equal modes at {-4, 0, 4}^2, covariance 0.3 I, r(x) = -x1^2/100 - x2^2.
- `ring`: 8 equal modes on the circle of radius 4 (angles 2 pi k / 8), covariance 0.3 I (the grid's;
  with it the exact mean reward at alpha = 1 is the -1.34 that DAS reports for the target),
  r(x) = -x1^2 - (x2 - 1)^2 / 10.
At alpha = 1 the exact mean rewards are -0.291 (grid) and -1.340 (ring): DAS's -0.29 and -1.34.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from targets.toy import gmm

Array = jax.Array
MODE_VARIANCE = 0.3


class QuadraticReward(NamedTuple):
    """r(x) = offset - (x - center)^T precision (x - center) / 2; center [d], precision [d, d]."""

    center: Array
    precision: Array
    offset: float = 0.0

    def __call__(self, x: Array) -> Array:
        """r(x) for x [N, d] -> [N]."""
        diff = x - self.center
        return self.offset - 0.5 * jnp.einsum("nd,de,ne->n", diff, self.precision, diff)


class TiltedToy(NamedTuple):
    """prior p (mixture); reward r (x [N, d] -> [N]); alpha; target = p exp(r / alpha) / Z
    (mixture); log_z = log E_p[exp(r / alpha)]; mean_reward = E_target[r]."""

    prior: gmm.GaussianMixture
    reward: Callable[[Array], Array]
    alpha: float
    target: gmm.GaussianMixture
    log_z: float
    mean_reward: float


def expected_reward(mix: gmm.GaussianMixture, reward: QuadraticReward) -> float:
    """E_mix[r] = offset - sum_k w_k [tr(A C_k) + (m_k - c)^T A (m_k - c)] / 2, exactly."""
    weights, means, covs = (np.asarray(a, np.float64) for a in mix)
    center, precision = np.asarray(reward.center, np.float64), np.asarray(reward.precision)
    diff = means - center
    quad = (np.einsum("kd,de,ke->k", diff, precision, diff)
            + np.einsum("de,ked->k", precision, covs))
    return float(reward.offset - 0.5 * weights @ quad)


def tilted(prior: gmm.GaussianMixture, reward: QuadraticReward, alpha: float = 1.0) -> TiltedToy:
    """The exact tilted toy p(x) exp(r(x) / alpha) / Z for a quadratic reward."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be finite and > 0, got {alpha}")
    target, log_z = gmm.tilt(prior, reward.center, jnp.asarray(reward.precision) / alpha)
    return TiltedToy(prior=prior, reward=reward, alpha=alpha, target=target,
                     log_z=float(log_z) + reward.offset / alpha,
                     mean_reward=expected_reward(target, reward))


def grid(alpha: float = 1.0) -> TiltedToy:
    """9 modes at {-4, 0, 4}^2, cov 0.3 I; r(x) = -x1^2/100 - x2^2."""
    means = np.array([[a, b] for a in (-4.0, 0.0, 4.0) for b in (-4.0, 0.0, 4.0)])
    prior = gmm.mixture(np.ones(9), means, std=math.sqrt(MODE_VARIANCE))
    reward = QuadraticReward(jnp.zeros(2), jnp.diag(jnp.array([2.0 / 100.0, 2.0])))
    return tilted(prior, reward, alpha)


def ring(alpha: float = 1.0) -> TiltedToy:
    """8 modes on the circle of radius 4, cov 0.3 I; r(x) = -x1^2 - (x2 - 1)^2/10."""
    angles = 2.0 * np.pi * np.arange(8) / 8
    means = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    prior = gmm.mixture(np.ones(8), means, std=math.sqrt(MODE_VARIANCE))
    reward = QuadraticReward(jnp.array([0.0, 1.0]), jnp.diag(jnp.array([2.0, 2.0 / 10.0])))
    return tilted(prior, reward, alpha)


TOYS: dict[str, Callable[[float], TiltedToy]] = {"grid": grid, "ring": ring}
