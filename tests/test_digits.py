"""The digits benchmark: data, training objective, determinism, shipped weights, metrics and the
two experiments at tiny size."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

import smc
from experiments.suites.digits import data as data_lib
from experiments.suites.digits import metrics, networks, train
from targets.diffusion import fkc, sde

# ---------------------------------------------------------------------------------------------
# Data


def test_split_is_fixed_stratified_and_scaled():
    digits = data_lib.load()
    train_, test = digits.train, digits.test
    assert train_.x.shape == (1347, 64) and test.x.shape == (450, 64)
    assert train_.x.dtype == np.float32 and train_.x.min() == -1.0 and train_.x.max() == 1.0
    # Stratified: every class has a quarter of its images in the test split.
    for c in range(10):
        n_test, n_all = np.sum(test.label == c), np.sum(test.label == c) + np.sum(train_.label == c)
        assert n_test == round(0.25 * n_all)
    # Thick = ink above the class median of the training split: at most half of each class there.
    for c in range(10):
        frac = train_.thick[train_.label == c].mean()
        assert 0.4 <= frac <= 0.5
    data_lib.load.cache_clear()
    again = data_lib.load()
    assert np.array_equal(again.test.x, test.x) and np.array_equal(again.train.thick, train_.thick)


def test_thickness_follows_the_ink_of_the_given_class():
    median = np.arange(10, dtype=np.float64) + 10.0
    x = np.full((2, 64), -1.0)
    x[:, :12] = 1.0  # ink 12
    assert data_lib.thickness(x, np.array([1, 2]), median).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------
# The training objective against its exact minimum


def test_dsm_loss_at_the_exact_optimum_of_gaussian_data():
    """x0 ~ N(0, s^2 I): E[eps | x_t] = sigma x_t / (alpha^2 s^2 + sigma^2), and the expected loss
    of that predictor is E_t[alpha^2 s^2 / (alpha^2 s^2 + sigma^2)] (t ~ U(t_min, 1)). The mean
    per-example loss must match within 4 standard errors; a predictor 20% off (or a
    loss that noises x0 wrongly) must not."""
    vp, s, d, n, t_min = sde.VP(), 0.5, 4, 40_000, 1e-3
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = s * jax.random.normal(k0, (n, d))
    t = jax.random.uniform(k1, (n,), minval=t_min, maxval=1.0)
    noise = jax.random.normal(k2, (n, d))

    def optimal(scale):
        def eps(x, tt):
            a2, s2 = jnp.exp(2 * vp.log_alpha(tt)), vp.sigma2(tt)
            return scale * (jnp.sqrt(s2) / (a2 * s**2 + s2))[:, None] * x
        return eps

    grid = np.linspace(t_min, 1.0, 200_001)
    a2 = np.exp(2 * np.asarray(vp.log_alpha(grid), np.float64))
    exact = np.trapezoid(a2 * s**2 / (a2 * s**2 + 1 - a2), grid) / (1 - t_min)
    loss = jax.jit(lambda scale: train.dsm_loss(optimal(scale), vp, x0, t, noise))
    losses = np.asarray(loss(1.0), np.float64)
    se = losses.std(ddof=1) / np.sqrt(n)
    assert abs(losses.mean() - exact) < 4 * se, (losses.mean(), exact, se)
    worse = np.asarray(loss(0.8), np.float64)
    assert worse.mean() - exact > 4 * se


def test_flow_matching_loss_at_the_exact_optimum_of_gaussian_data():
    """x0 ~ N(0, s^2 I), x_t = (1 - t) x0 + t eps: E[eps - x0 | x_t] = (t - (1 - t) s^2) x_t / D,
    D = (1 - t)^2 s^2 + t^2, with residual variance s^2 / D per coordinate, so the expected loss
    of that predictor is E_t[s^2 / D] (t ~ U(t_min, 1 - t_min)). Within 4 standard errors; a
    predictor 20% off must not be."""
    s, d, n, t_min = 0.5, 4, 40_000, 1e-3
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = s * jax.random.normal(k0, (n, d))
    t = jax.random.uniform(k1, (n,), minval=t_min, maxval=1.0 - t_min)
    noise = jax.random.normal(k2, (n, d))

    def optimal(scale):
        def velocity(x, tt):
            return scale * ((tt - (1 - tt) * s**2) / ((1 - tt) ** 2 * s**2 + tt**2))[:, None] * x
        return velocity

    grid = np.linspace(t_min, 1.0 - t_min, 200_001)
    exact = np.trapezoid(s**2 / ((1 - grid) ** 2 * s**2 + grid**2), grid) / (1 - 2 * t_min)
    loss = jax.jit(lambda scale: train.flow_matching_loss(optimal(scale), x0, t, noise))
    losses = np.asarray(loss(1.0), np.float64)
    se = losses.std(ddof=1) / np.sqrt(n)
    assert abs(losses.mean() - exact) < 4 * se, (losses.mean(), exact, se)
    assert np.asarray(loss(0.8), np.float64).mean() - exact > 4 * se


# ---------------------------------------------------------------------------------------------
# Training is deterministic


TINY_SCORE = train.ScoreTraining(hidden=16, depth=1, time_dim=8, steps=3, batch_size=32)


def test_training_is_bit_identical_across_runs_and_depends_on_the_seed():
    """The score network (the classifier runs the same loop; its compile would double the cost):
    the same config twice gives the same bytes and losses. Both runs share one compilation, so
    this checks initialisation, batch order and random draws; the shipped weights of both
    networks were retrained in a fresh process and matched their sha256. Another seed: other
    bytes."""
    split = data_lib.load().train
    first, second = train.train_score(TINY_SCORE, split), train.train_score(TINY_SCORE, split)
    assert serialization.to_bytes(first.params) == serialization.to_bytes(second.params)
    assert first.losses == second.losses
    other = train.train_score(dataclasses.replace(TINY_SCORE, seed=3), split)
    assert serialization.to_bytes(other.params) != serialization.to_bytes(first.params)


def test_training_rejects_bad_step_counts():
    with pytest.raises(ValueError, match="steps"):
        train.train_score(dataclasses.replace(TINY_SCORE, steps=0), data_lib.load().train)


# ---------------------------------------------------------------------------------------------
# The shipped weights


@pytest.fixture(scope="module")
def shipped():
    manifest = json.loads((networks.WEIGHTS / networks.MANIFEST).read_text())
    return manifest, networks.load()


def test_shipped_weights_match_their_manifest(shipped):
    manifest, (eps_net, eps_params, clf_net, clf_params) = shipped
    total = 0
    for what in ("score", "classifier"):
        path = networks.WEIGHTS / manifest[what]["file"]
        assert train.sha256(path) == manifest[what]["sha256"]
        total += path.stat().st_size
    assert total < 2e6
    digits = data_lib.load()
    # The held-out numbers recorded at training time come back from the loaded weights.
    loss = train.held_out_loss(eps_net, eps_params, digits.test)
    assert loss == pytest.approx(manifest["score"]["test_dsm_loss"], rel=1e-5)
    assert loss < 0.2  # a zero predictor scores 1.0
    accuracy = train.accuracy(clf_net, clf_params, digits.test)
    assert accuracy == pytest.approx(manifest["classifier"]["test_accuracy"])
    assert accuracy > 0.9


def test_shipped_flow_weights_match_their_manifest_and_load_as_a_score(experiment):
    entry = json.loads((networks.WEIGHTS / networks.MANIFEST).read_text())["flow"]
    path = networks.WEIGHTS / entry["file"]
    assert train.sha256(path) == entry["sha256"] and path.stat().st_size < 2e6
    net, params = networks.load_flow()
    test = data_lib.load().test
    loss = train.held_out_flow_loss(net, params, test)
    assert loss == pytest.approx(entry["test_fm_loss"], rel=1e-5)
    # The zero velocity scores 1 + E||x0||^2 / 64 (1.72 here).
    zero = 1.0 + float(np.mean(test.x.astype(np.float64) ** 2))
    assert loss < 0.6 * zero, (loss, zero)
    # As a score on the linear interpolant: at t = 0.99 the data are nearly gone (x0's share of
    # x_t is 0.01), so the score is close to -(x - 0.01 E[x0]) / t^2.
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 64))
    t = jnp.float32(0.99)
    score = jax.jit(networks.flow_score(net, params))(x, t)
    expected = -(x - 0.01 * jnp.asarray(test.x.mean(0))) / t**2
    assert float(jnp.mean((score - expected) ** 2) / jnp.mean(expected**2)) < 0.01
    # The experiments' loader gives the same score (class 3 here).
    np.testing.assert_array_equal(experiment._flow_score(3)(x[:4], t),
                                  networks.flow_score(net, params, 3)(x[:4], t))


def test_shipped_score_is_the_gaussian_score_at_full_noise(shipped):
    """At t = 1 (alpha = 0.0067) the data are gone: score(x) = -x / sigma^2 up to the data's
    alpha-scaled spread, so the network must predict eps = x / sigma closely."""
    _, (eps_net, eps_params, _, _) = shipped
    x = jax.random.normal(jax.random.PRNGKey(1), (256, 64))
    vp = sde.VP()
    score = jax.jit(networks.score(eps_net, eps_params, vp))(x, jnp.float32(1.0))
    expected = -x / vp.sigma2(1.0)
    assert float(jnp.mean((score - expected) ** 2) / jnp.mean(expected**2)) < 0.01


def _classify(shipped, x):
    _, (_, _, clf_net, clf_params) = shipped
    logits, _ = networks.logits_and_features(clf_net, clf_params)(x)
    return np.asarray(jax.nn.softmax(logits))


def test_shipped_samples_cover_the_classes_and_follow_their_condition(shipped):
    """Plain reverse SDE (fkc.anneal at beta = 1: zero weights), 50 steps, one run of 200
    particles: the first 100 unconditional, the last 100 conditioned on class 7. The unconditional
    ones spread over >= 8 classes, none above 30%, each classified confidently; the others
    classify as 7."""
    _, (eps_net, eps_params, _, _) = shipped
    vp, n = sde.VP(), 100

    def eps(x, t):  # first half of the rows unconditional, second half class 7
        m = x.shape[0]
        labels = jnp.where(jnp.arange(m) < m // 2, networks.NULL_LABEL, 7)
        return eps_net.apply(eps_params, x, jnp.full(m, t), labels,
                             jnp.full(m, networks.NULL_THICK))

    model = fkc.anneal(sde.score_from_eps(vp, eps), 1.0, schedule=vp, times=sde.time_grid(50),
                       dim=64)
    result = jax.jit(lambda k: smc.run(k, model, 2 * n, ess_threshold=0.0))(jax.random.PRNGKey(2))
    assert np.all(np.asarray(result.log_weights) == 0.0) and not np.any(result.resampled)
    probs = _classify(shipped, result.particles)
    uncond, seven = probs[:n], probs[n:]
    counts = np.bincount(uncond.argmax(1), minlength=10)
    assert np.sum(counts > 0) >= 8 and counts.max() <= 30, counts
    assert np.median(uncond.max(1)) > 0.9
    assert np.mean(seven.argmax(1) == 7) > 0.9


def test_networks_reject_bad_conditions(shipped):
    _, (eps_net, eps_params, clf_net, clf_params) = shipped
    with pytest.raises(ValueError, match="label"):
        networks.score(eps_net, eps_params, sde.VP(), label=10)
    with pytest.raises(ValueError, match="thick"):
        networks.score(eps_net, eps_params, sde.VP(), thick=2)
    with pytest.raises(ValueError, match="label"):
        networks.reward(clf_net, clf_params, None)
    with pytest.raises(FileNotFoundError, match="train"):
        networks.load_params(clf_net, networks.WEIGHTS / "missing.msgpack")


# ---------------------------------------------------------------------------------------------
# Metrics against closed forms


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.2, 2.0, 5), rng.uniform(0.2, 2.0, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    # Commuting (diagonal) covariances: sum (sqrt a - sqrt b)^2 + ||mu1 - mu2||^2.
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(exact)
    # Non-commuting: against scipy's general matrix square root.
    from scipy.linalg import sqrtm

    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    exact = (np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2)
             - 2 * np.trace(np.real(sqrtm(c1 @ c2))))
    assert metrics.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(exact, rel=1e-8)
    assert metrics.frechet_distance(mu2, c2, mu1, c1) == pytest.approx(exact, rel=1e-8)
    assert metrics.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-9)


def test_weighted_metrics_reduce_to_the_unweighted_ones():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4))
    w = metrics.uniform(30)
    mu, cov = metrics.weighted_moments(x, w)
    np.testing.assert_allclose(mu, x.mean(0))
    np.testing.assert_allclose(cov, np.cov(x, rowvar=False))
    brute = np.mean([np.linalg.norm(x[i] - x[j]) for i in range(30) for j in range(30) if i != j])
    assert metrics.mean_pairwise_distance(x, w) == pytest.approx(brute)
    # Zero weights drop particles exactly.
    w = np.r_[np.full(20, 1 / 20), np.zeros(10)]
    np.testing.assert_allclose(metrics.weighted_moments(x, w)[1], np.cov(x[:20], rowvar=False))
    assert metrics.mean_pairwise_distance(x, w) == pytest.approx(
        metrics.mean_pairwise_distance(x[:20], metrics.uniform(20)))
    assert metrics.mean_pairwise_distance(x, np.eye(30)[3]) == 0.0
    with pytest.raises(ValueError, match="weights"):
        metrics.weighted_mean(x[:, 0], np.full(30, 0.5))


def test_weighted_moments_are_consistent_for_importance_weights():
    """Self-normalised importance sampling from N(0, 1) to N(1, 0.5^2): the weighted mean and
    variance approach (1, 0.25) within a few Monte Carlo errors."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200_000, 1))
    log_w = -0.5 * ((x[:, 0] - 1.0) / 0.5) ** 2 + 0.5 * x[:, 0] ** 2
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    mu, cov = metrics.weighted_moments(x, w)
    n_eff = metrics.ess(w)
    assert abs(mu[0] - 1.0) < 4 * 0.5 / np.sqrt(n_eff)
    assert abs(cov[0, 0] - 0.25) < 4 * 0.25 * np.sqrt(2 / n_eff)


