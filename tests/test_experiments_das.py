"""The DAS experiments (experiments/das.py) register, run and report what they promise."""
import dataclasses

import jax
import pytest

from experiments.harness import config as config_lib
from experiments.harness import registry

registry.load(["experiments.suites.das"])


def test_both_toys_are_registered_with_demos():
    for name in ("das_grid", "das_ring"):
        experiment = registry.get(name)
        assert experiment.demo is not None
        assert set(experiment.demo.full.grid["method"]) == {
            "reward_smc", "psi", "guidance_uncorrected", "best_of_n", "base", "fkc_product",
            "driftlite_vcg", "driftlite_ecg", "dts", "dts_star", "rbf"}


def test_methods_at_equal_score_evaluations_report_their_metrics():
    experiment = registry.get("das_ring")
    base = dataclasses.replace(experiment.default_config(), num_particles=32, num_steps=5)
    smc_metrics = experiment.run(dataclasses.replace(base, method="reward_smc"),
                                 jax.random.PRNGKey(0))
    bon_metrics = experiment.run(dataclasses.replace(base, method="best_of_n", best_of=8),
                                 jax.random.PRNGKey(0))
    assert smc_metrics["score_evals"] == bon_metrics["score_evals"] == 32 * 5
    assert smc_metrics["score_vjps"] == 0
    assert abs(smc_metrics["exact_mean_reward"] - (-1.34)) < 0.005
    assert 0 < smc_metrics["ess_final"] <= 1 and "log_evidence" in smc_metrics
    assert bon_metrics["ess_final"] == pytest.approx(4 / 32)  # 4 outputs of 32 samples
    assert "log_evidence" not in bon_metrics
    for metrics in (smc_metrics, bon_metrics):
        assert metrics["sw"] > 0 and metrics["sw_floor"] > 0
        assert metrics["nonfinite_increments"] == 0


def test_the_neighbours_spend_at_most_the_same_budget_and_report_diversity():
    """fkc_product, driftlite_vcg, dts, dts_star and rbf at N x T = 16 x 4 score evaluations:
    what each returns (outputs, weights) and spends, and the diversity metric against the
    target's (driftlite also spends a second evaluation and derivatives: score_vjps)."""
    experiment = registry.get("das_ring")
    base = dataclasses.replace(experiment.default_config(), num_particles=16, num_steps=4,
                               best_of=4, branching=2)
    outputs = {"fkc_product": 16, "driftlite_vcg": 16, "dts": 16, "dts_star": 1, "rbf": 4}
    for method, count in outputs.items():
        metrics = experiment.run(dataclasses.replace(base, method=method), jax.random.PRNGKey(0))
        # driftlite (transition weights): the rate's evaluation and reward SMC's, at each step
        spent = 16 * 4 * (2 if method == "driftlite_vcg" else 1)
        assert 0 < metrics["score_evals"] <= spent, (method, metrics["score_evals"])
        assert (metrics["score_vjps"] > 0) == (method == "driftlite_vcg"), method
        # ess_final is the outputs' ESS over N: equal weights on `count` outputs give count / N
        if method not in ("fkc_product", "driftlite_vcg"):
            assert metrics["ess_final"] == pytest.approx(count / 16), method
        assert 1.0 <= metrics["modes"] <= 8.0 and metrics["sw"] > 0, (method, metrics)
        assert metrics["exact_modes"] == pytest.approx(1.84, abs=0.01)
        assert ("log_evidence" in metrics) == (method == "driftlite_vcg")
        assert metrics["nonfinite_increments"] == 0


def test_the_reward_as_a_gaussian_expert_is_the_reward():
    """fkc_product's second expert: log N(x; c, alpha A^-1) - r(x) / alpha is one constant."""
    from experiments.suites import das as suite
    from targets.toy import das, gmm
    toy = das.ring(alpha=0.7)
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 2)) * 3
    gap = gmm.log_prob(suite.reward_expert(toy), x) - toy.reward(x) / toy.alpha
    assert float(gap.max() - gap.min()) < 1e-4


def test_bad_configs_are_refused():
    experiment = registry.get("das_grid")
    with pytest.raises(config_lib.ConfigError):
        config_lib.build(experiment.config_type, {}, ["method=best_of_n", "num_particles=30",
                                                      "best_of=8"])
    with pytest.raises(config_lib.ConfigError):
        config_lib.build(experiment.config_type, {}, ["method=psi", "num_particles=30"])
    with pytest.raises(config_lib.ConfigError):
        config_lib.build(experiment.config_type, {}, ["alpha=0"])
    with pytest.raises(config_lib.ConfigError):
        config_lib.build(experiment.config_type, {}, ["method=rbf", "best_of=1"])
