"""Feynman-Kac Correctors (Skreta et al. 2025): anneal, guide and compose score models with SMC.

Target at each time: p_t ~ prod_k (q_t^k)^{beta_k}, with the experts' scores s_k = grad log q_t^k,
S = sum_k beta_k s_k and B = sum_k beta_k. One reverse-time Euler-Maruyama step of size dtau is

    x' = x + [-f + (1 + c)/2 g^2 S] dtau + sqrt(c) g sqrt(dtau) xi                  (proposal)
    dlogw = dtau [ (B - 1) div f + g^2/2 ( ||S||^2 - sum_k beta_k ||s_k||^2 ) ]     (weight)

for any noise scale c > 0: c = 1 is docs/algorithms.md section 2, c = 1/beta the "tempered-noise"
annealing, and the drift's (1 + c)/2 is what keeps the weight the same for every c. The weight is
evaluated at the step's starting point with the scores its drift uses (one call of each expert per
step). Particles start from the prior N(0, sigma_{t_0}^2 I) raised to B, N(0, sigma_{t_0}^2 / B I),
with uniform weights: exact up to alpha_{t_0} (about 0.007 for VP at t = 1).

`anneal` (q^beta), `cfg` (q_u^{1-w} q_c^w: B = 1, no divergence term) and `product`
(prod_k q_k^{beta_k}) are this one rule with particular exponents.

Non-finite values: a particle whose scores or new position are not finite gets a NaN increment,
which the engine counts in `SMCResult.nonfinite_increments` (log Z_hat then becomes NaN).

Resampling is the engine's: pass `resampling` and `ess_threshold` to `smc.run` (the published code
resamples at every step, ess_threshold=1.0). `resample_window` allows resampling only in a leading
fraction of the reverse steps (the model's `resample_mask`), as the published image code does.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import smc
from proposals import sde as sde_proposals
from smc.validation import check_fraction, static_finite, static_int, static_positive
from targets.diffusion import sde

Array = jax.Array


def drift(f: Array, g2, scores: Array, betas: Array, noise_scale=1.0) -> Array:
    """-f + (1 + c)/2 g^2 sum_k beta_k s_k, [N, d]. f [N, d]; scores [K, N, d]; betas [K]."""
    combined = jnp.einsum("k,knd->nd", betas, scores)
    return -f + 0.5 * (1.0 + noise_scale) * g2 * combined


def log_weight_increment(scores: Array, betas: Array, div_f, g2, dtau) -> Array:
    """dtau [ (sum beta - 1) div f + g^2/2 (||sum_k beta_k s_k||^2 - sum_k beta_k ||s_k||^2) ], [N].

    scores [K, N, d]; betas [K].
    """
    combined = jnp.einsum("k,knd->nd", betas, scores)
    spread = jnp.sum(combined**2, axis=-1) - jnp.einsum("k,kn->n", betas, jnp.sum(scores**2, -1))
    return dtau * ((jnp.sum(betas) - 1.0) * div_f + 0.5 * g2 * spread)


def clip_centred(log_increments: Array, bound: float) -> Array:
    """clip(dlogw - mean(dlogw), -bound, bound): the published image code's stabiliser. BIASED."""
    return jnp.clip(log_increments - jnp.nanmean(log_increments), -bound, bound)


def correctors(scores: Sequence[sde.ScoreFn], betas: Sequence[float], *, schedule: sde.Schedule,
               times, dim: int, noise_scale: float = 1.0,
               clip: float | None = None,
               resample_window: float | None = None) -> smc.FeynmanKac:
    """The general FKC model for prod_k (q_t^k)^{beta_k}, over particles [N, dim].

    scores: callables score(x [N, d], t scalar) -> [N, d], one per expert; betas: their exponents
    (static floats, any sign, with sum > 0); times: a strictly decreasing grid t_0 > ... > t_T > 0
    (`sde.time_grid`); noise_scale: c above. clip: if set, centred increments are clipped to
    [-clip, clip] (the published image code uses 1.0). This changes the target (biased), and the
    centring drops the mean increment, so log Z_hat is meaningless; off by default.
    resample_window: if set, resampling is allowed only in that leading fraction of the reverse
    steps (published: 0.6); weights still accumulate afterwards, so the target is unchanged.
    """
    betas = _check_exponents(scores, betas)
    if float(betas.sum()) <= 0:
        raise ValueError(f"the exponents must have a positive sum (the initial law is the prior "
                         f"to that power), got {float(betas.sum())}")
    noise_scale = static_positive("noise_scale", noise_scale)
    if clip is not None:
        clip = static_positive("clip", clip)
    dim = static_int("dim", dim, 1)
    times = sde.check_time_grid(times, schedule)
    mask = None
    if resample_window is not None:
        window = check_fraction("resample_window", resample_window)
        if window == 0.0:
            raise ValueError("resample_window must lie in (0, 1], got 0.0")
        steps = len(times) - 1
        mask = np.arange(steps) < int(np.ceil(window * steps))
    for score in scores:
        _check_score(score, jax.ShapeDtypeStruct((2, dim), jnp.float32))

    dtaus = jnp.asarray(times[:-1] - times[1:], jnp.float32)
    ts = jnp.asarray(times[:-1], jnp.float32)
    betas_j = jnp.asarray(betas, jnp.float32)
    init_std = float(np.sqrt(schedule.sigma2(times[0]) / betas.sum()))

    def init(key: Array, num_particles: int):
        x = init_std * jax.random.normal(key, (num_particles, dim), jnp.float32)
        return x, jnp.zeros(num_particles, jnp.float32)

    def step(key: Array, x: Array, k: Array):
        t, dtau = ts[k], dtaus[k]
        values = jnp.stack([_check_score(score, x, t) for score in scores])
        g2 = sde.g2(schedule, t)
        mean_drift = drift(sde.f(schedule, x, t), g2, values, betas_j, noise_scale)
        diffusion = jnp.sqrt(noise_scale * g2)
        x_new, _ = sde_proposals.euler_maruyama(key, x, mean_drift, diffusion, dtau)
        increments = log_weight_increment(values, betas_j, sde.div_f(schedule, t, dim), g2, dtau)
        # A non-finite score makes x_new and the increment (inf - inf in spread) non-finite too,
        # so checking those two flags every bad particle without another pass over the scores.
        finite = jnp.isfinite(increments) & jnp.all(jnp.isfinite(x_new), axis=1)
        increments = jnp.where(finite, increments, jnp.nan)
        if clip is not None:
            increments = clip_centred(increments, clip)
        return x_new, increments

    return smc.FeynmanKac(init=init, step=step, num_steps=len(times) - 1, resample_mask=mask)


