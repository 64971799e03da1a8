"""Exactness tests for reward-guided SMC (targets/diffusion/reward.py) and the DAS toys.

Two kinds of exact answers:
- A Gaussian data law with its exact (linear) score makes the whole discretised base chain
  linear-Gaussian: `discretised_law` gives, in float64, the law p_theta of the chain's x_T for the
  very grid and kernel the code runs, and p_theta exp(r / alpha) is a tilted Gaussian (closed form,
  with its log Z). Every variant is compared with it within plain Monte Carlo error, no allowance.
- The DAS mixtures (targets/toy/das.py) with the exact noised mixture score: the tilted mixture is
  exact, and the discretisation bias of the chain at 100 VP steps, measured by importance sampling
  from the base chain with 4 x 100k particles (grid; ring), is -0.004; -0.015 on the mean reward
  and +0.015; -0.019 on log Z (-0.002; -0.009 and +0.006; -0.010 at 200 steps).

On the mixtures the Tweedie twist r(x0_hat(x_t)) is a poor guess of log E[exp r(x0) | x_t] between
the modes, so Z_hat is heavy-tailed there (sd of log Z_hat 0.2-0.6 at N = 512); weighted moments
are fine. log Z is z-tested where its tails are light.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smc
from smc.engine import resample
from targets.diffusion import reward as rw
from targets.diffusion import sde
from targets.toy import das, distance, gmm
from tests.conftest import z_score

VP = sde.VP()


# ---------------------------------------------------------------------------------------------
# Helpers


def run_seeds(model, num_particles, seeds, statistic, ess_threshold=0.5, first_seed=0):
    """statistic(result) for `seeds` runs, vmapped in one compilation; NumPy float64 arrays."""
    keys = jax.random.split(jax.random.PRNGKey(first_seed), seeds)
    one = lambda key: statistic(smc.run(key, model, num_particles, ess_threshold=ess_threshold))
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), jax.jit(jax.vmap(one))(keys))


def mean_and_se(values):
    values = np.asarray(values, np.float64)
    return values.mean(0), values.std(0, ddof=1) / np.sqrt(values.shape[0])


def discretised_law(mean, cov, schedule, times, kernel="euler_maruyama"):
    """N(mu, S) of x_T for the base chain from N(0, sigma_{t_0}^2 I) with the exact score of
    Gaussian data N(mean, cov): score(x, t) = -L^{-1} (x - alpha mean), L = alpha^2 cov + sigma^2 I,
    so each step is x' = A x + b + std xi."""
    mean, cov = np.asarray(mean, np.float64), np.asarray(cov, np.float64)
    eye = np.eye(len(mean))
    mu, s = np.zeros(len(mean)), float(schedule.sigma2(times[0])) * eye
    for t, t_next in itertools.pairwise(times):
        al, s2 = float(sde.alpha(schedule, t)), float(schedule.sigma2(t))
        p = -np.linalg.inv(al**2 * cov + s2 * eye)                  # score = p x + q
        q = -p @ (al * mean)
        if kernel == "euler_maruyama":
            dt, g2, dla = t - t_next, float(sde.g2(schedule, t)), float(schedule.dlog_alpha(t))
            a, b, var = eye + dt * (-dla * eye + g2 * p), dt * g2 * q, g2 * dt
        else:  # ancestral: posterior mean with x0_hat = ((I + s2 p) x + s2 q) / alpha
            al_s, s2_s = float(sde.alpha(schedule, t_next)), float(schedule.sigma2(t_next))
            al_ts = al / al_s
            var_ts = s2 - al_ts**2 * s2_s
            a = (al_ts * s2_s * eye + al_s * var_ts * (eye + s2 * p) / al) / s2
            b = al_s * var_ts * s2 * q / al / s2
            var = var_ts * s2_s / s2
        mu, s = a @ mu + b, a @ s @ a.T + var * eye
    return mu, s


