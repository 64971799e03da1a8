"""Reward-twisted SMC against the exact p(y) phi(y) of an enumerable LM (every sequence enumerated).

Same checks as tests/test_power.py (its helpers are reused): over R replicate runs (vmap over keys),
Z_hat / Z has mean 1 (z-test); the replicate-averaged weighted distribution matches the exact
tilted one per sequence (z-tests, pi_y >= 0.5%) and in TV against its noise floor. Resample-move:
exact samples of an intermediate target, one MH step, chi-square against the same target.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from targets.lm import potentials as P
from targets.lm.decoding import draw
from targets.lm.twisted import twisted_components, twisted_smc
from tests.test_power import (
    LM,
    T,
    assert_matches_exact,
    check_against_exact,
    sequence_index,
)

N, R = 1024, 256
BANNED = 1
PROMPT = jnp.array([LM.bos_id])


@pytest.fixture(scope="module")
def params():
    return LM.init_params(jax.random.PRNGKey(0))


def no_two_zeros():
    """DFA over token ids: no two consecutive 0 tokens (state 1 = last token was 0)."""
    V = LM.vocab_size
    trans = np.zeros((2, V), np.int64)
    trans[:, :] = 0
    trans[0, 0], trans[1, 0] = 1, -1
    return P.dfa_constraint(trans, 0, [True, True])


def body(seq):
    return [x for x in seq if x != LM.eos_ids[0]]


# name -> (potential, exact log phi(y) on a body, options)
CONFIGS = {
    "banned_token_and_length": (
        P.product(P.banned_tokens([BANNED]), P.length_potential(0.3)),
        lambda b: -np.inf if BANNED in b else 0.3 * len(b), {}),
    "block2_dfa_resample_move": (
        P.product(no_two_zeros(), P.token_count(2, -0.7)),
        lambda b: -np.inf if any(x == y == 0 for x, y in itertools.pairwise(b)) else -0.7 * b.count(2),
        {"block_size": 2, "rejuvenate": True, "ess_threshold": 1.0}),
    # soft terminal reward (a count and an exact-answer checker) with a tempered proposal p^{1/0.6}
    "soft_terminal_reward_tempered": (
        P.product(P.token_count(0, 0.8), P.exact_answer([2, 2], 2.0)),
        lambda b: 0.8 * b.count(0) + 2.0 * (b == [2, 2]), {"temperature": 0.6, "forced_eos": False}),
    "lookahead_block2": (
        P.product(P.banned_tokens([BANNED]), P.token_count(0, 0.8)),
        lambda b: -np.inf if BANNED in b else 0.8 * b.count(0),
        {"lookahead": 4, "block_size": 2, "temperature": 0.8, "forced_eos": False}),
}


def exact_tilted(params, log_phi, forced_eos=True):
    """(sequences, pi, Z); with ``forced_eos`` (the default of twisted SMC) only the sequences
    that end with an EOS."""
    seqs = LM.sequences()
    lp = np.array([LM.sequence_logprob(params, s) if s[-1] == LM.eos_ids[0] or not forced_eos
                   else -np.inf for s in seqs])
    a = lp + np.array([log_phi(body(s)) for s in seqs], np.float64)
    log_z = np.logaddexp.reduce(a)
    return seqs, np.exp(a - log_z), np.exp(log_z)


_RUNS = {}


def run_replicates(params, name, mutate=None):
    if name not in _RUNS:
        potential, _, options = CONFIGS[name]
        fn = jax.jit(jax.vmap(lambda k: twisted_smc(k, LM, params, PROMPT, potential,
                                                    num_particles=N, max_new_tokens=T,
                                                    **options)))
        _RUNS[name] = fn(jax.random.split(jax.random.PRNGKey(1), R))
    return _RUNS[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_twisted_smc_exact_distribution_and_unbiased_evidence(params, name):
    _, log_phi, options = CONFIGS[name]
    seqs, pi, Z = exact_tilted(params, log_phi, options.get("forced_eos", True))
    result = run_replicates(params, name)
    assert int(result.nonfinite_increments.sum()) == 0
    if options.get("rejuvenate"):
        assert bool(np.all(result.resampled[:, 0]))   # moves did run
    assert_matches_exact(result, seqs, pi, Z)
    one = jax.tree_util.tree_map(lambda x: x[0], result)
    tokens, length = draw(jax.random.PRNGKey(0), one)
    assert tokens.shape == (T,) and 1 <= int(length) <= T


def test_unweighted_proposal_fails_the_checks(params):
    """The checks have power: the tempered proposal's particles without the weights fail."""
    _, log_phi, _ = CONFIGS["soft_terminal_reward_tempered"]
    seqs, pi, Z = exact_tilted(params, log_phi, forced_eos=False)
    result = run_replicates(params, "soft_terminal_reward_tempered")
    unweighted = result._replace(log_weights=jnp.zeros_like(result.log_weights))
    _, z_max, tv_ratio = check_against_exact(unweighted, seqs, pi, Z)
    assert z_max > 10 and tv_ratio > 5, (z_max, tv_ratio)