# ---------------------------------------------------------------------------------------------
# The experiments


@pytest.fixture(scope="module")
def experiment():
    from experiments.suites.digits import experiment as module

    return module


def test_evaluate_scores_real_digits_against_themselves(experiment):
    """Real test digits of class 5, scored against their own features: Frechet distance 0,
    accuracy and reward those of the classifier on them, ESS = N; images of class 3 score
    accuracy ~0 for label 5."""
    test = data_lib.load().test
    x = test.x[test.label == 5]
    reference = experiment._reference_features(5)
    out = experiment.evaluate(x, None, 5, reference)
    probs = _classify_x(experiment, x)
    assert out["frechet"] == pytest.approx(0.0, abs=1e-8)
    assert out["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == 5)) and out["accuracy"] > 0.9
    assert out["reward"] == pytest.approx(np.mean(np.log(probs[:, 5])), rel=1e-4)
    assert out["ess"] == pytest.approx(len(x)) and len(out["images"]) == experiment.NUM_IMAGES
    assert experiment.evaluate(test.x[test.label == 3][:20], None, 5, reference)["accuracy"] < 0.1
    # Weights: all of them on one image -> that image's metrics, no covariance, no diversity.
    log_w = np.full(len(x), -np.inf)
    log_w[4] = 0.0
    one = experiment.evaluate(x, log_w, 5, reference)
    assert one["frechet"] is None and one["diversity"] == 0.0 and one["ess"] == 1.0
    assert one["reward"] == pytest.approx(np.log(probs[4, 5]), rel=1e-4)
    assert experiment.evaluate(x, np.full(len(x), np.nan), 5, reference) == {"degenerate": True}
    bad = x.copy()
    bad[2, 7] = np.nan
    assert experiment.evaluate(bad, None, 5, reference) == {"degenerate": True,
                                                            "nonfinite_samples": 1}


def _classify_x(experiment, x):
    logits, _ = experiment._networks()[2](jnp.asarray(x))
    return np.asarray(jax.nn.softmax(logits), np.float64)


def test_best_of_keeps_the_highest_reward_of_each_group(experiment):
    x = np.arange(7, dtype=np.float64)[:, None] * np.ones((1, 2))
    rewards = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.0, 5.0])
    np.testing.assert_array_equal(experiment.best_of(x, rewards, 3)[:, 0], [1.0, 3.0])


