"""Gradients of log Z_hat through smc.run (docs/algorithms.md section 9): the stop-gradient
estimator of Scibior and Wood (2021) against the exact gradient of the Kalman log-likelihood, and a
clear error where the estimator cannot hold.

The linear-Gaussian model of section 1 with F(c) = c R (R the default rotation, c = 0.95): the
exact d log p(y) / dc is a central finite difference of the float64 Kalman filter. Over R
replicate runs (vmap over keys) the mean of d log Z_hat / dc is compared with it by a z-test whose
standard error is the replicates' (log Z_hat is biased at finite N, so is its gradient, by O(1/N):
N = 1024 keeps that below the noise; measured |z| <= 1.7 over 3 seeds). Without the correction
(the engine's new log-weights are plain zeros, as before it) the same check gives |z| of 10 to 50.
"""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smc
from smc import engine
from targets.toy import lgssm
from tests.conftest import z_score
from tests.cpu_devices import forced_cpu_env

NUM_STEPS, NUM_PARTICLES, NUM_REPLICATES = 25, 1024, 200
COEFFICIENT = 0.95
BASE = lgssm.default()
ROTATION = np.asarray(BASE.F) / COEFFICIENT


def with_coefficient(c):
    return BASE._replace(F=c * ROTATION)


@functools.cache
def problem():
    """(observations, exact d log p(y) / dc at c = 0.95)."""
    _, observations = lgssm.simulate(jax.random.PRNGKey(42), BASE, NUM_STEPS)
    y = np.asarray(observations, np.float64)
    h = 1e-5
    upper = lgssm.kalman_log_likelihood(with_coefficient(COEFFICIENT + h), y)
    lower = lgssm.kalman_log_likelihood(with_coefficient(COEFFICIENT - h), y)
    return observations, (upper - lower) / (2 * h)


def replicate_gradients(ess_threshold, scheme, seed=3):
    """(log Z_hat [R], d log Z_hat / dc [R]) over replicate runs."""
    observations, _ = problem()

    def log_evidence(key, c):
        model = lgssm.bootstrap(with_coefficient(c), observations)
        return smc.run(key, model, NUM_PARTICLES, resampling=scheme,
                       ess_threshold=ess_threshold).log_evidence

    run = jax.jit(jax.vmap(jax.value_and_grad(log_evidence, argnums=1), in_axes=(0, None)))
    keys = jax.random.split(jax.random.PRNGKey(seed), NUM_REPLICATES)
    values, gradients = run(keys, jnp.float32(COEFFICIENT))
    return np.asarray(values), np.asarray(gradients, np.float64)


CASES = [(0.5, "systematic"), (1.0, "systematic"), (1.0, "multinomial")]
corrected_gradients = functools.cache(replicate_gradients)


@pytest.mark.parametrize("ess_threshold, scheme", CASES)
def test_gradient_of_log_evidence_matches_the_kalman_gradient(ess_threshold, scheme):
    observations, exact = problem()
    values, gradients = corrected_gradients(ess_threshold, scheme)
    assert np.all(np.isfinite(gradients))
    assert abs(z_score(gradients, exact)) < 4.0
    # The values are those of a run that is not differentiated (up to XLA fusing the two
    # programs differently).
    plain = jax.jit(jax.vmap(lambda key: smc.run(
        key, lgssm.bootstrap(with_coefficient(COEFFICIENT), observations), NUM_PARTICLES,
        resampling=scheme, ess_threshold=ess_threshold).log_evidence))
    keys = jax.random.split(jax.random.PRNGKey(3), NUM_REPLICATES)
    np.testing.assert_allclose(values, plain(keys), rtol=1e-6)


@pytest.mark.parametrize("ess_threshold, scheme", CASES)
def test_removing_the_stop_gradient_correction_fails_the_check(ess_threshold, scheme,
                                                               monkeypatch):
    corrected_values, _ = corrected_gradients(ess_threshold, scheme)
    # The engine before the estimator: resampled log-weights are zeros with no derivative.
    monkeypatch.setattr(engine, "zero_with_gradient", jnp.zeros_like)
    _, exact = problem()
    values, gradients = replicate_gradients(ess_threshold, scheme)
    assert abs(z_score(gradients, exact)) > 6.0
    # The correction changes derivatives only: the same program computes the same values.
    np.testing.assert_array_equal(values, corrected_values)