def test_resample_move_leaves_intermediate_target_invariant(params):
    """Exact samples of gamma_L (L = 3 tokens: EOS-ended within 3 tokens with weight p phi, or
    unfinished with 3 tokens and weight p psi), two MH steps with a tempered proposal, chi-square
    against gamma_L."""
    potential = P.product(no_two_zeros(), P.token_count(0, 1.0), P.length_potential(-0.4))
    L, M = 3, 8192
    sampler = twisted_components(LM, params, PROMPT, potential, max_new_tokens=T, block_size=1,
                              temperature=0.7)
    states = [s + (LM.eos_ids[0],) for n in range(L) for s in np.ndindex(*(3,) * n)]
    states = [tuple(int(x) for x in s) for s in states]
    states += [tuple(int(x) for x in s) for s in np.ndindex(3, 3, 3)]
    log_g = []
    for s in states:
        b = body(s)
        ok = not any(x == y == 0 for x, y in itertools.pairwise(b))
        # token_count is terminal: psi = 1 on unfinished prefixes
        finished = s[-1] == LM.eos_ids[0]
        log_pot = (b.count(0) if finished else 0.0) - 0.4 * len(b) if ok else -np.inf
        log_g.append(LM.sequence_logprob(params, s) + log_pot)
    g = np.exp(np.array(log_g) - np.logaddexp.reduce(log_g))
    rng = np.random.default_rng(0)
    idx = rng.choice(len(states), size=M, p=g)
    tokens = np.full((M, T), LM.eos_ids[0], np.int32)
    for i, k in enumerate(idx):
        tokens[i, :len(states[k])] = states[k]
    length = np.array([len(states[k]) for k in idx])

    @jax.jit
    def apply(key, tokens, length):
        tp = sampler.from_tokens(tokens, length, L)
        for k in jax.random.split(key, 2):
            tp = sampler.move(k, tp, jnp.asarray(L, jnp.int32))
        return tp
    tp = apply(jax.random.PRNGKey(5), jnp.asarray(tokens), jnp.asarray(length))
    # no move into a forbidden state (the potential ratio is in the acceptance)
    assert not bool(jnp.any(jnp.isneginf(tp.log_potential)))
    moved = sequence_index([tuple(s) for s in states], np.asarray(tp.tokens),
                           np.asarray(tp.length))
    assert np.all(moved >= 0)
    changed = np.mean(moved != idx)
    assert changed > 0.2, changed                      # the kernel does move
    counts = np.bincount(moved, minlength=len(states))
    expected = M * g
    big = expected >= 5
    chi2 = (((counts - expected) ** 2 / np.where(big, expected, 1.0))[big]).sum()
    dof = int(big.sum()) - 1
    # chi-square with dof ~ 30: mean dof, sd sqrt(2 dof); 5 sd is p ~ 1e-5
    assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)
    assert counts[~(g > 0)].sum() == 0


