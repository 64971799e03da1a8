"""The SMC engine: exact log Z on a linear-Gaussian model, weights, traces, loops, bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smc
from targets.toy import lgssm
from tests.conftest import z_score

NUM_REPLICATES = 200


@functools.cache
def lgssm_problem(num_steps: int):
    model = lgssm.default()
    _, observations = lgssm.simulate(jax.random.PRNGKey(42), model, num_steps)
    return model, observations, lgssm.kalman_log_likelihood(model, np.asarray(observations))


def replicate_log_evidence(fk, num_particles, ess_threshold, resampling=None, seed=1):
    resampling = resampling or smc.resampling.systematic
    run = jax.jit(jax.vmap(lambda key: smc.run(key, fk, num_particles, resampling=resampling,
                                               ess_threshold=ess_threshold)))
    keys = jax.random.split(jax.random.PRNGKey(seed), NUM_REPLICATES)
    return run(keys)


@pytest.mark.parametrize("ess_threshold", [0.5, 1.0])
@pytest.mark.parametrize("scheme", ["systematic", "multinomial"])
def test_bootstrap_evidence_is_unbiased(ess_threshold, scheme):
    model, observations, exact = lgssm_problem(25)
    result = replicate_log_evidence(lgssm.bootstrap(model, observations), 512, ess_threshold,
                                    smc.resampling.get(scheme))
    log_z = np.asarray(result.log_evidence, np.float64)
    assert np.all(np.isfinite(log_z))
    ratio = np.exp(log_z - exact)
    # Z_hat / Z has mean 1: a z-test over the replicates.
    assert abs(z_score(ratio, 1.0)) < 4.0
    # Each log Z_hat is within Monte Carlo error of the truth; the spread is what it should be.
    assert np.std(log_z) < 0.5
    assert abs(np.mean(log_z) - exact) < 4 * np.std(log_z) / np.sqrt(log_z.size) + np.var(log_z)
    if ess_threshold == 1.0:
        assert bool(np.all(result.resampled))
    else:
        assert 0 < np.mean(result.resampled) < 1


def test_importance_sampling_without_resampling_is_unbiased():
    model, observations, exact = lgssm_problem(4)
    result = replicate_log_evidence(lgssm.bootstrap(model, observations), 512, 0.0)
    assert not np.any(result.resampled)
    assert abs(z_score(np.exp(np.asarray(result.log_evidence, np.float64) - exact), 1.0)) < 4.0


def test_evidence_increments_add_up_and_more_particles_shrink_the_error():
    model, observations, exact = lgssm_problem(25)
    fk = lgssm.bootstrap(model, observations)
    errors = []
    for n in (64, 1024):
        result = replicate_log_evidence(fk, n, 0.5, seed=3)
        np.testing.assert_allclose(result.log_evidence,
                                   np.sum(result.log_evidence_increments, axis=1), rtol=1e-4)
        errors.append(np.sqrt(np.mean((np.asarray(result.log_evidence) - exact) ** 2)))
    # The root-mean-square error falls like 1/sqrt(N): 16x particles, about 4x smaller.
    assert errors[1] < errors[0] / 2.5


def test_filtering_mean_matches_kalman():
    model, observations, _ = lgssm_problem(10)
    y = np.asarray(observations, np.float64)
    mean, cov = model.m0, model.P0
    for t in range(y.shape[0]):
        if t > 0:
            mean, cov = model.F @ mean, model.F @ cov @ model.F.T + model.Q
        s = model.H @ cov @ model.H.T + model.R
        gain = cov @ model.H.T @ np.linalg.inv(s)
        mean, cov = mean + gain @ (y[t] - model.H @ mean), cov - gain @ model.H @ cov
    result = replicate_log_evidence(lgssm.bootstrap(model, observations), 512, 0.5)
    weights = jax.vmap(smc.weights.normalize)(result.log_weights)
    estimates = np.einsum("rn,rnd->rd", np.asarray(weights), np.asarray(result.particles))
    standard_error = estimates.std(axis=0, ddof=1) / np.sqrt(estimates.shape[0])
    assert np.all(np.abs(estimates.mean(axis=0) - mean) < 4 * standard_error + 1e-3)


def counting_model(num_steps=5, increment=0.0, done=None, move=None):
    """Particles carry a step counter; increments are a fixed function of the particle index."""

    def init(key, n):
        return {"x": jax.random.normal(key, (n, 2)), "count": jnp.zeros(n, jnp.int32)}, jnp.zeros(n)

    def step(key, particles, t):
        n = particles["count"].shape[0]
        x = particles["x"] + jax.random.normal(key, particles["x"].shape)
        log_increments = increment * jnp.linspace(-1.0, 1.0, n)
        return {"x": x, "count": particles["count"] + 1}, log_increments

    return smc.FeynmanKac(init=init, step=step, num_steps=num_steps, done=done, move=move)


def test_same_key_same_result_and_jit_vmap_match_eager():
    model, observations, _ = lgssm_problem(10)
    fk = lgssm.bootstrap(model, observations)
    key = jax.random.PRNGKey(7)
    eager = smc.run(key, fk, 128)
    again = smc.run(key, fk, 128)
    jitted = jax.jit(lambda k: smc.run(k, fk, 128))(key)
    batched = jax.vmap(lambda k: smc.run(k, fk, 128))(jnp.stack([key, key]))
    for a, b in [(eager, again), (eager, jitted)]:
        jax.tree_util.tree_map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5),
                               a, b)
    for leaf_eager, leaf_batched in zip(jax.tree_util.tree_leaves(eager),
                                        jax.tree_util.tree_leaves(batched)):
        np.testing.assert_allclose(leaf_eager, leaf_batched[1], rtol=1e-5, atol=1e-5)
    other = smc.run(jax.random.PRNGKey(8), fk, 128)
    assert not np.allclose(eager.particles, other.particles)


def test_thresholds_zero_and_one_never_and_always_resample():
    fk = counting_model(num_steps=6, increment=3.0)
    never = smc.run(jax.random.PRNGKey(0), fk, 64, ess_threshold=0.0)
    always = smc.run(jax.random.PRNGKey(0), fk, 64, ess_threshold=1.0)
    assert not np.any(never.resampled) and np.all(always.resampled)
    assert never.ess.shape == (7,) and always.resampled.shape == (6,)
    # Without resampling the weights keep accumulating: ESS falls step after step.
    assert np.all(np.diff(np.asarray(never.ess)[1:]) <= 1e-3)


def test_move_runs_after_each_resampling_only():
    def move(key, particles, t):
        return {"x": particles["x"], "count": particles["count"] + 100}

    fk = counting_model(num_steps=6, increment=1.5, move=move)
    result = smc.run(jax.random.PRNGKey(1), fk, 64, ess_threshold=0.5)
    moves = int(np.sum(result.resampled))
    assert 0 < moves < 6
    np.testing.assert_array_equal(result.particles["count"], 6 + 100 * moves)


def test_while_loop_stops_when_done():
    fk = counting_model(num_steps=20, done=lambda p: p["count"] >= 7)
    result = jax.jit(lambda k: smc.run(k, fk, 32, record_ancestors=True))(jax.random.PRNGKey(0))
    assert int(result.num_steps) == 7
    np.testing.assert_array_equal(result.particles["count"], 7)
    assert result.ess.shape == (21,) and result.ancestors.shape == (20, 32)
    np.testing.assert_allclose(result.ess[:8], 32.0, rtol=1e-5)


def test_ancestors_are_recorded_and_identity_without_resampling():
    fk = counting_model(num_steps=4, increment=2.0)
    result = smc.run(jax.random.PRNGKey(2), fk, 16, ess_threshold=1.0, record_ancestors=True)
    assert result.ancestors.shape == (4, 16) and result.ancestors.dtype == jnp.int32
    none = smc.run(jax.random.PRNGKey(2), fk, 16, ess_threshold=0.0, record_ancestors=True)
    np.testing.assert_array_equal(none.ancestors, np.broadcast_to(np.arange(16), (4, 16)))
    assert smc.run(jax.random.PRNGKey(2), fk, 16).ancestors is None


def test_all_weights_zero_is_flagged_degenerate_not_nan():
    def step(key, x, t):
        return x + 1.0, jnp.where(t >= 2, -jnp.inf, 0.0) * jnp.ones(x.shape[0])

    fk = smc.FeynmanKac(init=lambda k, n: (jax.random.normal(k, (n, 1)), jnp.zeros(n)),
                        step=step, num_steps=5)
    result = smc.run(jax.random.PRNGKey(0), fk, 32, ess_threshold=1.0)
    assert bool(result.degenerate)
    assert np.isneginf(result.log_evidence)
    assert not np.any(np.isnan(result.particles))
    assert not np.any(np.isnan(result.ess))
    assert float(result.ess[-1]) == 0.0


def test_nan_increments_are_reported():
    def step(key, x, t):
        return x, jnp.where((jnp.arange(x.shape[0]) == 3) & (t == 1), jnp.nan, 0.0)

    fk = smc.FeynmanKac(init=lambda k, n: (jnp.zeros((n, 1)), jnp.zeros(n)), step=step, num_steps=3)
    result = smc.run(jax.random.PRNGKey(0), fk, 8)
    np.testing.assert_array_equal(result.nonfinite_increments, [0, 0, 1, 0])
    assert np.isnan(result.log_evidence)


def toy_init(key, n):
    return jnp.zeros((n, 2)), jnp.zeros(n)


def toy_step(key, x, t):
    return x, jnp.zeros(x.shape[0])


@pytest.mark.parametrize("num_particles, error", [(0, ValueError), (-3, ValueError),
                                                  (2.5, TypeError), (True, TypeError)])
def test_bad_particle_counts(num_particles, error):
    fk = smc.FeynmanKac(init=toy_init, step=toy_step, num_steps=2)
    with pytest.raises(error, match="num_particles"):
        smc.run(jax.random.PRNGKey(0), fk, num_particles)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_bad_threshold(threshold):
    fk = smc.FeynmanKac(init=toy_init, step=toy_step, num_steps=2)
    with pytest.raises(ValueError, match="ess_threshold"):
        smc.run(jax.random.PRNGKey(0), fk, 8, ess_threshold=threshold)


@pytest.mark.parametrize("init, step, message", [
    (lambda k, n: (jnp.zeros((n + 1, 2)), jnp.zeros(n)), toy_step, "leading axis"),
    (lambda k, n: (jnp.zeros((n, 2)), jnp.zeros((n, 1))), toy_step, "log-weights"),
    (lambda k, n: (jnp.zeros((n, 2)), jnp.zeros(n, jnp.int32)), toy_step, "floating"),
    (toy_init, lambda k, x, t: (x, jnp.zeros(x.shape[0] + 1)), "step: log-weights"),
    (toy_init, lambda k, x, t: (x[:, :1], jnp.zeros(x.shape[0])), "step changed"),
    (toy_init, lambda k, x, t: ({"x": x}, jnp.zeros(x.shape[0])), "structure"),
])
def test_bad_shapes_are_caught_before_running(init, step, message):
    fk = smc.FeynmanKac(init=init, step=step, num_steps=2)
    with pytest.raises((ValueError, TypeError), match=message):
        smc.run(jax.random.PRNGKey(0), fk, 8)


def test_bad_done_and_move_are_caught():
    with pytest.raises(ValueError, match="done"):
        smc.run(jax.random.PRNGKey(0), smc.FeynmanKac(toy_init, toy_step, 2, done=lambda x: x), 8)
    with pytest.raises(ValueError, match="move"):
        smc.run(jax.random.PRNGKey(0),
                smc.FeynmanKac(toy_init, toy_step, 2, move=lambda k, x, t: x[:2]), 8)


def test_resample_mask_vetoes_resampling_outside_the_window():
    window = np.arange(6) < 3
    fk = counting_model(num_steps=6, increment=3.0)._replace(resample_mask=window)
    for threshold in (0.5, 1.0):
        result = smc.run(jax.random.PRNGKey(0), fk, 64, ess_threshold=threshold)
        assert not np.any(np.asarray(result.resampled)[~window])
        if threshold == 1.0:
            assert np.all(np.asarray(result.resampled)[window])
    with pytest.raises(ValueError, match="resample_mask"):
        smc.run(jax.random.PRNGKey(0), fk._replace(resample_mask=np.ones(5, bool)), 8)


def test_weighted_step_sees_the_current_log_weights_after_resampling():
    def step(key, particles, t, log_weights):
        n = log_weights.shape[0]
        return {"x": particles["x"], "seen": log_weights}, jnp.linspace(-1.0, 1.0, n) * (t + 1.0)

    def init(key, n):
        return {"x": jnp.zeros((n, 1)), "seen": jnp.zeros(n)}, jnp.linspace(0.0, 0.5, n)

    fk = smc.FeynmanKac(init=init, step=step, num_steps=3, weighted_step=True)
    summary = lambda particles, log_weights: particles["seen"]
    never = smc.run(jax.random.PRNGKey(0), fk, 8, ess_threshold=0.0, summary=summary)
    # Without resampling, step t sees G_0 + ... + G_{t-1}: the log-weights before it.
    increments = np.linspace(-1.0, 1.0, 8)[None] * np.arange(1.0, 4.0)[:, None]
    expected = np.cumsum(np.r_[np.linspace(0.0, 0.5, 8)[None], increments], axis=0)
    np.testing.assert_allclose(never.summaries[1:], expected[:3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(never.log_weights, expected[3], rtol=1e-6, atol=1e-6)
    # Resampling before every step resets the weights the step sees.
    always = smc.run(jax.random.PRNGKey(0), fk, 8, ess_threshold=1.0)
    np.testing.assert_array_equal(always.particles["seen"], np.zeros(8))


def test_weighted_step_is_checked_before_running():
    with pytest.raises(TypeError, match="weighted_step"):
        smc.run(jax.random.PRNGKey(0), smc.FeynmanKac(toy_init, toy_step, 2, weighted_step=1), 8)
    # A step that does not take the log-weights fails when traced, before anything runs.
    with pytest.raises(TypeError):
        smc.run(jax.random.PRNGKey(0),
                smc.FeynmanKac(toy_init, toy_step, 2, weighted_step=True), 8)
    fk = smc.FeynmanKac(toy_init, lambda k, x, t, w: (x, w[:3]), 2, weighted_step=True)
    with pytest.raises(ValueError, match="step: log-weights"):
        smc.run(jax.random.PRNGKey(0), fk, 8)


def count_and_total(particles, log_weights):
    return {"count": particles["count"][0],
            "total": jax.scipy.special.logsumexp(log_weights)}


def test_summaries_are_recorded_after_init_and_every_step():
    fk = counting_model(num_steps=6, increment=1.0)
    result = smc.run(jax.random.PRNGKey(0), fk, 16, ess_threshold=0.0, summary=count_and_total)
    np.testing.assert_array_equal(result.summaries["count"], np.arange(7))
    np.testing.assert_allclose(result.summaries["total"][0], np.log(16.0), rtol=1e-6)
    np.testing.assert_allclose(result.summaries["total"][-1],
                               jax.scipy.special.logsumexp(result.log_weights), rtol=1e-6)
    assert smc.run(jax.random.PRNGKey(0), fk, 16).summaries is None
    with pytest.raises(TypeError, match="summary"):
        smc.run(jax.random.PRNGKey(0), fk, 16, summary="count")


def test_summaries_in_the_while_loop_are_padded_and_vmap():
    fk = counting_model(num_steps=20, done=lambda p: p["count"] >= 7)
    run = jax.jit(jax.vmap(lambda k: smc.run(k, fk, 32, summary=count_and_total)))
    result = run(jax.random.split(jax.random.PRNGKey(0), 3))
    assert result.summaries["count"].shape == (3, 21)
    np.testing.assert_array_equal(result.summaries["count"],
                                  np.broadcast_to(np.r_[np.arange(8), np.zeros(13)], (3, 21)))
    np.testing.assert_allclose(result.summaries["total"][:, :8], np.log(32.0), rtol=1e-6)
    np.testing.assert_array_equal(result.summaries["total"][:, 8:], 0.0)


@pytest.mark.parametrize("bad, steps", [(-jnp.inf, 3), (jnp.nan, 3)])
def test_while_loop_stops_once_the_cloud_is_dead_or_nan(bad, steps):
    def step(key, x, t):
        # From step 2 on: every weight zero, or one NaN weight; `done` never holds.
        kill = (t >= 2) & ((jnp.arange(x.shape[0]) == 0) | jnp.isneginf(bad))
        return x + 1.0, jnp.where(kill, bad, 0.0)

    fk = smc.FeynmanKac(init=lambda k, n: (jnp.zeros((n, 1)), jnp.zeros(n)), step=step,
                        num_steps=20, done=lambda x: x[:, 0] >= 100.0)
    result = jax.jit(lambda k: smc.run(k, fk, 8, ess_threshold=1.0))(jax.random.PRNGKey(0))
    assert int(result.num_steps) == steps
    np.testing.assert_array_equal(result.particles, steps)
    if jnp.isneginf(bad):
        assert bool(result.degenerate)
    else:
        assert np.isnan(result.log_evidence) and int(result.nonfinite_increments.sum()) == 1