TINY_REWARD = {"num_particles": 8, "num_steps": 4, "best_of": 2, "psi_chains": 2,
               "psi_burn_in": 1, "psi_thin": 1}
TINY_FKC = {"num_particles": 8, "num_steps": 4, "guidance_weights": "2"}


def test_digits_reward_at_tiny_size_spends_equal_budgets(experiment):
    config = experiment.RewardConfig(**TINY_REWARD, ess_threshold=0.0)
    out = experiment.run_reward(config, jax.random.PRNGKey(0))
    # T forward passes with their gradient per SMC particle: 8 * 4 * 2.
    assert out["budget"] == out["smc_evaluations"] == out["guidance_evaluations"] == 64
    assert out["best_of_n_evaluations"] == 64 and out["best_of_n_outputs"] == 8
    # Psi-Sampler: its SMC (no guidance) costs T = 4 per particle, its 2 chains 2 per step
    # (burn-in 1, then one step per particle): 10 particles spend 2 * (2 + 10) + 10 * 4 = 64.
    assert out["psi_particles"] == 10 and out["psi_evaluations"] == 2 * (2 + 10) + 10 * 4 == 64
    for method in ("smc", "psi", "guidance", "best_of_n"):
        assert not out[f"{method}_degenerate"]
        assert np.isfinite(out[f"{method}_reward"]) and 0 <= out[f"{method}_accuracy"] <= 1
        assert np.asarray(out[f"images_{method}"]).shape == (experiment.NUM_IMAGES, 64)
    # Uncorrected guidance is the SMC proposal with its weights dropped: without resampling, the
    # same key gives the same particles.
    program, _ = experiment._reward_program(config, None)
    raw = program(jax.random.PRNGKey(0))
    np.testing.assert_array_equal(raw["smc"][0], raw["guidance"])


