"""Diffusion Tree Sampling and Search (targets/diffusion/dts.py) on the DAS ring toy.

The chain's own tilted law is the reference: DTS targets p_theta(x) exp(r(x) / alpha), p_theta
the law of the discretised base chain (10 Euler-Maruyama steps on VP here), which differs from
the exact tilted mixture by the discretisation. That law is estimated by importance sampling of
100k chain runs (its standard errors enter the tolerances); its distance to the exact mixture
is checked too (about 0.04 in total variation over the modes at 10 steps, 0.016 at 20).
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proposals import sde as sde_proposals
from targets.diffusion import dts, sde
from targets.toy import das, gmm

VP = sde.VP()
STEPS = 10
TIMES = sde.time_grid(STEPS)
TOY = das.ring()
SCORE = gmm.noised_score(TOY.prior, VP)


def base_chain(key, n, times=TIMES):
    """n runs of the base chain (the kernel DTS expands with), x_T [n, 2]."""
    ts = jnp.asarray(times, jnp.float32)

    def step(k, x):
        kernel = sde.reverse_kernel(VP, "euler_maruyama", x, SCORE(x, ts[k]), ts[k], ts[k + 1])
        return sde_proposals.sample(jax.random.fold_in(key, k), kernel)[0]

    x = sde.sigma(VP, ts[0]) * jax.random.normal(key, (n, 2))
    return jax.lax.fori_loop(0, len(times) - 1, step, x)


@jax.jit
def chain_tilt(key):
    """Mode masses [K] and mean reward of p_theta exp(r / alpha) by self-normalised importance
    sampling of 100k chain runs, each with its standard error (delta method:
    sqrt(sum_i w_i^2 (f_i - mean)^2))."""
    x = base_chain(key, 100_000)
    r = TOY.reward(x)
    w = jax.nn.softmax(r / TOY.alpha)
    modes = jax.nn.one_hot(gmm.nearest_mode(TOY.target, x), TOY.target.num_components)
    f = jnp.concatenate([modes, r[:, None]], axis=1)
    mean = w @ f
    se = jnp.sqrt((w**2) @ (f - mean) ** 2)
    return mean[:-1], se[:-1], mean[-1], se[-1]


def mean_and_se(values):
    values = np.asarray(values, np.float64)
    return values.mean(0), values.std(0, ddof=1) / np.sqrt(values.shape[0])


def total_variation(p, q):
    return 0.5 * np.sum(np.abs(np.asarray(p) - np.asarray(q)), axis=-1)


BUDGETS = (64, 256, 1023)


def test_dts_approaches_the_tilted_ring_as_its_budget_grows():
    # Branching 2 over 10 steps: 1023 evaluations build about half of the complete tree
    # (2046 scored nodes). One search per seed, read at three budgets (`truncate`).
    def masses_at_budgets(key):
        tree = dts.sample(key, SCORE, TOY.reward, alpha=TOY.alpha, schedule=VP, times=TIMES,
                          dim=2, max_evaluations=BUDGETS[-1], branching=2).tree
        out = []
        for budget in BUDGETS:
            small = dts.truncate(tree, budget)
            w = jnp.exp(dts.leaf_log_probs(small))
            out.append((gmm.mode_weights(TOY.target, small.x, w),
                        jnp.sum(jnp.where(w > 0, w * small.reward, 0.0))))
        return out

    seeds = 48
    out = jax.jit(lambda keys: jax.lax.map(masses_at_budgets, keys))(
        jax.random.split(jax.random.PRNGKey(0), seeds))
    reference, reference_se, reference_reward, reward_se = map(
        np.asarray, chain_tilt(jax.random.PRNGKey(1)))
    exact = np.asarray(gmm.mode_weights(TOY.target, gmm.sample(jax.random.PRNGKey(2),
                                                               TOY.target, 200_000)))
    assert total_variation(reference, exact) < 0.05           # the discretisation (0.040)

    distances = [mean_and_se(total_variation(np.asarray(m), reference)) for m, _ in out]
    for (far, far_se), (near, near_se) in itertools.pairwise(distances):
        assert far - near > 3 * np.hypot(far_se, near_se), distances

    masses, rewards = map(np.asarray, out[-1])
    m, se = mean_and_se(masses)
    # Seed-to-seed error and the reference's own.
    assert np.all(np.abs(m - reference) < 4 * np.hypot(se, reference_se)), (m, se, reference)
    m, se = mean_and_se(rewards)
    assert abs(m - reference_reward) < 4 * np.hypot(se, reward_se), (m, se, reference_reward)


def test_the_count_the_anytime_tree_and_the_samples():
    calls = []

    def counted_score(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return SCORE(x, t)

    def search(budget, **options):
        return jax.jit(lambda key: dts.sample(key, counted_score, TOY.reward, alpha=TOY.alpha,
                                              schedule=VP, times=TIMES, dim=2,
                                              max_evaluations=budget, branching=3,
                                              **options))(jax.random.PRNGKey(4))

    big = search(400, num_samples=4000)
    jax.block_until_ready(big)
    tree = jax.tree_util.tree_map(np.asarray, big.tree)
    rows = np.arange(int(tree.size))
    depth, parent = tree.depth[rows], tree.parent[rows]
    # The documented count: T - k per rollout that expands a node of depth k, which is one per
    # row at depths 1..T; and the score really was called that often (the callback).
    first = rows[(rows == 1) | (parent != rows - 1)]      # the first row of each rollout
    assert int(big.score_evaluations) == np.sum(STEPS - depth[parent[first]])
    assert int(big.score_evaluations) == np.sum((depth >= 1) & (depth <= STEPS))
    assert int(big.score_evaluations) == len(calls) == int(dts.score_evaluations(big.tree))
    assert 400 - STEPS < int(big.score_evaluations) <= 400     # the next rollout did not fit
    assert int(big.num_rollouts) == len(first) == np.sum(depth == STEPS + 1)
    assert int(tree.visits[0]) == int(big.num_rollouts)
    # The tree's shape and its terminal rewards.
    assert np.all(depth[1:] == depth[parent[1:]] + 1) and np.all(tree.num_children <= 3)
    leaves = rows[depth == STEPS + 1]
    np.testing.assert_allclose(tree.reward[leaves], TOY.reward(tree.x[leaves]), rtol=1e-6)

    # Anytime: the big tree read at 100 evaluations is the tree of a search stopped there.
    small = search(100, max_nodes=big.tree.parent.shape[0]).tree     # arrays of the same size
    cut = dts.truncate(big.tree, 100)
    for name, a, b in zip(small._fields, small, cut):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)

    # The samples follow the descent law: mode masses within 4 binomial standard errors.
    p = np.exp(np.asarray(big.leaf_log_probs))
    assert abs(p.sum() - 1) < 1e-5
    expected = np.asarray(gmm.mode_weights(TOY.target, big.tree.x, jnp.asarray(p)))
    drawn = np.asarray(gmm.mode_weights(TOY.target, big.samples))
    assert np.all(np.abs(drawn - expected) < 4 * np.sqrt(expected * (1 - expected) / 4000)
                  + 1e-6)
    np.testing.assert_allclose(big.sample_rewards, TOY.reward(big.samples), rtol=1e-6)


def test_dts_star_finds_higher_reward_than_best_of_n_at_equal_evaluations():
    # DTS* (greedy selection, alpha = 0.1) against the best of budget / T plain samples of the
    # same chain; paired over seeds.
    budget = 1000

    def one(key):
        key_tree, key_plain = jax.random.split(key)
        found = dts.search(key_tree, SCORE, TOY.reward, alpha=0.1, schedule=VP, times=TIMES,
                           dim=2, max_evaluations=budget, branching=3)
        plain = TOY.reward(base_chain(key_plain, budget // STEPS))
        return found.best_reward, jnp.max(plain), found.score_evaluations

    found, plain, spent = map(np.asarray, jax.jit(lambda keys: jax.lax.map(one, keys))(
        jax.random.split(jax.random.PRNGKey(5), 16)))
    assert np.all(spent <= budget)
    gain, se = mean_and_se(found - plain)
    assert gain > 4 * se and np.mean(found > plain) >= 0.75, (found, plain)


def test_bad_inputs_raise_before_compiling():
    args = {"alpha": 1.0, "schedule": VP, "times": TIMES, "dim": 2, "max_evaluations": 100}
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="max_evaluations"):
        dts.sample(key, SCORE, TOY.reward, **{**args, "max_evaluations": STEPS - 1})
    with pytest.raises(ValueError, match="branching"):
        dts.sample(key, SCORE, TOY.reward, **args, branching=0)
    with pytest.raises(ValueError, match="branching"):
        dts.search(key, SCORE, TOY.reward, **args, branching=2.5)
    with pytest.raises(ValueError, match="max_nodes"):
        dts.sample(key, SCORE, TOY.reward, **args, max_nodes=STEPS + 1)
    with pytest.raises(ValueError, match="num_samples"):
        dts.sample(key, SCORE, TOY.reward, **args, num_samples=0)
    with pytest.raises(ValueError, match="kernel"):
        dts.sample(key, SCORE, TOY.reward, **args, kernel="heun")
    with pytest.raises(ValueError, match="alpha"):
        dts.sample(key, SCORE, TOY.reward, **{**args, "alpha": 0.0})
    with pytest.raises(ValueError, match="decreasing"):
        dts.sample(key, SCORE, TOY.reward, **{**args, "times": TIMES[::-1]})
    with pytest.raises(ValueError, match=r"score\(x, t\)"):
        dts.sample(key, lambda x, t: x[:, :1], TOY.reward, **args)
    with pytest.raises(ValueError, match=r"reward\(x0\)"):
        dts.search(key, SCORE, lambda x: x, **args)
    with pytest.raises(TypeError, match="reward"):
        dts.sample(key, SCORE, None, **args)
    with pytest.raises(ValueError, match="dim"):
        dts.sample(key, SCORE, TOY.reward, **{**args, "dim": 0})