def test_lookahead_twist_is_unbiased_for_the_expected_terminal_potential(params):
    """exp(twist) averaged over keys matches psi(y_1:2) = E_p[phi(Y) | y_1:2] by enumeration."""
    potential, log_phi, _ = CONFIGS["lookahead_block2"]
    sampler = twisted_components(LM, params, PROMPT, potential, max_new_tokens=T, lookahead=8,
                                 forced_eos=False)
    prefixes = [(a, b) for a in range(3) for b in range(3)]
    seqs = LM.sequences()
    lp = np.array([LM.sequence_logprob(params, s) for s in seqs])
    lphi = np.array([log_phi(body(s)) for s in seqs])
    exact = []
    for pre in prefixes:
        ext = np.array([s[:2] == pre and len(s) > 2 for s in seqs])
        exact.append(np.exp(np.logaddexp.reduce(lp[ext] + lphi[ext])
                            - LM.sequence_logprob(params, pre)))
    tokens = np.full((len(prefixes), T), LM.eos_ids[0], np.int32)
    tokens[:, :2] = prefixes
    tp = sampler.from_tokens(tokens, np.full(len(prefixes), 2), 2)
    M = 400
    est = jax.jit(jax.vmap(lambda k: jnp.exp(sampler.twist(k, tp))))(
        jax.random.split(jax.random.PRNGKey(7), M))
    est = np.asarray(est, np.float64)
    mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(M)
    forbidden = np.array(exact) == 0
    assert np.all(est[:, forbidden] == 0)
    z = (mean[~forbidden] - np.array(exact)[~forbidden]) / se[~forbidden]
    assert np.abs(z).max() < 4.5, z


def test_nan_potential_is_counted_not_hidden(params):
    nan_pot = P.Potential(prefix=lambda tok, n: jnp.where(n >= 2, jnp.nan, 0.0),
                          complete=lambda tok, n: jnp.zeros(()))
    r = twisted_smc(jax.random.PRNGKey(0), LM, params, PROMPT, nan_pot, num_particles=16,
                    max_new_tokens=T)
    assert int(r.nonfinite_increments.sum()) > 0
    assert bool(jnp.isnan(r.log_evidence))


@pytest.mark.parametrize("make, message", [
    (lambda: P.terminal(lambda tok, n: 1.0, float("inf")), "lambda"),
    (lambda: P.exact_answer([0], float("nan")), "lambda"),
    (lambda: P.Potential(prefix=lambda tok, n: jnp.zeros((2,)), complete=lambda tok, n: 0.0 * n),
     "scalar"),
    (lambda: P.Potential(prefix=lambda tok, n: tok.astype(jnp.float32),
                         complete=lambda tok, n: jnp.zeros(())), "scalar"),
    (lambda: P.Potential(prefix=lambda tok, n: n, complete=lambda tok, n: jnp.zeros(())), "float"),
])
def test_bad_potential_raises_before_generation(params, make, message):
    with pytest.raises(ValueError, match=message):
        twisted_components(LM, params, PROMPT, make(), max_new_tokens=T)


def test_bad_arguments_raise(params):
    pot = P.token_count(0)
    for kwargs, message in [({"block_size": 0}, "block_size"), ({"temperature": 0.0}, "temperature"),
                            ({"max_new_tokens": 9}, "exceeds the cache"),
                            ({"lookahead": -1}, "lookahead"),
                            ({"lookahead": 2, "rejuvenate": True}, "lookahead"),
                            ({"lookahead": 2}, "forced_eos=False")]:
        kwargs = dict({"max_new_tokens": T}, **kwargs)
        with pytest.raises(ValueError, match=message):
            twisted_components(LM, params, PROMPT, pot, **kwargs)
    with pytest.raises(ValueError, match="empty prompt"):
        twisted_components(LM, params, jnp.zeros((0,), jnp.int32), pot, max_new_tokens=T)