def test_digits_reward_flow_network_with_neighbours_at_tiny_size(experiment):
    """network=flow: every method on the linear interpolant, its grid inside (0, 1); neighbours:
    DTS, DTS* and RBF, and DriftLite, spend at most the SMC budget and score finite metrics."""
    config = experiment.RewardConfig(**TINY_REWARD, network="flow", neighbours=True,
                                     driftlite=True)
    _, schedule, times = experiment._network(config.network, config.num_steps)
    assert isinstance(schedule, sde.LinearInterpolant) and len(times) == 5
    assert 0.0 < times[-1] < times[0] < 1.0
    out = experiment.run_reward(config, jax.random.PRNGKey(0))
    assert out["budget"] == out["smc_evaluations"] == 64
    # DTS: 16 samples (best-of-N's 16 base samples); RBF: 16 // best_of = 8 particles.
    assert out["dts_outputs"] == 16 and out["dts_star_outputs"] == 1 and out["rbf_outputs"] == 8
    # DriftLite: 6 passes per step and particle (two gradients, one tangent): 64 // 24 = 2.
    drift = ("driftlite_vcg", "driftlite_ecg")
    for method in drift:
        assert out[f"{method}_particles"] == 2 and out[f"{method}_evaluations"] == 48
        assert np.isfinite(out[f"{method}_log_evidence"])
    assert np.isfinite(out["smc_log_evidence"])
    for method in ("smc", "psi", "guidance", "best_of_n", "dts", "dts_star", "rbf") + drift:
        assert 0 < out[f"{method}_evaluations"] <= out["budget"], method
        assert not out[f"{method}_degenerate"], method
        assert np.isfinite(out[f"{method}_reward"]) and 0 <= out[f"{method}_accuracy"] <= 1
        assert np.isfinite(out[f"{method}_diversity"])
    # The tree's first rollout alone costs T = 4; RBF's floor is N (T + 1) = 40.
    assert out["dts_evaluations"] >= 4 and out["rbf_evaluations"] >= 40
    assert out["dts_star_frechet"] is None and np.isfinite(out["dts_frechet"])
    with pytest.raises(experiment.ConfigError, match="RBF"):
        experiment._reward_program(experiment.RewardConfig(**{**TINY_REWARD, "best_of": 1},
                                                           neighbours=True), None)
    with pytest.raises(experiment.ConfigError, match="driftlite"):
        experiment._reward_program(experiment.RewardConfig(**TINY_REWARD, driftlite=True,
                                                           exponents="adaptive"), None)


