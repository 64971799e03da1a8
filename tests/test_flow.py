"""Flow models (targets/diffusion/sde.py): the linear interpolant, the velocity adapter, interpolant
conversion, and FKC / reward SMC run on a velocity, against Gaussian mixtures whose velocity, score
and posterior means are exact (targets/toy/gmm.py).

Sampling runs use `TIMES`, a linear-interpolant grid with the signal-to-noise ratios of a uniform VP
grid (docs/algorithms.md section 10): a grid uniform in t is stiff near t = 1 (one step from
t = 0.999 in 100 steps multiplies x by -9, and FKC's weights at beta = 3 collapse to ESS 1 there).
The VP grid runs to t = 1e-5 so that the linear one ends at t = 1e-3: it stops at x_T = (1 - t) x0
+ t eps, so ending at VP's t_min = 1e-3 (linear t = 0.0104) would shrink the data by 1%, a bias of
-0.0075 on a within-mode variance of 0.3 that no number of steps removes.

Exact answers are those of tests/test_fkc.py and tests/test_reward.py, whose helpers are reused: the
discretised chain of a Gaussian expert is linear-Gaussian (its N -> infinity law and evidence are
computed in float64 for the very grid the code runs), and mixtures are compared with closed forms.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smc
from targets.diffusion import fkc, psi, sde
from targets.diffusion import reward as rw
from targets.toy import das, gmm
from tests.conftest import z_score
from tests.test_fkc import mean_and_se, mode_statistics
from tests.test_fkc import run_seeds as run_seeds_jit
from tests.test_reward import GAUSS_REWARD, cloud_statistics, gaussian_target
from tests.test_reward import run_seeds as run_seeds_vmap

LINEAR, VP, VE = sde.LinearInterpolant(), sde.VP(), sde.VE(0.05, 5.0)
TIMES = np.asarray(sde.matching_time(LINEAR, VP, sde.time_grid(100, t_min=1e-5)), np.float64)
MIX = gmm.four_modes([4, 3, 2, 1])


def velocity_score(mixture, schedule=LINEAR):
    """The score a flow model gives: the exact velocity through the adapter under test."""
    return sde.score_from_velocity(schedule, gmm.noised_velocity(mixture, schedule))


# ---------------------------------------------------------------------------------------------
# The schedule, its log-SNR inverse, the adapter


def test_linear_interpolant_is_a_schedule_on_the_open_interval():
    ts = jnp.linspace(0.02, 0.98, 9)
    np.testing.assert_allclose(sde.alpha(LINEAR, ts), 1.0 - ts, rtol=1e-6)
    np.testing.assert_allclose(sde.sigma(LINEAR, ts), ts, rtol=1e-6)
    grad = lambda fn: jax.vmap(jax.grad(fn))(ts)
    np.testing.assert_allclose(LINEAR.dlog_alpha(ts), grad(LINEAR.log_alpha), rtol=1e-5)
    np.testing.assert_allclose(LINEAR.dsigma2(ts), grad(LINEAR.sigma2), rtol=1e-5)
    # The generic g^2 = d sigma^2/dt - 2 sigma^2 d log alpha/dt is 2t / (1 - t) here.
    np.testing.assert_allclose(sde.g2(LINEAR, ts), 2 * ts / (1 - ts), rtol=1e-5)
    np.testing.assert_allclose(sde.d_alpha(LINEAR, ts), -1.0, rtol=1e-5)
    np.testing.assert_allclose(sde.d_sigma(LINEAR, ts), 1.0, rtol=1e-5)
    assert str(sde.time_domain(LINEAR)) == "(0, 1)" and str(sde.time_domain(VP)) == "(0, 1]"
    # The grid: strictly decreasing (check_time_grid accepts it), with VP's ratios, to t = 1e-3.
    np.testing.assert_array_equal(sde.check_time_grid(TIMES, LINEAR), TIMES)
    np.testing.assert_allclose(sde.log_snr(LINEAR, TIMES),
                               sde.log_snr(VP, sde.time_grid(100, t_min=1e-5)), rtol=1e-5,
                               atol=1e-6)
    assert abs(TIMES[-1] - 1e-3) < 1e-5


class BareVP:
    """VP without its closed-form inverse: the generic bisection path."""

    def __init__(self):
        self.vp = sde.VP()

    def log_alpha(self, t):
        return self.vp.log_alpha(t)

    def dlog_alpha(self, t):
        return self.vp.dlog_alpha(t)

    def sigma2(self, t):
        return self.vp.sigma2(t)

    def dsigma2(self, t):
        return self.vp.dsigma2(t)


@pytest.mark.parametrize("schedule", [LINEAR, VP, VE, BareVP()], ids=["linear", "vp", "ve", "bare"])
def test_log_snr_inverse_closed_forms_agree_with_bisection(schedule):
    ts = jnp.asarray([1e-3, 0.01, 0.2, 0.5, 0.8, 0.99], jnp.float32)
    lam = sde.log_snr(schedule, ts)
    inverse = jax.jit(lambda v: sde.time_at_log_snr(schedule, v))
    bisect = jax.jit(lambda v: sde.bisect_log_snr(schedule, v))
    # float32 round-off of log-SNR moves t by |d t / d log-SNR| * 1e-7 |log-SNR|: at most 2e-6.
    np.testing.assert_allclose(inverse(lam), ts, rtol=2e-5, atol=2e-7)
    np.testing.assert_allclose(bisect(lam), ts, rtol=2e-5, atol=2e-7)
    # Elementwise under vmap, too (a [3, 4] batch inside the range: outside it, closed forms
    # extrapolate and bisection stops at the domain's ends).
    batch = jnp.stack([lam[1:-1], lam[1:-1] + 0.01, lam[1:-1] - 0.01])
    np.testing.assert_allclose(jax.vmap(bisect)(batch), jax.vmap(inverse)(batch), rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("schedule", [LINEAR, VP], ids=["linear", "vp"])
def test_velocity_adapter_gives_the_exact_score_and_denoiser(schedule):
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    velocity = gmm.noised_velocity(MIX, schedule)

    @jax.jit
    def values(t):
        got = sde.score_from_velocity(schedule, velocity)(x, t)
        x0, _ = gmm.posterior_means(MIX, schedule, x, t)
        return (gmm.noised_score(MIX, schedule)(x, t), got, sde.x0_hat(schedule, x, t, got), x0,
                velocity(x, t))

    for t in (0.05, 0.3, 0.7, 0.95):
        want, got, x0_hat, x0, v = values(jnp.float32(t))
        # float32: relative round-off of a few 1e-7 in the velocity, amplified by 1 / t at most.
        scale = float(jnp.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(x0_hat, x0, rtol=1e-4, atol=1e-4 / float(sde.alpha(schedule, t)))
        if schedule is LINEAR:  # the closed form: s = -(x + (1 - t) v) / t
            np.testing.assert_allclose(got, -(x + (1 - t) * v) / t, rtol=1e-4,
                                       atol=1e-5 * scale)
            np.testing.assert_allclose(x0, x - t * v, rtol=1e-4, atol=1e-4)


def test_posterior_means_of_a_gaussian_are_the_conditioning_formula():
    mean, cov = np.array([1.0, -0.5]), np.array([[0.5, 0.2], [0.2, 0.3]])
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 2))
    t = 0.4
    al, s2 = 1 - t, t**2
    gain = al * cov @ np.linalg.inv(al**2 * cov + s2 * np.eye(2))
    x0 = mean + (np.asarray(x, np.float64) - al * mean) @ gain.T
    gaussian = gmm.mixture([1.0], [mean], [cov])
    got_x0, got_eps = jax.jit(lambda x: gmm.posterior_means(gaussian, LINEAR, x, t))(x)
    np.testing.assert_allclose(got_x0, x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_eps, (np.asarray(x) - al * x0) / t, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# FKC annealing on a velocity


def discrete_anneal(variances, beta, schedule, times, weighted=True):
    """tests/test_fkc.discrete_fkc for one expert on any schedule: the N -> infinity variance and
    log Z of the discretised FKC chain for zero-mean Gaussian data with diagonal covariance."""
    variances = np.asarray(variances, np.float64)
    v, log_z = np.full(len(variances), float(schedule.sigma2(times[0])) / beta), 0.0
    for t, dtau in zip(times[:-1], -np.diff(times)):
        lam = float(sde.alpha(schedule, t)) ** 2 * variances + float(schedule.sigma2(t))
        g2, dla = float(sde.g2(schedule, t)), float(schedule.dlog_alpha(t))
        if weighted:
            q = 0.5 * g2 * dtau * (beta**2 - beta) / lam**2
            log_z += np.sum(dtau * (beta - 1) * dla - 0.5 * np.log1p(-2 * q * v))
            v = 1.0 / (1.0 / v - 2 * q)
        v = (1.0 - dtau * (dla + g2 * beta / lam)) ** 2 * v + g2 * dtau
    return v, log_z


def exact_anneal(variances, beta, schedule, t_end, t_start):
    """Variance lam / beta of q_t^beta at t_end, and log int q^beta at t_end over t_start."""
    def log_mass(t):
        lam = float(sde.alpha(schedule, t)) ** 2 * np.asarray(variances) + float(schedule.sigma2(t))
        return np.sum(-0.5 * beta * np.log(2 * np.pi * lam) + 0.5 * np.log(2 * np.pi * lam / beta)), lam

    (end, lam), (start, _) = log_mass(t_end), log_mass(t_start)
    return lam / beta, end - start


C_DIAG = np.array([0.25, 0.5])
GAUSSIAN = gmm.mixture([1.0], [[0.0, 0.0]], covs=[np.diag(C_DIAG)])


def test_fkc_anneal_of_a_gaussian_velocity_has_the_exact_law_and_unbiased_evidence():
    # beta < 1: bounded weights, so the moments and Z_hat must match the discretised chain within
    # plain Monte Carlo error (as in tests/test_fkc.py). The evidence carries (beta - 1) div f,
    # div f = -2 / (1 - t) here, +5 nats in all (offset by the score term): a wrong f shows there.
    beta = 0.5
    limit, log_z = discrete_anneal(C_DIAG, beta, LINEAR, TIMES)
    exact, exact_log_z = exact_anneal(C_DIAG, beta, LINEAR, TIMES[-1], TIMES[0])
    # Discretisation bias, O(1/T): -1.6% and -1.3% on the variances and -0.034 nats at these 100
    # steps; -0.4% and -0.009 at 400, -0.1% and -0.002 at 1600 (VP's grid: +1.5%, -0.007).
    np.testing.assert_allclose(limit, exact, rtol=0.02)
    assert abs(log_z - exact_log_z) < 0.05, (log_z, exact_log_z)
    fine = np.asarray(sde.matching_time(LINEAR, VP, sde.time_grid(1600, t_min=1e-5)), np.float64)
    fine_v, fine_log_z = discrete_anneal(C_DIAG, beta, LINEAR, fine)
    np.testing.assert_allclose(fine_v, exact, rtol=0.002)
    assert abs(fine_log_z - exact_log_z) < 0.005
    uncorrected, _ = discrete_anneal(C_DIAG, beta, LINEAR, TIMES, weighted=False)

    model = fkc.anneal(velocity_score(GAUSSIAN), beta, schedule=LINEAR, times=TIMES, dim=2)
    variances, log_zs = run_seeds_jit(model, 512, 16, lambda r: (
        gmm.weighted_moments(r.particles, r.weights)[1].diagonal(), r.log_evidence))
    assert abs(z_score(np.exp(log_zs - log_z), 1.0)) < 4
    mean, se = mean_and_se(variances)
    assert np.all(np.abs(mean - limit) < 4 * se), (mean, se, limit)
    # Without the weights the chain's law (variances 3.3, 6.3) is far from the runs.
    assert np.all(np.abs(mean - uncorrected) > 10 * se), (mean, se, uncorrected)


def test_fkc_anneal_of_four_modes_on_a_velocity_reaches_the_annealed_mixture():
    mix, beta = gmm.four_modes(), 3.0
    target = gmm.anneal_separated(mix, beta)
    model = fkc.anneal(velocity_score(mix), beta, schedule=LINEAR, times=TIMES, dim=2)

    spread, means, mass = run_seeds_jit(model, 2048, 8, mode_statistics(mix))
    exact_spread = np.diag(np.asarray(target.covs[0]))                          # 0.16 / 3
    m, se = mean_and_se(spread)
    # The allowance of tests/test_fkc.py (Euler bias and the heavy-tailed finite-N bias of beta > 1).
    assert np.all(np.abs(m - exact_spread) < 4 * se + 0.05 * exact_spread), (m, se)
    m, se = mean_and_se(means)
    assert np.all(np.abs(m - np.asarray(target.means)) < 4 * se + 0.01), (m, se)
    m, se = mean_and_se(mass)
    assert np.all(np.abs(m - np.asarray(target.weights)) < 4 * se), (m, se)
    # The particles without their weights (the same model with ESS threshold 0 and the weights
    # dropped) have spread 0.033 (2 x 2048 particles, measured): missing weights fail by far.


# ---------------------------------------------------------------------------------------------
# Reward-guided SMC on a velocity


DATA = gmm.mixture([1.0], [[0.5, -0.3]], [np.diag([1.0, 0.5])])     # tests/test_reward.py's data
TIMES_50 = np.asarray(sde.matching_time(LINEAR, VP, sde.time_grid(50, t_min=1e-5)), np.float64)


def test_reward_smc_on_a_gaussian_velocity_targets_the_exact_discretised_tilt():
    # Guided proposals and the DAS exponents (lambda_T < 1: the terminal potential matters): the
    # target is p_theta exp(r) of the discretised chain, exact, within plain Monte Carlo error.
    target = gaussian_target(LINEAR, TIMES_50)
    model = rw.reward_smc(velocity_score(DATA), GAUSS_REWARD, alpha=1.0, schedule=LINEAR,
                          times=TIMES_50, dim=2, exponents="das", gamma=0.01, guidance=1.0)
    means, rewards, log_z, _ = run_seeds_vmap(model, 256, 16, cloud_statistics(GAUSS_REWARD))
    exact_mean = np.asarray(target.target.means[0])
    m, se = mean_and_se(means)
    assert np.all(np.abs(m - exact_mean) < 4 * se), (m, se, exact_mean)
    m, se = mean_and_se(rewards)
    assert abs(m - target.mean_reward) < 4 * se, (m, se, target.mean_reward)
    assert abs(z_score(np.exp(log_z - target.log_z), 1.0)) < 4, (log_z, target.log_z)
    # (Missing weights: see the next test.)


def test_reward_smc_on_a_velocity_hits_the_das_grid_tilt():
    toy = das.grid()
    model = rw.reward_smc(velocity_score(toy.prior), toy.reward, alpha=1.0, schedule=LINEAR,
                          times=TIMES, dim=2)
    x, w, rewards = run_seeds_vmap(model, 512, 16, lambda r: (
        r.particles.x, r.weights, r.weights @ toy.reward(r.particles.x)))
    m, se = mean_and_se(rewards)
    # (tests/test_reward.py adds a sliced-Wasserstein check: 10 s here, so left to the score
    # version; the same code runs.) Bias of the chain's tilt at these 100 steps, by importance sampling from 4 x 100k base
    # samples: -0.0002 on the mean reward (VP: -0.004; tests/test_reward.py allows 0.004) and
    # 0.006 on the mode masses (0.0005 of it the nearest-mode rule's on exact samples).
    assert abs(m - toy.mean_reward) < 4 * se + 0.004, (m, se, toy.mean_reward)
    masses = np.asarray(jax.vmap(gmm.mode_weights, (None, 0, 0))(toy.target, x, w))
    m_mass, se_mass = mean_and_se(masses)
    exact = np.asarray(toy.target.weights)
    assert np.all(np.abs(m_mass - exact) < 4 * se_mass + 0.01), (m_mass, se_mass, exact)
    # Without the weights the particles follow the chain's law, the prior's (exact score, no
    # guidance): its mean reward (-4.8) fails the first check by far, its mode masses (1/9 each)
    # the second.
    prior = gmm.sample(jax.random.PRNGKey(4), toy.prior, 100_000)
    assert abs(float(jnp.mean(toy.reward(prior))) - toy.mean_reward) > 10 * (4 * se + 0.004)
    prior_mass = np.asarray(gmm.mode_weights(toy.target, prior))
    assert not np.all(np.abs(prior_mass - exact) < 4 * se_mass + 0.01), (prior_mass, se_mass)


# ---------------------------------------------------------------------------------------------
# Interpolant conversion


@pytest.mark.parametrize("model_schedule, sampling_schedule", [
    (VP, LINEAR), (LINEAR, VP), (BareVP(), LINEAR), (VE, LINEAR)],
    ids=["vp_to_linear", "linear_to_vp", "bisection_vp_to_linear", "ve_to_linear"])
def test_conversion_gives_the_exact_score_of_the_other_path(model_schedule, sampling_schedule):
    """The model's exact score converted to the other schedule is that schedule's exact score: the
    marginals of the two paths are the same laws, rescaled."""
    if isinstance(model_schedule, sde.LinearInterpolant):
        model_score = velocity_score(MIX)       # a flow model, the velocity through the adapter
    else:
        model_score = gmm.noised_score(MIX, model_schedule)
    x = 2.0 * jax.random.normal(jax.random.PRNGKey(2), (64, 2))

    @jax.jit
    def values(s):
        t = sde.matching_time(model_schedule, sampling_schedule, s)
        return (gmm.noised_score(MIX, sampling_schedule)(x, s),
                sde.convert_score(model_score, model_schedule, sampling_schedule)(x, s),
                model_score(x, t), sde.log_snr(model_schedule, t), sde.log_snr(sampling_schedule, s))

    # Times whose log-SNR lies inside both schedules' ranges (VE(0.05, 5): t in 0.005..0.8 here).
    times = (0.1, 0.3, 0.5, 0.7) if isinstance(model_schedule, sde.VE) else (0.05, 0.3, 0.7, 0.95)
    for s in times:
        want, got, unscaled, log_snr_t, log_snr_s = values(jnp.float32(s))
        # float32 round-off of the matched time and scale: 1e-5 relative at most (measured 1e-6).
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
        np.testing.assert_allclose(log_snr_t, log_snr_s, rtol=1e-5, atol=1e-5)
        # Without the rescaling by c (0.7 to 1.4 here, but 0.99 at s = 0.95 on VP) the score is off
        # by far more than the tolerance: 2% to 110% of its largest entry.
        if s < 0.9:
            assert float(jnp.abs(unscaled - want).max()) > 0.05 * float(jnp.abs(want).max())


def test_a_flow_model_sampled_along_vp_reaches_the_data_mixture():
    """Kim et al.'s use: a velocity trained on the linear interpolant, sampled by VP's reverse SDE
    (FKC at beta = 1: zero weights, independent particles)."""
    score = sde.convert_score(velocity_score(MIX), LINEAR, VP)
    n = 4096

    def sample(score):
        model = fkc.anneal(score, 1.0, schedule=VP, times=sde.time_grid(100), dim=2)
        return jax.jit(lambda k: smc.run(k, model, n).particles)(jax.random.PRNGKey(3))

    x = sample(score)
    mass = np.asarray(gmm.mode_weights(MIX, x))
    exact = np.asarray(MIX.weights)
    # Independent draws: binomial error of each mass, plus VP's Euler bias (< 0.005 at 100 steps).
    assert np.all(np.abs(mass - exact) < 4 * np.sqrt(exact * (1 - exact) / n) + 0.005), mass
    mean, cov = map(np.asarray, gmm.weighted_moments(x))
    exact_mean, exact_cov = map(np.asarray, gmm.moments(MIX))
    assert np.all(np.abs(mean - exact_mean) < 4 * np.sqrt(np.diag(exact_cov) / n) + 0.01), mean
    np.testing.assert_allclose(cov, exact_cov, atol=0.1)                  # se 0.02, bias 0.01
    # The matched times without the rescaling by c give covariance diag(1.18, 1.44) (one run of
    # 8192, measured), and the unconverted score at VP's own times diverges to NaN.


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_velocities_and_grids_raise_clear_errors_before_compiling():
    reward_kw = {"alpha": 1.0, "schedule": LINEAR, "times": TIMES, "dim": 2}
    for bad in (lambda x, t: x[:, :1], lambda x, t: x[None], lambda x, t: (x > 0).astype(jnp.int32)):
        score = sde.score_from_velocity(LINEAR, bad)
        with pytest.raises(ValueError, match=r"velocity\(x, t\) must return"):
            fkc.anneal(score, 2.0, schedule=LINEAR, times=TIMES, dim=2)
        with pytest.raises(ValueError, match=r"velocity\(x, t\) must return"):
            rw.reward_smc(score, GAUSS_REWARD, **reward_kw)
    with pytest.raises(TypeError, match="velocity"):
        sde.score_from_velocity(LINEAR, "not a network")

    score = velocity_score(MIX)
    for bad in ([1.0, 0.5, 0.1], [0.9, 0.5, 0.0], np.r_[1.0, TIMES[1:]]):
        for build in (lambda g: fkc.anneal(score, 2.0, schedule=LINEAR, times=g, dim=2),
                      lambda g: rw.reward_smc(score, GAUSS_REWARD, **{**reward_kw, "times": g}),
                      lambda g: psi.psi_sampler(score, GAUSS_REWARD, **{**reward_kw, "times": g}),
                      lambda g: sde.check_time_grid(g, LINEAR)):
            with pytest.raises(ValueError, match=r"LinearInterpolant|\(0, 1\)"):
                build(bad)
    # t = 1 stays valid for VP (its domain is (0, 1]).
    np.testing.assert_array_equal(sde.check_time_grid([1.0, 0.5], VP), [1.0, 0.5])

    with pytest.raises(TypeError, match="score"):
        sde.convert_score(None, VP, LINEAR)
    with pytest.raises(TypeError, match="model_schedule"):
        sde.convert_score(score, "vp", LINEAR)
    with pytest.raises(TypeError, match="sampling_schedule"):
        sde.convert_score(score, VP, object())
    with pytest.raises(ValueError, match="beta_max"):
        sde.convert_score(score, sde.VP(2.0, 1.0), LINEAR)