DATA_MEAN, DATA_COV = np.array([0.5, -0.3]), np.diag([1.0, 0.5])
GAUSS_REWARD = das.QuadraticReward(jnp.array([1.5, 0.5]), jnp.diag(jnp.array([1.0, 2.0])), 0.3)
GAUSS_SCORE = lambda schedule: gmm.noised_score(gmm.mixture([1.0], [DATA_MEAN], [DATA_COV]),
                                                schedule)


def gaussian_target(schedule, times, kernel="euler_maruyama", alpha=1.0):
    """The exact target p_theta(x_T) exp(r / alpha) of the discretised chain: a das.TiltedToy."""
    mu, s = discretised_law(DATA_MEAN, DATA_COV, schedule, times, kernel)
    return das.tilted(gmm.mixture([1.0], [mu], [s]), GAUSS_REWARD, alpha)


def cloud_statistics(reward):
    def statistic(result):
        w = result.weights
        return (w @ result.particles.x, w @ reward(result.particles.x), result.log_evidence,
                result.ess[-1])
    return statistic


# ---------------------------------------------------------------------------------------------
# The DAS toys


def test_das_toys_match_the_papers_targets_and_a_grid_integration():
    grid, ring = das.grid(), das.ring()
    # DAS reports these mean rewards of the target (its Table; its SMC: -0.21 and -1.44).
    assert abs(grid.mean_reward - (-0.29)) < 0.005 and abs(ring.mean_reward - (-1.34)) < 0.005
    for toy in (grid, das.ring(alpha=3.0)):
        g = gmm.on_grid(lambda x, toy=toy: gmm.log_prob(toy.prior, x) + toy.reward(x) / toy.alpha,
                        -9.0, 9.0, 300)
        np.testing.assert_allclose(float(g.log_normaliser), toy.log_z, atol=2e-3)
        np.testing.assert_allclose(float(g.probs @ toy.reward(g.points)), toy.mean_reward,
                                   atol=2e-3)
    # The tilted density itself, at the modes of the grid toy.
    x = grid.prior.means
    want = (gmm.log_prob(grid.prior, x) + grid.reward(x) - grid.log_z)
    np.testing.assert_allclose(gmm.log_prob(grid.target, x), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="alpha"):
        das.grid(alpha=0.0)


@pytest.mark.parametrize("name, allowance", [("grid", 0.004), ("ring", 0.015)])
def test_reward_smc_on_the_das_toys_hits_the_tilted_mixture(name, allowance):
    toy = das.TOYS[name]()
    times = sde.time_grid(100)
    model = rw.reward_smc(gmm.noised_score(toy.prior, VP), toy.reward, alpha=1.0, schedule=VP,
                          times=times, dim=2)
    seeds, n = 16, 1024
    x, w, rewards, log_z = run_seeds(model, n, seeds, lambda r: (
        r.particles.x, r.weights, r.weights @ toy.reward(r.particles.x), r.log_evidence))
    m, se = mean_and_se(rewards)
    assert abs(m - toy.mean_reward) < 4 * se + allowance, (m, se, toy.mean_reward)
    # Z_hat / Z: its discretisation bias (about 2% at 100 steps) is far below its error here
    # (sd of log Z_hat 0.2-0.6), but its right tail is heavy, so this z-test has little power.
    assert abs(z_score(np.exp(log_z - toy.log_z), 1.0)) < 4, (log_z, toy.log_z)

    # Mode masses per run, against the exact mixture weights (seed-to-seed error: a run's
    # genealogy picks modes early, so a run's particles are far from independent draws).
    masses = np.asarray(jax.vmap(gmm.mode_weights, (None, 0, 0))(toy.target, x, w))
    m, se = mean_and_se(masses)
    exact = np.asarray(toy.target.weights)
    assert np.all(np.abs(m - exact) < 4 * se + 0.01), (m, se, exact)
    assert_close_in_sliced_wasserstein(x, w, toy)


