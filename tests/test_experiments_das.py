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
            "reward_smc", "psi", "guidance_uncorrected", "best_of_n", "base"}


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


def test_bad_configs_are_refused():
    experiment = registry.get("das_grid")
    with pytest.raises(config_lib.ConfigError):
        config_lib.build(experiment.config_type, {}, ["method=best_of_n", "num_particles=30",
                                                      "best_of=8"])
    with pytest.raises(config_lib.ConfigError):
        config_lib.build(experiment.config_type, {}, ["method=psi", "num_particles=30"])
    with pytest.raises(config_lib.ConfigError):
        config_lib.build(experiment.config_type, {}, ["alpha=0"])
