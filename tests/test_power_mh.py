"""The MH power sampler (Karan and Du) against the exact p(y)^alpha of an enumerable LM.

C independent chains give C iid draws from whatever law the chains are in, so the multinomial
noise floor is known: E TV(empirical, pi) ~ 0.5 sum_y sqrt(2 pi_y (1 - pi_y) / (pi C)) for the
sequences with C pi_y >> 1. Tests compare against that floor and use a chi-square on the
sequences with expected count >= 5 (the rest lumped into one cell).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from test_power import ALPHA, LM, T, exact_target, sequence_index

from targets.lm.mh_power import mh_power, mh_power_components

C = 20000  # chains


@pytest.fixture(scope="module")
def params():
    return LM.init_params(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def sampler(params):
    return mh_power_components(LM, params, jnp.array([LM.bos_id]), alpha=ALPHA, max_new_tokens=T,
                            block_size=2, mh_steps=2)


def counts_of(state, seqs):
    idx = sequence_index(seqs, state.tokens, state.length)
    assert np.all(idx >= 0), "a chain left the support"
    return np.bincount(idx, minlength=len(seqs))


def chi_square_p(counts, pi):
    expected = counts.sum() * pi
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return stats.chisquare(obs, exp).pvalue


def tv_floor(pi, n):
    return 0.5 * np.sum(np.sqrt(2 * pi * (1 - pi) / (np.pi * n)))


@pytest.fixture(scope="module")
def moves(sampler):
    return jax.jit(lambda key, state: sampler.moves(key, state, T, 3))


def test_mh_step_leaves_power_distribution_invariant(params, sampler, moves):
    """Start C chains at exact draws of p^alpha; after MH steps they are still exact draws."""
    seqs, pi, _ = exact_target(params)
    rng = np.random.default_rng(0)
    draws = rng.choice(len(seqs), size=C, p=pi)
    tokens = np.full((C, T), LM.eos_ids[0])
    length = np.array([len(seqs[i]) for i in draws])
    for c, i in enumerate(draws):
        tokens[c, :len(seqs[i])] = seqs[i]
    state = jax.jit(lambda t, n: sampler.from_tokens(t, n, T))(jnp.asarray(tokens),
                                                                jnp.asarray(length))
    # scoring by teacher forcing reproduces the exact log-probabilities
    _, lp = LM.enumerate(params)
    np.testing.assert_allclose(np.asarray(state.logp), lp[draws], atol=2e-4)
    key = jax.random.PRNGKey(5)
    for _ in range(3):   # 9 steps
        key, sub = jax.random.split(key)
        state, rate = moves(sub, state)
    assert 0.05 < float(rate) < 0.95, rate
    counts = counts_of(state, seqs)
    assert chi_square_p(counts, pi) > 1e-3
    assert 0.5 * np.abs(counts / C - pi).sum() < 1.5 * tv_floor(pi, C)


def test_mh_sampler_converges_to_power_distribution(params, sampler):
    """Block-wise sampler (B = 2, K = 2 per stage), then 600 final-stage steps on C = 4000 chains:
    the law of the chains reaches the multinomial floor of C iid draws of p^alpha. (The MH chain
    mixes slowly: ~500 steps here, where Power-SMC needs one pass; invariance is tested above.)"""
    seqs, pi, _ = exact_target(params)
    chains = 4000
    floor = tv_floor(pi, chains)
    result = jax.jit(lambda k: sampler.run(k, chains))(jax.random.PRNGKey(7))
    many_moves = jax.jit(lambda key, state: sampler.moves(key, state, T, 50))
    state, key, tvs = result.particles, jax.random.PRNGKey(9), []
    for _ in range(12):
        tvs.append(0.5 * np.abs(counts_of(state, seqs) / chains - pi).sum())
        key, sub = jax.random.split(key)
        state, _rate = many_moves(sub, state)
    counts = counts_of(state, seqs)
    tvs.append(0.5 * np.abs(counts / chains - pi).sum())
    assert tvs[0] > 5 * floor, (tvs, floor)            # not there after the block-wise stages
    assert tvs[-1] < 2 * floor and chi_square_p(counts, pi) > 1e-3, (tvs, floor)


@pytest.mark.parametrize("kwargs, message", [
    ({"alpha": 0.0}, "alpha"), ({"block_size": 0}, "block_size"), ({"mh_steps": -1}, "mh_steps"),
])
def test_mh_bad_input(params, kwargs, message):
    kwargs = dict({"alpha": ALPHA, "max_new_tokens": T, "block_size": 2, "mh_steps": 1}, **kwargs)
    with pytest.raises(ValueError, match=message):
        mh_power(jax.random.PRNGKey(0), LM, params, jnp.array([LM.bos_id]), num_chains=4, **kwargs)
    with pytest.raises(ValueError, match="empty prompt"):
        mh_power_components(LM, params, jnp.zeros((0,), jnp.int32), alpha=2.0, max_new_tokens=T,
                         block_size=2, mh_steps=1)