def assert_close_in_sliced_wasserstein(x, w, toy):
    """Pooled weighted runs x [S, N, 2], w [S, N] against exact samples of the tilted mixture.

    The noise floor is the distance between two exact sets of the pooled size; but a run's
    particles share ancestors (its genealogy picks modes early), so the pooled cloud is noisier
    than iid draws: its own error is the jackknife standard error over groups of runs. The exact
    prior (the proposal with its weights ignored: the score is exact) must be far.
    """
    seeds, n = w.shape
    key_a, key_b, key_p, key_sw = jax.random.split(jax.random.PRNGKey(11), 4)
    reference = gmm.sample(key_a, toy.target, seeds * n)
    sw = lambda a, wa=None: float(distance.sliced_wasserstein(key_sw, a, reference, wa))
    pooled = sw(x.reshape(-1, 2), w.reshape(-1) / seeds)
    # Delete-a-group jackknife over 8 groups of runs.
    groups = 8
    keep = ~np.repeat(np.eye(groups, dtype=bool), seeds // groups, axis=1)
    loo = np.array([sw(x[k].reshape(-1, 2), w[k].reshape(-1) / k.sum()) for k in keep])
    se = np.sqrt((groups - 1) / groups * np.sum((loo - loo.mean()) ** 2))
    floor = sw(gmm.sample(key_b, toy.target, seeds * n))
    ignored = sw(gmm.sample(key_p, toy.prior, seeds * n))
    assert pooled < floor + 4 * se and ignored > pooled + 4 * se, (pooled, floor, se, ignored)


# ---------------------------------------------------------------------------------------------
# Every variant targets the same law: the exact discretised Gaussian


STEPS = 50
TIMES = sde.time_grid(STEPS)
VARIANTS = {
    # gamma small enough that lambda_T = 0.64 < 1: only the exact terminal potential gets it right.
    "das": {"exponents": "das", "gamma": 0.01},
    # From t_0 = 0.4 (where x0_hat is informative; the chain starts at N(0, sigma_{t_0}^2 I)):
    # the bisection picks lambda_1 = 0.63, then 1 (from t_0 = 1 it picks 1 at once).
    "adaptive": {"exponents": "adaptive", "target_ess": 0.9,
                 "times": sde.time_grid(STEPS, t_max=0.4)},
    "guidance": {"exponents": "constant", "guidance": 1.0},
    "max_every_5": {"exponents": "constant", "potential": "max", "resample_every": 5},
    "sum_every_5": {"exponents": np.r_[np.full(STEPS, 1.0 / STEPS), 1.0], "potential": "sum",
                        "resample_every": 5},
    "ve_ancestral_guided": {"exponents": "das", "gamma": 0.05, "kernel": "ancestral",
                            "guidance": 0.5, "schedule": sde.VE(sigma_max=10.0)},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_targets_the_exact_discretised_tilt(variant):
    options = dict(VARIANTS[variant])
    schedule = options.pop("schedule", VP)
    times = options.pop("times", TIMES)
    kernel = options.get("kernel", "euler_maruyama")
    target = gaussian_target(schedule, times, kernel)
    model = rw.reward_smc(GAUSS_SCORE(schedule), GAUSS_REWARD, alpha=1.0, schedule=schedule,
                          times=times, dim=2, **options)
    every = "resample_every" in options
    means, rewards, log_z, _ess = run_seeds(model, 512, 16, cloud_statistics(GAUSS_REWARD),
                                           ess_threshold=1.0 if every else 0.5)
    exact_mean = np.asarray(target.target.means[0])
    m, se = mean_and_se(means)
    assert np.all(np.abs(m - exact_mean) < 4 * se), (m, se, exact_mean)
    m, se = mean_and_se(rewards)
    assert abs(m - target.mean_reward) < 4 * se, (m, se, target.mean_reward)
    assert abs(z_score(np.exp(log_z - target.log_z), 1.0)) < 4, (log_z, target.log_z)
    # p_theta (50 steps) is close to the data law: the tilt of the latter is near.
    if variant == "das":
        exact = das.tilted(gmm.mixture([1.0], [DATA_MEAN], [DATA_COV]), GAUSS_REWARD)
        assert np.max(np.abs(np.asarray(exact.target.means[0]) - exact_mean)) < 0.05


# ---------------------------------------------------------------------------------------------
# Structure: cache, cost, schedules, errors


def test_cached_values_travel_with_their_particles_through_resampling():
    toy = das.ring()
    score = gmm.noised_score(toy.prior, VP)
    times = sde.time_grid(10)
    model = rw.reward_smc(score, toy.reward, alpha=2.0, schedule=VP, times=times, dim=2,
                          exponents="das", gamma=0.2, guidance=1.0, potential="max")
    t = times[5]

    @jax.jit
    def run_and_recompute(key):
        particles, log_w = model.init(key, 64)

        def body(k, state):
            particles, inc = model.step(jax.random.fold_in(key, k), state.particles, k)
            state = state._replace(particles=particles, log_weights=state.log_weights + inc)
            return resample(jax.random.fold_in(key, 100 + k), state,
                            smc.resampling.multinomial)[0]

        state = jax.lax.fori_loop(0, 5, body, smc.SMCState(particles, log_w, jnp.zeros(())))
        p = state.particles
        s = score(p.x, t)
        r = lambda x: toy.reward(sde.x0_hat(VP, x, t, score(x, t)))
        return p, s, r(p.x), jax.grad(lambda x: jnp.sum(r(x)))(p.x)

    p, s, r, grad = run_and_recompute(jax.random.PRNGKey(3))
    np.testing.assert_allclose(p.score, s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.reward, r, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.reward_grad, grad, rtol=1e-4, atol=1e-4)
    lam = rw.das_exponents(10, 0.2)[5]
    np.testing.assert_allclose(p.exponent, lam, rtol=1e-6)
    np.testing.assert_allclose(p.log_twist, lam * p.statistic / 2.0, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(p.statistic) >= np.asarray(p.reward) - 1e-6)


def test_das_exponents_and_the_cost_count():
    lam = rw.das_exponents(200)
    np.testing.assert_allclose(lam[:3], [0.0, 0.008, 1.008**2 - 1])
    assert lam[-1] == 1.0 and np.all(np.diff(lam) >= 0)
    assert int(np.argmax(lam == 1.0)) == int(np.ceil(np.log(2) / np.log(1.008)))
    assert rw.score_evaluations(sde.time_grid(37)) == 37


def test_non_finite_rewards_and_scores_become_counted_nan_increments():
    toy = das.grid()
    score = gmm.noised_score(toy.prior, VP)
    bad_reward = lambda x: jnp.where(x[:, 0] > 0.3, jnp.nan, toy.reward(x))
    bad_score = lambda x, t: jnp.where(x[:, 1:] > 2.0, jnp.inf, score(x, t))
    # The engine counts NaN increments in SMCResult.nonfinite_increments (tests/test_engine.py).
    times = sde.time_grid(5)
    # Starting points where both are finite (at t_0 = 1, x0_hat is near the data mean).
    x = jnp.clip(jax.random.normal(jax.random.PRNGKey(2), (64, 2)), -1.0, 1.0)
    model = rw.reward_smc(bad_score, bad_reward, alpha=1.0, schedule=VP, times=times, dim=2,
                          exponents="constant", guidance=1.0, initial=lambda key, n: x)
    particles, log_w = jax.jit(model.init, static_argnums=1)(jax.random.PRNGKey(0), 64)
    assert np.all(np.isfinite(np.asarray(log_w)))
    new, inc = jax.jit(model.step)(jax.random.PRNGKey(1), particles, jnp.int32(0))
    t = times[1]
    bad_s = np.asarray(new.x)[:, 1] > 2.0
    bad_r = np.asarray(sde.x0_hat(VP, new.x, t, score(new.x, t)))[:, 0] > 0.3
    assert bad_s.any() and bad_r.any() and not (bad_s | bad_r).all()
    np.testing.assert_array_equal(np.isnan(np.asarray(inc)), bad_s | bad_r)


def test_bad_inputs_raise_clear_errors():
    toy = das.grid()
    score = gmm.noised_score(toy.prior, VP)
    kw = {"alpha": 1.0, "schedule": VP, "times": TIMES, "dim": 2}
    build = lambda **changes: rw.reward_smc(score, toy.reward, **{**kw, **changes})
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            build(alpha=alpha)
    with pytest.raises(ValueError, match="gamma"):
        build(gamma=0.0)
    with pytest.raises(ValueError, match="gamma"):
        build(gamma=-0.1)
    bad_schedules = [np.linspace(0, 1, STEPS), np.linspace(1, 0, STEPS + 1),
                     np.r_[np.zeros(STEPS), 0.5], np.r_[np.zeros(STEPS), 1.5], "linear"]
    for bad in bad_schedules:
        with pytest.raises(ValueError, match="exponents"):
            build(exponents=bad)
    with pytest.raises(ValueError, match="decreasing"):
        build(times=[0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match="target_ess"):
        build(exponents="adaptive", target_ess=0.0)
    with pytest.raises(ValueError, match="potential"):
        build(potential="min")
    with pytest.raises(ValueError, match="kernel"):
        build(kernel="heun")
    with pytest.raises(ValueError, match="guidance"):
        build(guidance=-1.0)
    with pytest.raises(TypeError, match="guidance.direction"):
        build(guidance=rw.Guidance(direction=3.0))
    with pytest.raises(ValueError, match="resample_every"):
        build(resample_every=0)
    with pytest.raises(ValueError, match="dim"):
        build(dim=0)
    with pytest.raises(ValueError, match="score\\(x, t\\) must return"):
        rw.reward_smc(lambda x, t: x[:, :1], toy.reward, **kw)
    with pytest.raises(ValueError, match="reward\\(x0\\) must return"):
        rw.reward_smc(score, lambda x: x, **kw)
    with pytest.raises(ValueError, match="reward\\(x0\\) must return"):
        rw.reward_smc(score, lambda x: x[:, 0] > 0, **kw)
    with pytest.raises(TypeError, match="callable"):
        rw.reward_smc("score", toy.reward, **kw)
    model = build(initial=lambda key, n: jnp.zeros((n, 3)))
    with pytest.raises(ValueError, match="initial"):
        smc.run(jax.random.PRNGKey(0), model, 8)


def test_adaptive_exponents_hit_the_target_on_the_current_weighted_cloud():
    # Never resampling, step k sees the log-weights of every step before it; its exponent must
    # give the target conditional ESS on them plus the rest of its increment, rest =
    # lambda_k S_{k+1} / alpha - log psi_k (no guidance), until it reaches 1. Ignoring the
    # current weights (the proxy this replaced) misses the target by about 1e-3 here.
    times = sde.time_grid(STEPS, t_max=0.4)
    model = rw.reward_smc(GAUSS_SCORE(VP), GAUSS_REWARD, alpha=1.0, schedule=VP, times=times,
                          dim=2, exponents="adaptive", target_ess=0.99)
    summary = lambda p, log_weights: (p.exponent[0], p.statistic, p.log_twist, log_weights)
    result = jax.jit(lambda k: smc.run(k, model, 512, ess_threshold=0.0, summary=summary))(
        jax.random.PRNGKey(0))
    lam, statistic, log_twist, log_weights = (np.asarray(a, np.float64) for a in result.summaries)
    reached = int(np.argmax(lam >= 1.0))
    assert reached >= 4 and not np.any(result.resampled)
    for k in range(1, reached - 1):
        rest = lam[k] * statistic[k + 1] - log_twist[k]
        cess = smc.weights.conditional_ess(log_weights[k] + rest,
                                           (lam[k + 1] - lam[k]) * statistic[k + 1])
        np.testing.assert_allclose(cess, 0.99 * 512, rtol=1e-4)
