"""Weight utilities, all in log space. Shapes: log_weights [..., N]: leading axes are batches
(e.g. runs vmapped over keys), each normalised on its own."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

Array = jax.Array


def normalize(log_weights: Array) -> Array:
    """W = softmax(logw) over the last axis, [..., N]. All -inf gives zeros rather than NaN."""
    total = logsumexp(log_weights, axis=-1, keepdims=True)
    safe = jnp.where(jnp.isneginf(total), 0.0, total)
    return jnp.where(jnp.isneginf(total), 0.0, jnp.exp(log_weights - safe))


def log_normalize(log_weights: Array) -> Array:
    """log W = logw - logsumexp(logw) over the last axis, [..., N]."""
    return log_weights - logsumexp(log_weights, axis=-1, keepdims=True)


def log_mean_exp(log_values: Array, axis: int | None = None) -> Array:
    """log mean exp(x) = logsumexp(x) - log n, computed stably."""
    n = log_values.size if axis is None else log_values.shape[axis]
    return logsumexp(log_values, axis=axis) - jnp.log(n)


def ess(log_weights: Array) -> Array:
    """Effective sample size 1 / sum W^2 in [1, N], [...]; 0 when every weight is zero."""
    return ess_given_total(log_weights, logsumexp(log_weights, axis=-1))


def ess_given_total(log_weights: Array, log_total: Array) -> Array:
    """ESS = exp(2 logsumexp(logw) - logsumexp(2 logw)) from a known log_total = logsumexp(logw),
    [...] (one pass over the weights where a caller already has the total)."""
    log_w = log_weights - log_total[..., None]
    value = jnp.exp(-logsumexp(2.0 * log_w, axis=-1))
    return jnp.where(jnp.isneginf(log_total), 0.0, value)


def conditional_ess(log_weights: Array, log_increments: Array, *, normalized: bool = False
                    ) -> Array:
    """Conditional ESS of increments g on weighted particles W: N (sum W g)^2 / sum W g^2, in [1, N].

    Zhou, Johansen and Aston (2016); equals ESS(g) when W is uniform. Used to pick the next
    tempering exponent on the *current* weighted cloud. `normalized`: log_weights are already
    log W (saves the normalisation inside a bisection).
    """
    n = log_weights.shape[0]
    log_w = log_weights if normalized else log_normalize(log_weights)
    numerator = 2.0 * logsumexp(log_w + log_increments)
    denominator = logsumexp(log_w + 2.0 * log_increments)
    return n * jnp.exp(numerator - denominator)
