"""Rollover Budget Forcing (targets/diffusion/rbf.py): exact budget accounting, and a search that
beats plain sampling and best-of-n at equal evaluations on the DAS toys. RBF makes no
distributional claim, so nothing here compares it with the tilted target."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proposals import sde as sde_proposals
from targets.diffusion import rbf, sde
from targets.toy import das, gmm

VP = sde.VP()
STEPS = 10
TIMES = sde.time_grid(STEPS)


def run(toy, budget, num_particles, seed=0, **options):
    score = gmm.noised_score(toy.prior, VP)
    return jax.jit(lambda key: rbf.search(key, score, toy.reward, schedule=VP, times=TIMES,
                                          dim=2, num_particles=num_particles,
                                          max_evaluations=budget, **options))(
        jax.random.PRNGKey(seed))


def test_the_budget_accounting_is_exact():
    n, q, cap = 16, 3, 5
    budget = n + n * STEPS * q + 7                 # 7 left over by the integer division
    result = run(das.grid(), budget, n, max_candidates=cap)
    used = np.asarray(result.candidates)           # [T, N]
    assert int(result.quota) == q and used.shape == (STEPS, n)
    assert int(result.total_evaluations) == n + used.sum() <= budget
    assert int(result.score_evaluations) == n + used[:-1].sum()
    np.testing.assert_array_equal(result.evaluations, used.sum(1))
    # The roll-over, replayed: a step may use its quota plus what earlier steps left, capped at
    # `cap`; it stops early only when a candidate beat the particle's value (the value rose),
    # else it uses its whole allowance; the last step spends all it may.
    values = np.asarray(result.values)             # [T + 1, N]
    carry = np.zeros(n, np.int64)
    for k in range(STEPS):
        allowed = np.minimum(q + carry, cap)
        assert np.all((used[k] >= 1) & (used[k] <= allowed)), k
        if k < STEPS - 1:
            early = used[k] < allowed
            assert np.all(values[k + 1][early] > values[k][early]), k
            assert np.all(used[k][values[k + 1] <= values[k]] == allowed[values[k + 1]
                                                                         <= values[k]]), k
        carry = q + carry - used[k]
    np.testing.assert_array_equal(used[-1], allowed)
    np.testing.assert_array_equal(result.unused, carry)
    np.testing.assert_array_equal(used.sum(0) + np.asarray(result.unused), STEPS * q)
    assert used[:-1].max() > q                     # the roll-over was used before the end
    np.testing.assert_allclose(values[-1], result.rewards)

    # One particle: the score calls (counted by a callback) are the reported score evaluations.
    calls = []
    toy = das.grid()

    def counted_score(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return gmm.noised_score(toy.prior, VP)(x, t)

    one = jax.jit(lambda key: rbf.search(key, counted_score, toy.reward, schedule=VP,
                                         times=TIMES, dim=2, num_particles=1,
                                         max_evaluations=1 + STEPS * q))(jax.random.PRNGKey(3))
    jax.block_until_ready(one)
    assert len(calls) == int(one.score_evaluations) == 1 + int(one.candidates[:-1].sum())


def test_rbf_beats_plain_sampling_and_best_of_n_at_equal_evaluations():
    # Per particle RBF spends 1 + T q evaluations; best-of-q plain samples spend q T scores.
    toy, n, q = das.ring(), 64, 4
    result = run(toy, n + n * STEPS * q, n, seed=1)
    score = gmm.noised_score(toy.prior, VP)
    ts = jnp.asarray(TIMES, jnp.float32)

    @jax.jit
    def plain(key):
        def step(k, x):
            kernel = sde.reverse_kernel(VP, "euler_maruyama", x, score(x, ts[k]), ts[k],
                                        ts[k + 1])
            return sde_proposals.sample(jax.random.fold_in(key, k), kernel)[0]

        x = sde.sigma(VP, ts[0]) * jax.random.normal(key, (n * q, 2))
        return toy.reward(jax.lax.fori_loop(0, STEPS, step, x))

    plain_rewards = np.asarray(plain(jax.random.PRNGKey(2)))
    best_of_q = plain_rewards.reshape(n, q).max(1)
    rewards = np.asarray(result.rewards)
    np.testing.assert_allclose(rewards, toy.reward(result.x), rtol=1e-6)
    se = lambda a, b: np.hypot(a.std(ddof=1) / np.sqrt(a.size), b.std(ddof=1) / np.sqrt(b.size))
    assert rewards.mean() > plain_rewards.mean() + 4 * se(rewards, plain_rewards)
    assert rewards.mean() > best_of_q.mean() + 4 * se(rewards, best_of_q), (
        rewards.mean(), best_of_q.mean())
    # Plain sampling is the base chain: its mean reward is the prior's (up to discretisation).
    prior = das.expected_reward(toy.prior, toy.reward)
    assert abs(plain_rewards.mean() - prior) < 4 * plain_rewards.std() / np.sqrt(n * q) + 0.5


def test_bad_inputs_raise_before_compiling():
    toy = das.grid()
    score = gmm.noised_score(toy.prior, VP)
    args = {"schedule": VP, "times": TIMES, "dim": 2, "num_particles": 4,
            "max_evaluations": 200}
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="max_evaluations"):
        rbf.search(key, score, toy.reward, **{**args, "max_evaluations": 4 * (STEPS + 1) - 1})
    with pytest.raises(ValueError, match="num_particles"):
        rbf.search(key, score, toy.reward, **{**args, "num_particles": 0})
    with pytest.raises(ValueError, match="max_candidates"):
        rbf.search(key, score, toy.reward, **args, max_candidates=0)
    with pytest.raises(ValueError, match="kernel"):
        rbf.search(key, score, toy.reward, **args, kernel="heun")
    with pytest.raises(ValueError, match=r"score\(x, t\)"):
        rbf.search(key, lambda x, t: x.sum(1), toy.reward, **args)
    with pytest.raises(ValueError, match=r"reward\(x0\)"):
        rbf.search(key, score, lambda x: x, **args)
    with pytest.raises(ValueError, match="decreasing"):
        rbf.search(key, score, toy.reward, **{**args, "times": TIMES[::-1]})
