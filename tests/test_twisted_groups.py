"""Reward-twisted SMC for B prompts in one program (a model of B groups) on the enumerable LM.

Grouped runs must equal B separate one-prompt runs with the same keys, bit for bit up to float
rounding of batched arithmetic (rtol 1e-6 on float fields, exact on tokens, flags and step
counts): every random draw of prompt b (tokens, block keys, lookahead rollouts, the MH cut,
regeneration and accept) uses keys[b] as the one-prompt model uses its key. A prompt whose cloud
dies leaves the others as they would be alone. Exactness per prompt reuses tests/test_power.py's
checks.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from targets.lm import potentials as P
from targets.lm.twisted import twisted_smc
from targets.toy.enumerable_lm import EnumerableLM
from tests.test_power import TV_TOLERANCE, check_against_exact
from tests.test_twisted_awrs import brackets

LM = EnumerableLM(n_tokens=3, max_new=4, prompt_len=2)
T = LM.max_new
PROMPTS = jnp.array([[LM.bos_id, 0], [LM.bos_id, 1], [LM.bos_id, 2]])
LENGTHS = jnp.array([1, 2, 2])          # prompt 0 is [BOS] alone (padded)
LAST = [LM.bos_id, 1, 2]                # each prompt's last real token (the chain's state)


@pytest.fixture(scope="module")
def params():
    return LM.init_params(jax.random.PRNGKey(0))


def no_two_zeros():
    """DFA over token ids: no two consecutive 0 tokens (state 1 = last token was 0)."""
    trans = np.zeros((2, LM.vocab_size), np.int64)
    trans[0, 0], trans[1, 0] = 1, -1
    return P.dfa_constraint(trans, 0, [True, True])


def first_token_zero():
    """DFA: the first token must be 0 (state 0 = nothing yet, 1 = started with 0)."""
    trans = np.full((2, LM.vocab_size), -1, np.int64)
    trans[0, 0] = 1
    trans[1, :] = 1
    return P.dfa_constraint(trans, 0, [False, True])


# name -> (potential, exact log phi(y) on a body, options). Between them: prefix-only twisting,
# blocks of 2, rejuvenation (move) after every resampling, lookahead K = 2 with blocks (and the
# dead-prompt test: unmasked, one token per step, with moves). The ESS
# thresholds make the prompts take different resampling decisions at seed 9 (checked below).
CONFIGS = {
    "block2_resample_move": (
        P.product(no_two_zeros(), P.token_count(2, -0.7)),
        lambda b: -np.inf if any(x == y == 0 for x, y in itertools.pairwise(b))
        else -0.7 * b.count(2),
        {"block_size": 2, "rejuvenate": True, "ess_threshold": 0.97, "temperature": 0.8,
         "forced_eos": False}),
    "lookahead2_block2": (
        P.product(P.banned_tokens([1]), P.token_count(0, 0.8)),
        lambda b: -np.inf if 1 in b else 0.8 * b.count(0),
        {"lookahead": 2, "block_size": 2, "temperature": 0.8, "ess_threshold": 0.7,
         "forced_eos": False}),
    # a host predicate drawn by AWRS (its rejection walk runs per group with the group's key)
    "awrs_brackets": (
        P.product(brackets(), P.token_count(2, 0.5)), None, {"ess_threshold": 0.9}),
}
FIELDS = ("log_weights", "log_evidence", "ess")


def assert_group_equals_alone(grouped, b, alone):
    for name in FIELDS:
        np.testing.assert_allclose(getattr(grouped, name)[b], getattr(alone, name), rtol=1e-6,
                                   err_msg=name)
    for name in ("resampled", "num_steps", "degenerate"):
        np.testing.assert_array_equal(getattr(grouped, name)[b], getattr(alone, name),
                                      err_msg=name)
    np.testing.assert_array_equal(grouped.particles.tokens[b], alone.particles.tokens)
    np.testing.assert_array_equal(grouped.particles.length[b], alone.particles.length)


def grouped_and_alone(params, potential, **options):
    """(keys [B] -> grouped result, keys [B] -> the B one-prompt results), compiled once each."""
    grouped = jax.jit(lambda k: twisted_smc(k, LM, params, PROMPTS, potential,
                                            prompt_length=LENGTHS, **options))
    one = jax.jit(lambda k, p, n: twisted_smc(k, LM, params, p, potential, prompt_length=n,
                                              **options))
    return grouped, lambda keys: [one(keys[b], PROMPTS[b], LENGTHS[b])
                                  for b in range(len(PROMPTS))]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prompts_in_one_program_equal_separate_runs(params, name):
    potential, _, options = CONFIGS[name]
    keys = jax.random.split(jax.random.PRNGKey(9), len(PROMPTS))
    run_grouped, run_alone = grouped_and_alone(params, potential, num_particles=16,
                                               max_new_tokens=T, **options)
    grouped, alone = run_grouped(keys), run_alone(keys)
    # the prompts took different resampling decisions somewhere (else the test is weak)
    flags = np.asarray(grouped.resampled)
    assert flags.any() and (flags != flags[:1]).any(), flags
    for b in range(len(PROMPTS)):
        assert_group_equals_alone(grouped, b, alone[b])


def test_dead_prompt_leaves_the_others_as_alone(params):
    """Prompt 1's first token is 0 with probability ~2e-9 under the model (the others': > 0.4),
    and the potential demands it: unmasked, every particle of prompt 1 dies at its first token
    (at every seed), while the other prompts live and equal their separate runs."""
    table = params["table"].at[0, LAST, 0].set(jnp.array([0.0, -20.0, 0.0]))
    dead_params = {"table": jax.nn.log_softmax(table, axis=-1)}
    potential = P.product(first_token_zero(), P.token_count(2, 0.5))
    run_grouped, run_alone = grouped_and_alone(dead_params, potential, num_particles=16,
                                               max_new_tokens=T, rejuvenate=True,
                                               mask_proposal=False)
    for seed in range(3):
        keys = jax.random.split(jax.random.PRNGKey(seed), len(PROMPTS))
        grouped, alone = run_grouped(keys), run_alone(keys)
        np.testing.assert_array_equal(grouped.degenerate, [False, True, False])
        assert np.isneginf(grouped.log_evidence[1])
        assert int(grouped.num_steps[1]) == 1          # stopped once its cloud died
        for b in (0, 2):
            assert_group_equals_alone(grouped, b, alone[b])


def exact_tilted(params, log_phi, prev):
    seqs = LM.sequences()
    lp = np.array([LM.sequence_logprob(params, s, prev) for s in seqs])
    a = lp + np.array([log_phi([x for x in s if x not in LM.eos_ids]) for s in seqs])
    log_z = np.logaddexp.reduce(a)
    return seqs, np.exp(a - log_z), np.exp(log_z)


def test_prompts_in_one_program_are_exact(params):
    """R replicates of the grouped model: each prompt matches its own exact tilted target
    (z-tests and TV tolerance of tests/test_power.py; N = 512 keeps the O(1/N) bias of the
    self-normalised weights below the R = 128 replicate noise)."""
    potential, log_phi, options = CONFIGS["block2_resample_move"]
    fn = jax.jit(jax.vmap(lambda k: twisted_smc(
        k, LM, params, PROMPTS, potential, prompt_length=LENGTHS, num_particles=512,
        max_new_tokens=T, **options)))
    result = fn(jax.random.split(jax.random.PRNGKey(4), 128))
    for b, prev in enumerate(LAST):
        seqs, pi, Z = exact_tilted(params, log_phi, prev)
        per_prompt = jax.tree_util.tree_map(lambda x, b=b: x[:, b], result)
        z_evidence, z_max, tv_ratio = check_against_exact(per_prompt, seqs, pi, Z)
        assert abs(z_evidence) < 4.0 and z_max < 4.5 and tv_ratio < TV_TOLERANCE, (
            b, z_evidence, z_max, tv_ratio)