def anneal(score: sde.ScoreFn, beta: float, *, schedule: sde.Schedule, times, dim: int,
           tempered_noise: bool = False, clip: float | None = None,
           resample_window: float | None = None) -> smc.FeynmanKac:
    """q^beta: dlogw = dtau [(beta - 1) div f + beta (beta - 1)/2 g^2 ||s||^2], from N(0, I / beta)
    (VP).

    tempered_noise: drift -f + (beta + 1)/2 g^2 s, diffusion g / sqrt(beta), same weight. Exact in
    continuous time, but for beta >= 3 (VP) the target is an unstable fixed point of the weighted
    law: discretisation errors grow instead of fading, and on a Gaussian with covariance
    diag(0.25, 0.5) at beta = 3 the N -> infinity limit of the discretised chain is about half the
    exact variance for any number of steps (200 to 25600). The default (c = 1) is stable.
    """
    beta = static_positive("beta", beta)
    return correctors([score], [beta], schedule=schedule, times=times, dim=dim,
                      noise_scale=1.0 / beta if tempered_noise else 1.0, clip=clip,
                      resample_window=resample_window)


def cfg(score_uncond: sde.ScoreFn, score_cond: sde.ScoreFn, w: float, *, schedule: sde.Schedule,
        times, dim: int, clip: float | None = None,
        resample_window: float | None = None) -> smc.FeynmanKac:
    """Classifier-free guidance as the geometric average q_u^{1-w} q_c^w (any real w):
    dlogw = dtau w (w - 1)/2 g^2 ||s_c - s_u||^2 (the exponents sum to 1: no divergence term)."""
    w = static_finite("w", w)
    return correctors([score_uncond, score_cond], [1.0 - w, w], schedule=schedule, times=times,
                      dim=dim, clip=clip, resample_window=resample_window)


def product(scores: Sequence[sde.ScoreFn], betas: Sequence[float] | None = None, *,
            schedule: sde.Schedule, times, dim: int,
            clip: float | None = None,
            resample_window: float | None = None) -> smc.FeynmanKac:
    """Product of experts prod_k q_k^{beta_k} (betas default to 1; all > 0); starts at
    N(0, I / sum beta) (VP). Two experts, beta = 1: dlogw = dtau [div f + g^2 <s_1, s_2>]."""
    scores = list(scores)
    betas = [1.0] * len(scores) if betas is None else list(betas)
    for beta in betas:
        static_positive("beta", beta)
    return correctors(scores, betas, schedule=schedule, times=times, dim=dim, clip=clip,
                      resample_window=resample_window)


# ---------------------------------------------------------------------------------------------
# Validation


def _check_exponents(scores, betas) -> np.ndarray:
    scores, betas = list(scores), list(betas)
    if not scores:
        raise ValueError("the expert list is empty: give at least one score")
    if len(scores) != len(betas):
        raise ValueError(f"{len(scores)} scores but {len(betas)} exponents")
    for score in scores:
        if not callable(score):
            raise TypeError(f"a score must be a callable (x [N, d], t) -> [N, d], got {score!r}")
    return np.array([static_finite("beta", beta) for beta in betas], np.float64)


def _check_score(score: sde.ScoreFn, x, t=None):
    """score(x, t), abstractly when x is a ShapeDtypeStruct; checks that it has x's shape."""
    if isinstance(x, jax.ShapeDtypeStruct):
        out = jax.eval_shape(score, x, jax.ShapeDtypeStruct((), jnp.float32))
    else:
        out = score(x, t)
    return sde.check_output("score", out, x)
