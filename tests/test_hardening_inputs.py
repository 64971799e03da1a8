"""Bad or extreme input never gives a silent wrong answer: resamplers, SDE schedules, MCMC.

Resamplers must return valid int32 indices for any log-weights (+inf, NaN, all -inf, mixed);
schedules, time grids and MCMC tuning parameters must be refused with an error naming them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proposals import mcmc
from smc import resampling
from targets.diffusion import fkc, sde

SCHEMES = sorted(resampling.SCHEMES)
FLEXIBLE = [s for s in SCHEMES if s != "killing"]  # those that take num_samples != N
N = 8
INF, NAN = np.inf, np.nan


def _sizes(scheme: str) -> list[int]:
    return [N] if scheme == "killing" else [N, 3, 13]


def _identity(m: int, n: int = N) -> np.ndarray:
    return np.arange(m) % n


# --- resamplers: +inf, NaN, all -inf ---------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resamplers_give_every_draw_to_a_single_infinite_log_weight(scheme: str) -> None:
    log_weights = jnp.zeros(N).at[3].set(INF)
    for m in _sizes(scheme):
        ancestors = resampling.get(scheme)(jax.random.key(0), log_weights, m)
        assert ancestors.dtype == jnp.int32
        np.testing.assert_array_equal(ancestors, np.full(m, 3))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resamplers_share_draws_among_infinite_log_weights_only(scheme: str) -> None:
    log_weights = jnp.asarray([0.0, INF, -INF, 5.0, 1e30, INF, -3.0, INF], jnp.float32)
    for m in _sizes(scheme):
        for seed in range(5):
            ancestors = np.asarray(resampling.get(scheme)(jax.random.key(seed), log_weights, m))
            assert ancestors.shape == (m,) and set(ancestors) <= {1, 5, 7}


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(
    "log_weights",
    [
        np.full(N, -INF),
        np.full(N, NAN),
        np.r_[0.0, 0.0, NAN, np.zeros(N - 3)],
        [INF, -INF, NAN, 0.0, INF, 1.0, -INF, 2.0],  # NaN wins over +inf
    ],
    ids=["all_dead", "all_nan", "one_nan", "nan_and_inf"],
)
def test_resamplers_return_the_identity_for_nan_or_all_dead_log_weights(scheme, log_weights):
    log_weights = jnp.asarray(log_weights, jnp.float32)
    for m in _sizes(scheme):
        ancestors = resampling.get(scheme)(jax.random.key(1), log_weights, m)
        assert ancestors.dtype == jnp.int32
        np.testing.assert_array_equal(ancestors, _identity(m))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resamplers_handle_each_degenerate_row_of_a_vmapped_batch(scheme: str) -> None:
    rows = jnp.asarray(
        [np.zeros(N), np.full(N, -INF), np.r_[np.zeros(N - 1), NAN], np.r_[np.zeros(N - 1), INF]],
        jnp.float32,
    )
    keys = jax.random.split(jax.random.key(2), rows.shape[0])
    batched = np.asarray(jax.jit(jax.vmap(resampling.get(scheme)))(keys, rows))
    assert np.all((batched[0] >= 0) & (batched[0] < N))
    np.testing.assert_array_equal(batched[1], _identity(N))
    np.testing.assert_array_equal(batched[2], _identity(N))
    np.testing.assert_array_equal(batched[3], np.full(N, N - 1))


_any_log_weight = st.one_of(
    st.sampled_from([INF, -INF, NAN]),
    st.floats(width=32, allow_nan=False, allow_infinity=False),  # up to +-3.4e38
    st.floats(-30.0, 5.0),
)


@settings(max_examples=30, deadline=None)
@given(
    scheme=st.sampled_from(SCHEMES),
    n=st.sampled_from([1, 2, N]),
    m=st.sampled_from([None, 1, 5, 13]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_resamplers_give_valid_indices_for_any_log_weights(scheme, n, m, seed, data) -> None:
    log_weights = np.array(data.draw(st.lists(_any_log_weight, min_size=n, max_size=n)), np.float32)
    m = n if (m is None or scheme == "killing") else m
    ancestors = np.asarray(
        resampling.get(scheme)(jax.random.key(seed), jnp.asarray(log_weights), m)
    )
    assert ancestors.shape == (m,) and ancestors.dtype == np.int32
    assert np.all((ancestors >= 0) & (ancestors < n))
    if np.any(np.isnan(log_weights)) or np.all(np.isneginf(log_weights)):
        np.testing.assert_array_equal(ancestors, _identity(m, n))
    elif np.any(np.isposinf(log_weights)):
        assert np.all(np.isposinf(log_weights[ancestors]))
    else:
        assert np.all(np.isfinite(log_weights[ancestors]))


# --- resamplers: static arguments ------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resamplers_reject_a_num_samples_that_is_not_an_int(scheme: str) -> None:
    fn = resampling.get(scheme)
    for bad in [2.7, 8.0, True, "8"]:
        with pytest.raises(TypeError, match="num_samples"):
            fn(jax.random.key(0), jnp.zeros(N), bad)
    with pytest.raises(ValueError, match="num_samples"):
        fn(jax.random.key(0), jnp.zeros(N), 0)
    assert fn(jax.random.key(0), jnp.zeros(N), np.int64(N)).shape == (N,)


def test_offspring_counts_rejects_out_of_range_ancestors() -> None:
    for bad in ([0, 1, N], [-1, 0, 2]):
        with pytest.raises(ValueError, match="ancestors"):
            resampling.offspring_counts(jnp.asarray(bad, jnp.int32), N)
    with pytest.raises(TypeError, match="ancestors"):
        resampling.offspring_counts(jnp.asarray([0.0, 1.0]), N)
    with pytest.raises(ValueError, match="ancestors"):
        resampling.offspring_counts(jnp.zeros((2, 2), jnp.int32), N)
    with pytest.raises(TypeError, match="n"):
        resampling.offspring_counts(jnp.asarray([0, 1]), 2.0)
    counts = resampling.offspring_counts(jnp.asarray([0, 0, 2], jnp.int32), 3)
    np.testing.assert_array_equal(counts, [2, 0, 1])
    # Traced ancestors cannot be checked; they must still trace.
    traced = jax.jit(lambda a: resampling.offspring_counts(a, 3))(jnp.asarray([1, 1, 2]))
    np.testing.assert_array_equal(traced, [0, 2, 1])


def test_get_names_the_valid_schemes_for_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="multinomial.*ssp.*systematic"):
        resampling.get("systemtic")


# --- SDE schedules and time grids ------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, match",
    [
        (sde.VE(sigma_min=0.0), "sigma_min"),
        (sde.VE(sigma_min=-0.1), "sigma_min"),
        (sde.VE(sigma_min=1.0, sigma_max=0.5), "sigma_max"),
        (sde.VE(sigma_min=1.0, sigma_max=1.0), "sigma_max"),
        (sde.VE(sigma_max=np.inf), "sigma_max"),
        (sde.VE(sigma_min=np.nan), "sigma_min"),
        (sde.VP(beta_min=-0.1), "beta_min"),
        (sde.VP(beta_min=5.0, beta_max=1.0), "beta_max"),
        (sde.VP(beta_max=np.inf), "beta_max"),
        (sde.VP(beta_min=np.nan), "beta_min"),
    ],
)
def test_schedules_reject_invalid_parameters_on_first_use(schedule, match) -> None:
    for use in (schedule.log_alpha, schedule.dlog_alpha, schedule.sigma2, schedule.dsigma2,
                functools.partial(sde.g2, schedule)):
        with pytest.raises(ValueError, match=match):
            use(0.5)


def test_schedules_accept_valid_parameters_and_traced_ones() -> None:
    assert np.isfinite(float(sde.g2(sde.VP(beta_min=0.0, beta_max=1.0), 0.5)))
    assert np.isfinite(float(sde.g2(sde.VE(1e-3, 2.0), 0.5)))
    # A schedule is a pytree: traced parameters (e.g. a learnt schedule) are not checkable.
    value = jax.jit(lambda s: sde.g2(s, 0.5))(sde.VP(0.5, 10.0))
    np.testing.assert_allclose(value, sde.g2(sde.VP(0.5, 10.0), 0.5), rtol=1e-6)


def test_time_grids_reject_times_above_one() -> None:
    with pytest.raises(ValueError, match="t_max"):
        sde.time_grid(10, t_max=5.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sde.check_time_grid([5.0, 0.5, 0.1])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        fkc.anneal(lambda x, t: -x, 1.0, schedule=sde.VP(), times=[5.0, 1.0, 0.1], dim=2)
    np.testing.assert_allclose(sde.check_time_grid([1.0, 0.5]), [1.0, 0.5])


def test_time_grid_names_its_bad_argument() -> None:
    for kwargs, error, match in [
        ({"t_min": 0.0}, ValueError, "t_min"),
        ({"t_min": -1.0}, ValueError, "t_min"),
        ({"t_min": 0.5, "t_max": 0.5}, ValueError, "t_max"),
        ({"t_max": np.nan}, ValueError, "t_max"),
        ({"t_max": "1"}, TypeError, "t_max"),
    ]:
        with pytest.raises(error, match=match):
            sde.time_grid(10, **kwargs)
    with pytest.raises(TypeError, match="num_steps"):
        sde.time_grid(2.0)


# --- MCMC tuning parameters ------------------------------------------------------------------


def _log_density(x):
    return -0.5 * jnp.sum(x**2)


@pytest.mark.parametrize("bad", [-1.0, 0.0, np.nan, np.inf, np.array([0.5, -0.5])])
def test_adapt_step_size_rejects_a_step_size_that_is_not_positive_and_finite(bad) -> None:
    with pytest.raises(ValueError, match="step_size"):
        mcmc.adapt_step_size(bad, 0.5, target=0.234)


def test_adapt_step_size_rejects_bad_target_rate_and_acceptance() -> None:
    for bad in [0.0, 1.0, np.nan, -0.5]:
        with pytest.raises(ValueError, match="target"):
            mcmc.adapt_step_size(1.0, 0.5, target=bad)
    for bad in [-1.0, np.nan, np.inf]:
        with pytest.raises(ValueError, match="rate"):
            mcmc.adapt_step_size(1.0, 0.5, target=0.234, rate=bad)
    for bad in [-0.1, 1.5, np.nan]:
        with pytest.raises(ValueError, match="acceptance_rate"):
            mcmc.adapt_step_size(1.0, bad, target=0.234)
    # Traced values (inside run_adaptive_chain's scan) are not checkable and must trace.
    h = jax.jit(mcmc.adapt_step_size, static_argnames="target")(2.0, 0.234, target=0.234)
    np.testing.assert_allclose(h, 2.0, rtol=1e-6)


def test_run_adaptive_chain_rejects_bad_tuning_before_running() -> None:
    key, x = jax.random.key(0), jnp.ones((3, 2))
    run = functools.partial(mcmc.run_adaptive_chain, key, mcmc.rwmh, x, _log_density)
    with pytest.raises(ValueError, match="step_size"):
        run(-1.0, 5)
    with pytest.raises(ValueError, match="target"):
        run(0.5, 5, target=1.0)
    with pytest.raises(ValueError, match="rate"):
        run(0.5, 5, rate=np.nan)
    with pytest.raises(TypeError, match="num_steps"):
        run(0.5, 2.5)
    with pytest.raises(ValueError, match="num_steps"):
        run(0.5, 0)


def test_run_chain_rejects_a_num_steps_that_is_not_a_positive_int() -> None:
    kernel = functools.partial(mcmc.rwmh, log_density=_log_density, step_size=0.5)
    key, x = jax.random.key(0), jnp.ones((3, 2))
    for bad in [2.5, 3.0, True]:
        with pytest.raises(TypeError, match="num_steps"):
            mcmc.run_chain(key, kernel, x, bad)
    with pytest.raises(ValueError, match="num_steps"):
        mcmc.run_chain(key, kernel, x, 0)
    with pytest.raises(TypeError, match="return_all"):
        mcmc.run_chain(key, kernel, x, 2, return_all="yes")
