"""Tempering a Gaussian prior to an asymmetric Gaussian-mixture likelihood: exact evidence."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smc
from proposals import mcmc
from targets.toy import gaussian
from tests.conftest import z_score

PROBLEM = gaussian.default()
EXACT_LOG_Z = gaussian.log_evidence(PROBLEM)
LOG_PRIOR = gaussian.log_prior(PROBLEM)
LOG_LIKELIHOOD = gaussian.log_likelihood(PROBLEM)
SAMPLE_PRIOR = gaussian.sample_prior(PROBLEM)


def rwmh_move(key, x, exponent, num_steps=5, step_size=0.6):
    """num_steps of random-walk MH invariant for prior * L^exponent."""
    def log_density(z):
        return LOG_PRIOR(z) + exponent * LOG_LIKELIHOOD(z)

    kernel = functools.partial(mcmc.rwmh, log_density=log_density, step_size=step_size)
    return mcmc.run_chain(key, kernel, x, num_steps).x


def one_rwmh_step(key, x, exponent):
    return rwmh_move(key, x, exponent, num_steps=1)


def weighted_means(result):
    weights = jax.vmap(smc.weights.normalize)(result.log_weights)
    return np.einsum("rn,rnd->rd", np.asarray(weights), np.asarray(result.particles))


def check_exact(result, num_replicates):
    log_z = np.asarray(result.log_evidence, np.float64)
    assert log_z.shape == (num_replicates,) and np.all(np.isfinite(log_z))
    assert abs(z_score(np.exp(log_z - EXACT_LOG_Z), 1.0)) < 4.0
    assert abs(np.mean(log_z) - EXACT_LOG_Z) < 4 * np.std(log_z) / np.sqrt(log_z.size) + np.var(log_z)
    exact_mean, _ = gaussian.posterior_moments(PROBLEM)
    means = weighted_means(result)
    standard_error = means.std(axis=0, ddof=1) / np.sqrt(means.shape[0])
    assert np.all(np.abs(means.mean(axis=0) - exact_mean) < 4 * standard_error + 0.01)


def test_exact_answers_are_consistent():
    # A wide Monte Carlo check of the closed forms themselves: prior sampling of L.
    x = SAMPLE_PRIOR(jax.random.PRNGKey(0), 400_000)
    log_l = np.asarray(jax.vmap(LOG_LIKELIHOOD)(x), np.float64)
    estimate = np.log(np.mean(np.exp(log_l)))
    assert abs(estimate - EXACT_LOG_Z) < 0.02
    w = np.exp(log_l - log_l.max())
    mean, _ = gaussian.posterior_moments(PROBLEM)
    np.testing.assert_allclose(w @ np.asarray(x) / w.sum(), mean, atol=0.03)


def test_next_exponent_hits_the_conditional_ess_on_the_weighted_cloud():
    key_x, key_w = jax.random.split(jax.random.PRNGKey(3))
    x = SAMPLE_PRIOR(key_x, 1000)
    log_l = jax.vmap(LOG_LIKELIHOOD)(x)
    log_weights = 0.5 * jax.random.normal(key_w, (1000,)) + 0.3 * x[:, 0]
    exponent = jnp.asarray(0.1)
    new = smc.tempering.next_exponent(log_weights, log_l, exponent, 0.5)
    cess = smc.weights.conditional_ess(log_weights, (new - exponent) * log_l)
    assert 0.1 < float(new) < 1.0
    np.testing.assert_allclose(cess, 500.0, rtol=1e-3)
    # Solving on the unweighted cloud (blackjax's choice) gives another exponent.
    unweighted = smc.tempering.next_exponent(jnp.zeros(1000), log_l, exponent, 0.5)
    assert abs(float(unweighted) - float(new)) > 1e-3
    # The whole remaining step is taken when it keeps the CESS high enough.
    assert float(smc.tempering.next_exponent(log_weights, 1e-4 * log_l, exponent, 0.5)) == 1.0


def test_adaptive_tempering_estimates_evidence_and_posterior():
    run = jax.jit(jax.vmap(lambda k: smc.tempering.adaptive(
        k, SAMPLE_PRIOR, LOG_LIKELIHOOD, rwmh_move, 512, target_ess=0.8, ess_threshold=0.5)))
    out = run(jax.random.split(jax.random.PRNGKey(11), 200))
    np.testing.assert_allclose(out.exponents[np.arange(200), out.smc.num_steps], 1.0)
    assert np.all(out.smc.num_steps >= 4)
    check_exact(out.smc, 200)


def test_waste_free_tempering_estimates_evidence_and_posterior():
    run = jax.jit(jax.vmap(lambda k: smc.tempering.adaptive(
        k, SAMPLE_PRIOR, LOG_LIKELIHOOD, one_rwmh_step, 512, waste_free_chains=64)))
    out = run(jax.random.split(jax.random.PRNGKey(12), 200))
    assert np.all(out.smc.resampled[np.arange(200), 0])
    check_exact(out.smc, 200)


def test_fixed_schedule_evidence_is_unbiased():
    model = smc.tempering.fixed(np.linspace(0.0, 1.0, 11) ** 2, SAMPLE_PRIOR, LOG_LIKELIHOOD,
                                rwmh_move)
    run = jax.jit(jax.vmap(lambda k: smc.run(k, model, 256, ess_threshold=0.5)))
    check_exact(run(jax.random.split(jax.random.PRNGKey(13), 200)), 200)


def test_bad_tempering_arguments():
    with pytest.raises(ValueError, match="target_ess"):
        smc.tempering.adaptive(jax.random.PRNGKey(0), SAMPLE_PRIOR, LOG_LIKELIHOOD, rwmh_move, 64,
                               target_ess=1.5)
    with pytest.raises(ValueError, match="waste_free_chains"):
        smc.tempering.adaptive(jax.random.PRNGKey(0), SAMPLE_PRIOR, LOG_LIKELIHOOD, rwmh_move, 64,
                               waste_free_chains=5)
    with pytest.raises(ValueError, match="schedule"):
        smc.tempering.fixed([1.0], SAMPLE_PRIOR, LOG_LIKELIHOOD, rwmh_move)
    with pytest.raises(ValueError, match="non-decreasing"):
        smc.tempering.fixed([0.0, 0.7, 0.5, 1.0], SAMPLE_PRIOR, LOG_LIKELIHOOD, rwmh_move)


@pytest.mark.parametrize("exponents, message", [([0.0, np.nan, 1.0], "exponents must be finite"),
                                                ([0.0, 0.3], "exponents must end at 1")])
def test_fixed_schedules_must_be_finite_and_end_at_one(exponents, message):
    with pytest.raises(ValueError, match=message):
        smc.tempering.fixed(exponents, SAMPLE_PRIOR, LOG_LIKELIHOOD, rwmh_move)


def test_adaptive_model_picks_each_exponent_on_the_current_weighted_cloud():
    # Never resampling, the weights the step sees are everything before it: each exponent must
    # hit the target conditional ESS on them (the last one may stop short of it at lambda = 1).
    model = smc.tempering.adaptive_model(SAMPLE_PRIOR, LOG_LIKELIHOOD, rwmh_move, target_ess=0.7,
                                         max_steps=30)

    def summary(particles, log_weights):
        return particles.exponent[0], log_weights, jax.vmap(LOG_LIKELIHOOD)(particles.x)

    result = jax.jit(lambda k: smc.run(k, model, 1000, ess_threshold=0.0, summary=summary))(
        jax.random.PRNGKey(5))
    exponents, log_weights, log_l = result.summaries
    steps = int(result.num_steps)
    assert 3 <= steps < 30 and float(exponents[steps]) == 1.0
    assert np.all(np.diff(np.asarray(exponents[:steps + 1])) > 0)
    for s in range(steps - 1):
        cess = smc.weights.conditional_ess(log_weights[s],
                                           (exponents[s + 1] - exponents[s]) * log_l[s + 1])
        np.testing.assert_allclose(cess, 700.0, rtol=1e-3)
    assert not np.any(result.resampled)


def test_waste_free_resampling_tiles_the_draws_into_chains():
    log_weights = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4, 0.0, 0.0, 0.0, 0.0]))
    resample = smc.tempering.waste_free_resampling(smc.resampling.systematic, 2)
    draws = np.stack([resample(k, log_weights)
                      for k in jax.random.split(jax.random.PRNGKey(0), 2000)])
    np.testing.assert_array_equal(draws[:, 2:], np.tile(draws[:, :2], 3))
    offspring = np.stack([np.bincount(d, minlength=8) for d in draws])
    mean, se = offspring.mean(0), offspring.std(0, ddof=1) / np.sqrt(offspring.shape[0])
    assert np.all(np.abs(mean - 8 * np.exp(log_weights)) <= 4 * se + 1e-6)