@pytest.mark.parametrize("network", ["score", "flow"])
def test_digits_fkc_at_tiny_size(experiment, tmp_path, network):
    config = experiment.FKCConfig(**TINY_FKC, network=network)
    out = experiment.run_fkc(config, jax.random.PRNGKey(0))
    assert out["cfg_w2_fkc_evaluations"] == out["cfg_w2_plain_evaluations"] == 8 * 4 * 2
    assert out["product_fkc_evaluations"] == 8 * 4 * 3 and out["joint_evaluations"] == 32
    for method in ("cfg_w2_fkc", "cfg_w2_plain", "product_fkc", "product_plain", "joint"):
        assert not out[f"{method}_degenerate"] and -1e-9 <= out[f"{method}_thick"] <= 1 + 1e-9
    assert out["cfg_w2_fkc_nan_increments"] == 0
    record = {"experiment": "digits_fkc", "config": dataclasses.asdict(config), "seed": 0,
              "metrics": json.loads(json.dumps(out))}
    paths = experiment.plot_grids([record], tmp_path)
    assert len(paths) == 1 and paths[0].stat().st_size > 1000


def test_digits_configs_reject_bad_values(experiment):
    from experiments.harness import config as config_lib
    from experiments.harness import registry

    registry.load(["experiments.suites.digits.experiment"])
    with pytest.raises(config_lib.ConfigError, match="guidance_weights"):
        config_lib.build(experiment.FKCConfig, {}, ["guidance_weights=1,x"])
    with pytest.raises(config_lib.ConfigError, match="alpha"):
        config_lib.build(registry.get("digits_reward").config_type, {}, ["alpha=0"])
