"""DriftLite (Ren et al. 2025): a control drift chosen from the particles, paid for in the weight.

docs/algorithms.md section 10 ("DriftLite"; our derivation, following the paper's idea). In
reverse time tau (the grid t_0 > t_1 > ..., dtau = t_k - t_{k+1}) a weighted SDE
dx = u dtau + g dW with log-weight rate G has the weighted law pi_tau when

    d/dtau pi = -div(pi u) + g^2/2 Lap pi + pi (G - E_pi G).

Adding a drift b to u and the Stein term A_pi b = div b + b . grad log pi to G leaves this
unchanged (div(pi b) = pi A_pi b, and E_pi[A_pi b] = 0): ANY b keeps the target. DriftLite takes
b = sum_k theta_k phi_k in the span of K fields phi_k and chooses theta at each step from the
current weighted particles (W, the engine's weights: a `weighted_step` model):

    "vcg": theta minimises Var_W(G0 + theta . A phi):   C theta = -c,
           C_jk = Cov_W(A phi_j, A phi_k), c_j = Cov_W(A phi_j, G0);
    "ecg": theta is the L2(pi) projection onto the span of the least-energy exact control
           grad v, div(pi grad v) = -pi (G0 - E G0); for phi_j = grad h_j (scalar potentials):
           sum_k E_W[phi_j . phi_k] theta_k = Cov_W(h_j, G0);
    an array [K]: that theta at every step (any theta is exact; a bad one only adds variance).

Both solves carry a ridge, `ridge` times the mean diagonal, so they never fail; a basis that
vanishes (all of C zero) gives theta = 0.

Base cases (u, G0, grad log pi):
- `reward`: pi_tau ~ p_t exp(h), h = lambda_k r(x0_hat(x, t)) / alpha (the twist of
  reward.reward_smc), u = -f + g^2 s, grad log pi = s + grad h and

      G0 = d_tau h - f . grad h - g^2/2 (Lap h + ||grad h||^2),

  d_tau h at fixed x (lambda's change and t's, through x0_hat and the score). After the last step
  the weight gets r(x_T) / alpha - h(x_T, t_T): the target is exactly p(x_T) exp(r(x_T) / alpha).
  Default basis phi_1 = g^2 grad h (the reward-guidance direction, potential g^2 h).
- `correctors`: FKC's u and G0 (fkc.drift, fkc.log_weight_increment, noise scale 1),
  grad log pi = sum_k beta_k s_k; default basis phi_k = g^2 s_k (potentials g^2 log q_k, given
  as `log_densities`, for "ecg").

Euler in time, left point: x_{k+1} = x_k + (u + b) dtau + g sqrt(dtau) xi. Two weights:
- "rate" (`weights="rate"`; `correctors` always): dlogw = dtau (G0 + theta . A phi)(x_k), as
  FKC: exact as dtau -> 0, O(dtau) bias on a grid. It assumes that s is the score of the marginal
  (G0 and A_pi use s = grad log p_t): with a learned score it is exact for the score's own
  marginals only in the limit where s is exact.
- "transition" (`reward`'s default): the drift b is a guidance shift of reward.reward_smc's
  proposal and the weight is its exact ratio, log p(x'|x) - log q_b(x'|x) + h(x', t_{k+1}) -
  h(x, t_k): the target is the discretised chain's tilt p_theta(x_T) exp(r(x_T) / alpha) on any
  grid, with any score, for any b chosen before the move. theta comes from the same rules
  (the rate's values at x_k only choose it).

Divergences (Lap h, div phi) are Jacobian traces: "exact" by forward mode (d tangents, for small
d) or "hutchinson" with `probes` Rademacher vectors per step. Hutchinson makes the increment's
rate unbiased, not the weight: E exp(dtau (G + noise)) = exp(dtau G) (1 + dtau^2 Var/2 + ...),
an x-dependent bias of O(dtau^2) per step, O(dtau) over a run (Euler's own order), larger where
the probes are noisier. The noisy values also enter the choice of theta.

Cost (`reward_cost`, `correctors_cost`, per particle): `reward` with rate weights: T steps, each
one forward score evaluation at (x_k, t_k) with one vector-Jacobian product (grad of r(x0_hat(x)))
and forward-mode tangents of that gradient (each about a forward and a backward pass): d + 1
("exact": d for Lap h, one for d_tau h) or `probes` ("hutchinson": each probe's tangent also moves
t, which gives d_tau h exactly); plus one plain forward evaluation at t_T (terminal potential) and
one at t_0 when lambda_0 > 0 (initial weight). `correctors`: T forward evaluations per expert, each
with d ("exact") or `probes` tangents. A user basis adds its own. With transition weights,
reward_smc's own guided pass (a forward evaluation and its gradient at each of t_0 .. t_{T-1})
comes on top of the rate's evaluation that chooses theta (none for a fixed theta).

Particles (`DriftParticles`, rate weights) are x and the last theta: every value a step needs is
computed from x_k at its start, so nothing cached can go stale through resampling (with
transition weights they are reward_smc's `RewardParticles`). Non-finite values: a
particle whose score, reward, derivatives or new position is not finite gets a NaN increment,
which the engine counts in `SMCResult.nonfinite_increments`; such particles are left out of the
choice of theta.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import smc
from proposals import sde as sde_proposals
from smc.validation import static_finite, static_int, static_positive
from targets.diffusion import fkc, sde
from targets.diffusion import reward as reward_lib

Array = jax.Array
BasisFn = Callable[[Array, Array], Array]
LogDensityFn = Callable[[Array, Array], Array]

CONTROLS = ("vcg", "ecg")
DIVERGENCES = ("exact", "hutchinson")
WEIGHTS = ("transition", "rate")


class DriftParticles(NamedTuple):
    """x [N, d] at the current time; theta [N, K]: the coefficients of the step that led here
    (the same in every row; zeros after init). Nothing else is carried: every value a step
    needs is computed from x at its start, so resampling cannot pair x with stale values."""

    x: Array
    theta: Array


class Local(NamedTuple):
    """What the weight and the control need at (x_k, t_k): drift [N, d] = u; rate [N] = G0;
    basis [N, K, d] = phi; basis_rate [N, K] = A_pi phi; potential [N, K] = h_j with phi_j =
    grad h_j (zeros when there are none)."""

    drift: Array
    rate: Array
    basis: Array
    basis_rate: Array
    potential: Array


class Cost(NamedTuple):
    """Network passes per particle of one run: forward score evaluations, vector-Jacobian
    products and forward-mode tangents (of the score, or of the reward gradient for `reward`)."""

    forward: int
    gradient: int
    tangents: int


# ---------------------------------------------------------------------------------------------
# The pieces: Stein term, rates, coefficients


def stein(div_basis: Array, basis: Array, grad_log_target: Array) -> Array:
    """A_pi phi = div phi + phi . grad log pi, [N, K]: the weight rate that pays for the drift phi.

    div_basis [N, K]; basis [N, K, d]; grad_log_target [N, d].
    """
    return div_basis + jnp.einsum("nkd,nd->nk", basis, grad_log_target)


def tilt_rate(dtau_h: Array, f: Array, grad_h: Array, lap_h: Array, g2) -> Array:
    """G0 = d_tau h - f . grad h - g^2/2 (Lap h + ||grad h||^2), [N]: the rate that keeps
    p_t exp(h) the weighted law of the base reverse SDE (drift -f + g^2 s)."""
    return (dtau_h - jnp.sum(f * grad_h, -1)
            - 0.5 * g2 * (lap_h + jnp.sum(grad_h**2, -1)))


def weighted_covariance(a: Array, b: Array, weights: Array) -> Array:
    """Cov_W(a_j, b_k), [J, K], for a [N, J], b [N, K] and normalised weights [N]."""
    a = a - weights @ a
    b = b - weights @ b
    return jnp.einsum("n,nj,nk->jk", weights, a, b)


def ridge_solve(matrix: Array, rhs: Array, ridge: float) -> Array:
    """(M + ridge * mean(diag M) I)^{-1} rhs, [K]; zeros where M has no positive diagonal (a
    basis that vanishes on the cloud, e.g. lambda = 0) or the solve is not finite."""
    k = matrix.shape[0]
    scale = jnp.trace(matrix) / k
    usable = jnp.isfinite(scale) & (scale > 0)
    shift = ridge * jnp.where(usable, scale, 1.0)
    theta = jnp.linalg.solve(matrix + shift * jnp.eye(k, dtype=matrix.dtype), rhs)
    return jnp.where(usable & jnp.all(jnp.isfinite(theta)), theta, 0.0)


def vcg_coefficients(rate: Array, basis_rate: Array, weights: Array,
                     ridge: float = 1e-6) -> Array:
    """theta [K] minimising Var_W(rate + basis_rate @ theta): Cov_W(A phi) theta = -Cov_W(A phi,
    G0). rate [N]; basis_rate [N, K]; weights [N] normalised."""
    c = weighted_covariance(basis_rate, basis_rate, weights)
    rhs = -weighted_covariance(basis_rate, rate[:, None], weights)[:, 0]
    return ridge_solve(c, rhs, ridge)


def ecg_coefficients(rate: Array, basis: Array, potential: Array, weights: Array,
                     ridge: float = 1e-6) -> Array:
    """theta [K]: sum_k E_W[phi_j . phi_k] theta_k = Cov_W(h_j, G0), the L2(pi) projection of the
    least-energy exact control (docs/algorithms.md section 10). basis [N, K, d]; potential [N, K]
    with phi_j = grad h_j; weights [N] normalised."""
    gram = jnp.einsum("n,njd,nkd->jk", weights, basis, basis)
    rhs = weighted_covariance(potential, rate[:, None], weights)[:, 0]
    return ridge_solve(gram, rhs, ridge)


def coefficients(control: str, local: Local, ok: Array, log_weights: Array,
                 ridge: float = 1e-6) -> Array:
    """theta [K] by `control` ("vcg" or "ecg") from the weighted cloud: the engine's
    log_weights [N] over the rows that are `ok` [N] and not NaN (the others are left out)."""
    ok = ok & ~jnp.isnan(log_weights)
    w = smc.weights.normalize(jnp.where(ok, log_weights, -jnp.inf))
    clean = lambda a: jnp.where(ok.reshape((-1,) + (1,) * (a.ndim - 1)), a, 0.0)
    if control == "vcg":
        return vcg_coefficients(clean(local.rate), clean(local.basis_rate), w, ridge)
    return ecg_coefficients(clean(local.rate), clean(local.basis), clean(local.potential), w,
                            ridge)


def trace_estimate(tangents: Array, jvps: Array, scale: float) -> Array:
    """sum_p v_p . (J v_p) / scale, [N, ...]: the trace of J from one-hot tangents (scale 1) or
    Rademacher probes (scale = number of probes). tangents [P, N, d]; jvps [P, N, ..., d]."""
    return jnp.einsum("pnd,pn...d->n...", tangents, jvps) / scale


# ---------------------------------------------------------------------------------------------
# Models


def reward(score: sde.ScoreFn, reward: reward_lib.RewardFn, *, alpha: float,
           schedule: sde.Schedule, times, dim: int, exponents="das", gamma: float = 0.008,
           control="vcg", weights: str = "transition", basis: BasisFn | None = None,
           basis_potentials: BasisFn | None = None, ridge: float = 1e-6,
           divergence: str = "exact", probes: int = 1) -> smc.FeynmanKac:
    """DriftLite for p(x0) exp(r(x0) / alpha) over particles [N, dim] (module doc).

    score(x [N, d], t) -> [N, d]; reward(x0 [N, d]) -> [N]; alpha > 0; schedule and times as
    reward.reward_smc (Euler-Maruyama only: the control is a drift). exponents: "das" (with
    gamma), "constant" or an array [T + 1] rising to 1 (lambda_k of h). control: "vcg", "ecg" or
    theta [K]. weights: "transition" (the proposal ratio of the discretised chain: exact on any
    grid and with any score, reward.reward_smc with this control as its guidance rule) or "rate"
    (the Fokker-Planck rate: exact as dtau -> 0 with an exact score). basis(x, t) -> [N, K, d]:
    fields replacing the default g^2 grad h (their divergence by the same rule as Lap h);
    basis_potentials(x, t) -> [N, K]: scalars whose gradients they are (needed for "ecg" with a
    user basis). divergence: "exact" or "hutchinson" (with `probes`).
    """
    alpha = reward_lib.check_alpha(alpha)
    dim = static_int("dim", dim, 1)
    times = sde.check_time_grid(times, schedule)
    num_steps = len(times) - 1
    lambdas = reward_lib.check_exponents(exponents, gamma, num_steps)
    reward_lib.check_callables(score, reward, dim)
    divergence, probes = _check_divergence(divergence, probes)
    ridge = static_positive("ridge", ridge)
    num_basis = _check_basis(basis, basis_potentials, dim, default=1)
    fixed = _check_control(control, num_basis, has_potentials=basis is None
                           or basis_potentials is not None)
    weights = _check_weights(weights)

    ts = jnp.asarray(times, jnp.float32)
    dtaus = jnp.asarray(times[:-1] - times[1:], jnp.float32)
    lambdas_j = jnp.asarray(lambdas, jnp.float32)

    def tweedie_reward(z: Array, t: Array) -> tuple[Array, tuple[Array, Array]]:
        s = score(z, t)
        r = reward(sde.x0_hat(schedule, z, t, s))
        return jnp.sum(r), (r, s)

    def with_gradient(z: Array, t: Array) -> tuple[Array, Array, Array]:
        (_, (r, s)), grad = jax.value_and_grad(tweedie_reward, has_aux=True)(z, t)
        return r, s, grad

    def evaluate(key: Array, x: Array, k: Array) -> Local:
        t, dtau = ts[k], dtaus[k]
        lam, lam_next = lambdas_j[k], lambdas_j[k + 1]
        vs, cs, scale = _tangents(key, x, divergence, probes, time_step=dtau)
        # One linearisation, several tangents: the primal (value, score, gradient) is computed
        # once; a tangent (v, c) moves x by v and t by c.
        (r, s, grad), (dr, _, dgrad) = jax.vmap(
            lambda v, c: jax.jvp(with_gradient, (x, t), (v, c)), out_axes=(None, 0))(vs, cs)
        lap_r = trace_estimate(vs, dgrad, scale)
        # dr_p = grad r . v_p + c_p d_t r, so the t-derivative is exact whatever the probes.
        dt_r = jnp.sum(dr - jnp.einsum("nd,pnd->pn", grad, vs), 0) / jnp.sum(cs)
        h = lam * r / alpha
        grad_h, lap_h = lam * grad / alpha, lam * lap_r / alpha
        # d_tau h = (lambda' r - lambda d_t r) / alpha, lambda's change taken over the step.
        dtau_h = ((lam_next - lam) * r / dtau - lam * dt_r) / alpha
        f, g2 = sde.f(schedule, x, t), sde.g2(schedule, t)
        rate = tilt_rate(dtau_h, f, grad_h, lap_h, g2)
        grad_log_target = s + grad_h
        if basis is None:
            fields, div_fields = (g2 * grad_h)[:, None], (g2 * lap_h)[:, None]
            potential = (g2 * h)[:, None]
        else:
            fields, div_fields, potential = _user_basis(basis, basis_potentials, x, t, vs, scale)
        return Local(-f + g2 * s, rate, fields, stein(div_fields, fields, grad_log_target),
                     potential)

    def log_tilt(x: Array, k: int) -> Array:
        """h(x, t_k) = lambda_k r(x0_hat(x, t_k)) / alpha: one forward evaluation."""
        t = ts[k]
        return lambdas_j[k] * reward(sde.x0_hat(schedule, x, t, score(x, t))) / alpha

    if weights == "transition":
        def direction(key: Array, p: reward_lib.RewardParticles, k: Array,
                      log_weights: Array | None) -> Array:
            """(sum_k theta_k phi_k)(x_k) / g^2: reward_smc moves the proposal mean by (step
            variance) times this, dtau * b for Euler-Maruyama. theta by the same rules as with
            rate weights, from the cloud at t_k."""
            t, g2 = ts[k], sde.g2(schedule, ts[k])
            if fixed is not None:
                fields = ((g2 * p.exponent / alpha)[:, None] * p.reward_grad)[:, None] \
                    if basis is None else basis(p.x, t)
                return jnp.einsum("k,nkd->nd", fixed, fields) / g2
            local = evaluate(key, p.x, k)
            theta = coefficients(control, local, _finite(*local), log_weights, ridge)
            return jnp.einsum("k,nkd->nd", jax.lax.stop_gradient(theta), local.basis) / g2

        return reward_lib.reward_smc(
            score, reward, alpha=alpha, schedule=schedule, times=times, dim=dim,
            exponents=exponents, gamma=gamma,
            guidance=reward_lib.Guidance(direction, weighted=fixed is None))

    init_std = float(np.sqrt(schedule.sigma2(times[0])))
    no_weight = lambda x: jnp.zeros(x.shape[0], x.dtype)
    return _controlled(
        init_x=lambda key, n: init_std * jax.random.normal(key, (n, dim), jnp.float32),
        init_log_weight=(lambda x: log_tilt(x, 0)) if lambdas[0] > 0 else no_weight,
        evaluate=evaluate,
        # p_{t_T} exp(h(., t_T)) -> p_{t_T} exp(r / alpha): the last potential is exact.
        terminal=lambda x: reward(x) / alpha - log_tilt(x, num_steps),
        schedule=schedule, times=times, control=control, fixed=fixed, ridge=ridge,
        num_basis=num_basis)


def correctors(scores: Sequence[sde.ScoreFn], betas: Sequence[float], *, schedule: sde.Schedule,
               times, dim: int, control="vcg", log_densities: Sequence[LogDensityFn] | None = None,
               basis: BasisFn | None = None, basis_potentials: BasisFn | None = None,
               ridge: float = 1e-6, divergence: str = "exact",
               probes: int = 1) -> smc.FeynmanKac:
    """DriftLite for FKC's prod_k (q_t^k)^{beta_k} (fkc.correctors with noise scale 1), particles
    [N, dim].

    scores, betas, schedule, times as fkc.correctors. control: "vcg", "ecg" or theta [K].
    log_densities: log q_t^k(x [N, d], t) -> [N], one per expert, the potentials of the default
    basis g^2 s_k (needed for "ecg" only; exact for the toys, `gmm.noised_log_prob`). basis,
    basis_potentials, ridge, divergence, probes: as `reward`.
    """
    scores = list(scores)
    betas = np.asarray([static_finite("beta", b) for b in betas], np.float64)
    if not scores or len(scores) != len(betas):
        raise ValueError(f"scores and betas must be non-empty and of one length, got "
                         f"{len(scores)} and {len(betas)}")
    if float(betas.sum()) <= 0:
        raise ValueError(f"the exponents (betas) must have a positive sum, got {betas.sum()}")
    dim = static_int("dim", dim, 1)
    times = sde.check_time_grid(times, schedule)
    divergence, probes = _check_divergence(divergence, probes)
    ridge = static_positive("ridge", ridge)
    example = jax.ShapeDtypeStruct((2, dim), jnp.float32)
    t_abstract = jax.ShapeDtypeStruct((), jnp.float32)
    for score in scores:
        if not callable(score):
            raise TypeError(f"a score must be callable (x [N, d], t) -> [N, d], got {score!r}")
        sde.check_output("score", jax.eval_shape(score, example, t_abstract), example)
    if log_densities is not None:
        log_densities = list(log_densities)
        if len(log_densities) != len(scores):
            raise ValueError(f"log_densities must give one function per expert "
                             f"({len(scores)}), got {len(log_densities)}")
        for fn in log_densities:
            out = jax.eval_shape(fn, example, t_abstract) if callable(fn) else None
            if getattr(out, "shape", None) != (2,):
                raise ValueError(f"log_densities: each must be a callable (x [N, d], t) -> [N], "
                                 f"got {fn!r}")
    num_basis = _check_basis(basis, basis_potentials, dim, default=len(scores))
    fixed = _check_control(control, num_basis, has_potentials=(
        log_densities is not None if basis is None else basis_potentials is not None))

    ts = jnp.asarray(times, jnp.float32)
    betas_j = jnp.asarray(betas, jnp.float32)
    init_std = float(np.sqrt(schedule.sigma2(times[0]) / betas.sum()))

    def evaluate(key: Array, x: Array, k: Array) -> Local:
        t = ts[k]
        vs, _, scale = _tangents(key, x, divergence, probes)
        values, jvps = [], []
        for score in scores:
            s, ds = jax.vmap(lambda v, score=score: jax.jvp(lambda z: score(z, t), (x,), (v,)),
                             out_axes=(None, 0))(vs)
            values.append(s)
            jvps.append(ds)
        values, jvps = jnp.stack(values), jnp.stack(jvps, axis=2)      # [K, N, d], [P, N, K, d]
        f, g2 = sde.f(schedule, x, t), sde.g2(schedule, t)
        rate = fkc.log_weight_increment(values, betas_j, sde.div_f(schedule, t, dim), g2, 1.0)
        grad_log_target = jnp.einsum("k,knd->nd", betas_j, values)
        if basis is None:
            fields = g2 * jnp.swapaxes(values, 0, 1)
            div_fields = g2 * trace_estimate(vs, jvps, scale)
            potential = (g2 * jnp.stack([fn(x, t) for fn in log_densities], -1)
                         if log_densities is not None else jnp.zeros(fields.shape[:2]))
        else:
            fields, div_fields, potential = _user_basis(basis, basis_potentials, x, t, vs, scale)
        return Local(fkc.drift(f, g2, values, betas_j), rate, fields,
                     stein(div_fields, fields, grad_log_target), potential)

    no_weight = lambda x: jnp.zeros(x.shape[0], x.dtype)
    return _controlled(
        init_x=lambda key, n: init_std * jax.random.normal(key, (n, dim), jnp.float32),
        init_log_weight=no_weight, evaluate=evaluate, terminal=no_weight, schedule=schedule,
        times=times, control=control, fixed=fixed, ridge=ridge, num_basis=num_basis)


def reward_cost(times, *, dim: int, divergence: str = "exact", probes: int = 1,
                exponents="das", gamma: float = 0.008, weights: str = "transition",
                control="vcg") -> Cost:
    """`Cost` per particle of `reward` on this grid (module doc). "rate": T + 1 forward
    evaluations (T + 2 when lambda_0 > 0), T gradients, T (d + 1) or T probes tangents of the
    gradient. "transition": T forward evaluations with their T gradients (reward_smc's guided
    cost) and, for "vcg" and "ecg", the rate's evaluation at each step on top (T forward, T
    gradients, its tangents); a fixed theta needs nothing more."""
    steps = len(sde.check_time_grid(times)) - 1
    divergence, probes = _check_divergence(divergence, probes)
    tangents = static_int("dim", dim, 1) + 1 if divergence == "exact" else probes
    initial = int(reward_lib.check_exponents(exponents, gamma, steps)[0] > 0)
    if _check_weights(weights) == "transition":
        rate = isinstance(control, str)            # "vcg" and "ecg" read the rate's values
        return Cost(steps * (1 + rate), steps * (1 + rate), steps * tangents * rate)
    return Cost(steps + 1 + initial, steps, steps * tangents)


def correctors_cost(times, *, num_experts: int, dim: int, divergence: str = "exact",
                    probes: int = 1) -> Cost:
    """`Cost` per particle of `correctors` with the default basis: T forward evaluations per
    expert, each with d ("exact") or `probes` tangents; no gradients."""
    steps = len(sde.check_time_grid(times)) - 1
    experts = static_int("num_experts", num_experts, 1)
    divergence, probes = _check_divergence(divergence, probes)
    tangents = static_int("dim", dim, 1) if divergence == "exact" else probes
    return Cost(steps * experts, 0, steps * experts * tangents)


# ---------------------------------------------------------------------------------------------
# The shared step


def _controlled(*, init_x, init_log_weight, evaluate, terminal, schedule, times, control, fixed,
                ridge, num_basis) -> smc.FeynmanKac:
    """The Feynman-Kac model of one controlled Euler-Maruyama chain: init draws x_0 with log-weight
    h_0; step k evaluates the rule at (x_k, t_k), picks theta from the weighted cloud, moves with
    u + theta . phi, weighs dtau (G0 + theta . A phi) and, after the last move, adds
    `terminal`."""
    num_steps = len(times) - 1
    ts = jnp.asarray(times, jnp.float32)
    dtaus = jnp.asarray(times[:-1] - times[1:], jnp.float32)

    def init(key: Array, num_particles: int):
        x = init_x(key, num_particles)
        log_weights = init_log_weight(x)
        theta = jnp.zeros((num_particles, num_basis), x.dtype)
        return DriftParticles(x, theta), jnp.where(_finite(x, log_weights), log_weights, jnp.nan)

    def step(key: Array, p: DriftParticles, k: Array, log_weights: Array | None = None):
        key_move, key_probe = jax.random.split(key)
        local = evaluate(key_probe, p.x, k)
        ok = _finite(*local)
        theta = fixed if fixed is not None else coefficients(control, local, ok, log_weights,
                                                             ridge)
        theta = jax.lax.stop_gradient(theta)
        t, dtau = ts[k], dtaus[k]
        drift = local.drift + jnp.einsum("k,nkd->nd", theta, local.basis)
        x_new, _ = sde_proposals.euler_maruyama(key_move, p.x, drift,
                                                jnp.sqrt(sde.g2(schedule, t)), dtau)
        increments = dtau * (local.rate + local.basis_rate @ theta)
        increments = increments + jax.lax.cond(k == num_steps - 1, terminal,
                                               lambda x: jnp.zeros_like(increments), x_new)
        finite = ok & _finite(x_new, increments)
        new = DriftParticles(x_new, jnp.broadcast_to(theta, p.theta.shape))
        return new, jnp.where(finite, increments, jnp.nan)

    return smc.FeynmanKac(init=init, step=step, num_steps=num_steps,
                          weighted_step=fixed is None)


def _finite(*arrays: Array) -> Array:
    """[N]: every entry of each row of every array is finite."""
    ok = jnp.ones(arrays[0].shape[0], bool)
    for a in arrays:
        ok = ok & jnp.all(jnp.isfinite(a).reshape(a.shape[0], -1), axis=1)
    return ok


def _tangents(key: Array, x: Array, divergence: str, probes: int, time_step=None):
    """(v [P, N, d], c [P], scale): x- and t-tangents and the trace's divisor. "exact": the d
    one-hot vectors (c = 0), plus (0, 1) when a t-derivative is wanted (time_step given).
    "hutchinson": `probes` Rademacher vectors with c = time_step (or 0): moving t along with x
    gives d_t of the value for free, and only adds a zero-mean O(dtau) term to the trace."""
    n, d = x.shape
    with_time = time_step is not None
    if divergence == "exact":
        vs = jnp.broadcast_to(jnp.eye(d, dtype=x.dtype)[:, None, :], (d, n, d))
        cs = jnp.zeros(d, x.dtype)
        if with_time:
            vs = jnp.concatenate([vs, jnp.zeros((1, n, d), x.dtype)])
            cs = jnp.concatenate([cs, jnp.ones(1, x.dtype)])
        return vs, cs, 1.0
    vs = jax.random.rademacher(key, (probes, n, d), x.dtype)
    c = time_step if with_time else 0.0
    return vs, jnp.full(probes, c, x.dtype), float(probes)


def _user_basis(basis: BasisFn, potentials: BasisFn | None, x: Array, t: Array, vs: Array,
                scale: float):
    """(phi [N, K, d], div phi [N, K], potentials [N, K] or zeros) of a user basis at (x, t)."""
    fields, jvps = jax.vmap(lambda v: jax.jvp(lambda z: basis(z, t), (x,), (v,)),
                            out_axes=(None, 0))(vs)
    div = trace_estimate(vs, jvps, scale)
    values = potentials(x, t) if potentials is not None else jnp.zeros(fields.shape[:2], x.dtype)
    return fields, div, values


# ---------------------------------------------------------------------------------------------
# Validation


def _check_weights(weights) -> str:
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    return weights


def _check_divergence(divergence, probes) -> tuple[str, int]:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    return divergence, static_int("probes", probes, 1)


def _check_basis(basis, potentials, dim: int, default: int) -> int:
    """K, the number of fields: `default` without a user basis; else checks basis(x, t) ->
    [N, K, dim] and potentials(x, t) -> [N, K] abstractly (ValueError naming them)."""
    if basis is None:
        if potentials is not None:
            raise ValueError("basis_potentials needs a basis (the default basis has its own)")
        return default
    if not callable(basis):
        raise TypeError(f"basis must be callable (x [N, d], t) -> [N, K, d], got {basis!r}")
    x = jax.ShapeDtypeStruct((2, dim), jnp.float32)
    t = jax.ShapeDtypeStruct((), jnp.float32)
    out = jax.eval_shape(basis, x, t)
    shape = getattr(out, "shape", ())
    if len(shape) != 3 or shape[0] != 2 or shape[2] != dim or shape[1] < 1:
        raise ValueError(f"basis(x, t) must return fields of shape [N, K, {dim}] (K >= 1), got "
                         f"{list(shape)} for N = 2")
    if potentials is not None:
        got = getattr(jax.eval_shape(potentials, x, t), "shape", None) if callable(
            potentials) else None
        if got != (2, shape[1]):
            raise ValueError(f"basis_potentials(x, t) must return [N, K] = [2, {shape[1]}] for "
                             f"N = 2 (one scalar per field), got {got}")
    return int(shape[1])


def _check_control(control, num_basis: int, has_potentials: bool) -> Array | None:
    """None for an adaptive control ("vcg", "ecg"); the fixed theta [K] for an array."""
    if isinstance(control, str):
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS} or an array theta [K], got "
                             f"{control!r}")
        if control == "ecg" and not has_potentials:
            raise ValueError("control='ecg' needs the basis's scalar potentials (the default "
                             "reward basis has them; for correctors give log_densities, for a "
                             "user basis basis_potentials)")
        return None
    if isinstance(control, jax.core.Tracer):
        raise TypeError("control must be concrete, not traced")
    theta = np.asarray(control, np.float64)
    if theta.shape != (num_basis,) or not np.all(np.isfinite(theta)):
        raise ValueError(f"control: a fixed theta must be {num_basis} finite numbers (one per "
                         f"basis field), got shape {theta.shape}")
    return jnp.asarray(theta, jnp.float32)