ISLANDS = textwrap.dedent("""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    import smc
    from tests import test_gradients as g

    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("particles",))
    observations, exact = g.problem()

    def log_evidence(c, key):
        model = g.lgssm.bootstrap(g.with_coefficient(c), observations)
        return smc.run(key, model, g.NUM_PARTICLES, ess_threshold=1.0, mesh=mesh,
                       islands=True).log_evidence

    run = jax.jit(jax.vmap(jax.grad(log_evidence), in_axes=(None, 0)))
    keys = jax.random.split(jax.random.PRNGKey(3), g.NUM_REPLICATES)
    gradients = np.asarray(run(jnp.float32(g.COEFFICIENT), keys), np.float64)
    print("z", g.z_score(gradients, exact))
""")


def test_island_gradients_match_the_kalman_gradient_on_four_devices():
    # Each island's gradient is the estimator's; pooling by evidence keeps it on the pooled cloud.
    env = forced_cpu_env(4)
    done = subprocess.run([sys.executable, "-c", ISLANDS], check=False, env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    z = float(done.stdout.split("z")[-1])
    assert abs(z) < 4.0, z


def tempering_problem(theta):
    def log_likelihood(x):
        return -0.5 * theta * jnp.sum((x - 1.0) ** 2)

    return (lambda key, n: jax.random.normal(key, (n, 2))), log_likelihood


def test_gradient_through_a_weighted_step_model_raises():
    # Adaptive tempering picks the next exponent from the weights: a discrete choice.
    def log_evidence(theta):
        sample_prior, log_likelihood = tempering_problem(theta)
        return smc.tempering.adaptive(jax.random.PRNGKey(0), sample_prior, log_likelihood,
                                      lambda key, x, exponent: x, 64).smc.log_evidence

    with pytest.raises(ValueError, match="weighted_step"):
        jax.grad(log_evidence)(1.0)
    with pytest.raises(ValueError, match="weighted_step"):
        jax.jvp(log_evidence, (1.0,), (1.0,))
    assert np.isfinite(log_evidence(1.0))


def rwmh(theta):
    """One random-walk MH step invariant for N(0, I) * L_theta^exponent."""
    _, log_likelihood = tempering_problem(theta)

    def log_target(x, exponent):
        return -0.5 * jnp.sum(x ** 2, 1) + exponent * jax.vmap(log_likelihood)(x)

    def move(key, x, exponent):
        key_proposal, key_accept = jax.random.split(key)
        proposal = x + 0.5 * jax.random.normal(key_proposal, x.shape)
        log_ratio = log_target(proposal, exponent) - log_target(x, exponent)
        accept = jnp.log(jax.random.uniform(key_accept, log_ratio.shape)) < log_ratio
        return jnp.where(accept[:, None], proposal, x)

    return move


def test_gradient_through_an_mh_move_raises():
    def log_evidence(theta):
        sample_prior, log_likelihood = tempering_problem(theta)

        def step(key, x, t):
            return x, jax.vmap(log_likelihood)(x) / 2.0

        model = smc.FeynmanKac(lambda key, n: (sample_prior(key, n), jnp.zeros(n)), step, 2,
                               move=lambda key, x, t: rwmh(theta)(key, x, t / 2.0))
        return smc.run(jax.random.PRNGKey(0), model, 64, ess_threshold=1.0).log_evidence

    with pytest.raises(ValueError, match="MH move"):
        jax.grad(log_evidence)(1.0)
    assert np.isfinite(log_evidence(1.0))


def test_gradient_through_fixed_tempering_with_an_mh_move_raises():
    # The move runs inside the model's step, where the engine cannot see it: tempering marks it.
    def log_evidence(theta):
        sample_prior, log_likelihood = tempering_problem(theta)
        model = smc.tempering.fixed([0.0, 0.5, 1.0], sample_prior, log_likelihood, rwmh(theta))
        return smc.run(jax.random.PRNGKey(0), model, 64, ess_threshold=1.0).log_evidence

    with pytest.raises(ValueError, match="MH move"):
        jax.grad(log_evidence)(1.0)
    assert np.isfinite(log_evidence(1.0))
