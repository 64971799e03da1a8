"""Several EOS ids stop a sequence (targets.lm.decoding.resolve_eos and is_eos).

A chat model ends a turn with either of two tokens (e.g. ``<|im_end|>`` and ``<|endoftext|>``):
every id of ``eos_ids`` ends a row, the first is the fill token and the forced one. The toy is the
enumerable LM with two EOS tokens, so that every check is against exact answers:
- the decoding layer: a row stops at either id, ``ended_with_eos`` is set, the fill is the first id;
- Power-SMC is exact on it (the Monte Carlo checks and tolerance of tests/test_power.py), which it
  is not when only the first id is passed (the other is then an ordinary token);
- twisted SMC's masked proposal allows every EOS id (a token DFA knows nothing of EOS): Z_hat is
  unbiased and the mass of the sequences that end with the second id is right;
- bad ``eos_ids`` are refused by name before anything is traced.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from targets.lm import decoding
from targets.lm import potentials as P
from targets.lm.generate import generate
from targets.lm.mh_power import mh_power_components
from targets.lm.power import power_model, power_smc
from targets.lm.twisted import twisted_model, twisted_smc
from targets.toy.enumerable_lm import EnumerableLM
from tests.test_power import N_LARGE, R, assert_matches_exact

LM = EnumerableLM(n_tokens=2, max_new=3, n_eos=2)   # tokens 0, 1; EOS 2 and 3; BOS 4
FIRST, SECOND = LM.eos_ids
T = LM.max_new
PROMPT = jnp.array([LM.bos_id], jnp.int32)
ALPHA = 3.0


@pytest.fixture(scope="module")
def params():
    # chosen so that both ids carry mass under p^alpha and under the constraint's target
    return LM.init_params(jax.random.PRNGKey(5), scale=0.8, eos_bias=0.0)


def test_the_toy_has_two_eos_ids_and_a_support_that_sums_to_one(params):
    assert LM.eos_ids == (2, 3) and LM.bos_id == 4 and LM.vocab_size == 5
    seqs, logp = LM.enumerate(params)
    assert len(seqs) == 2 * (1 + 2 + 4) + 2 ** 3
    np.testing.assert_allclose(np.exp(logp).sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("eos_ids, expected", [
    (None, (2, 3)), (3, (3,)), ([3, 2, 3], (3, 2)), (np.array([2, 3]), (2, 3)),
    (np.int64(2), (2,)), (-1, (-1,)), ([-1, -1], (-1,)),
])
def test_resolve_eos(eos_ids, expected):
    assert decoding.resolve_eos(LM, eos_ids) == expected


@pytest.mark.parametrize("eos_ids", [
    5, -2, [2, 5], [2, -1], 2.5, [2, 3.0], True, "2", [], (), None,
])
def test_bad_eos_ids_are_refused_by_name(eos_ids):
    lm = EnumerableLM(n_tokens=2, max_new=3, n_eos=0) if eos_ids is None else LM
    with pytest.raises(ValueError, match="eos_ids"):
        decoding.resolve_eos(lm, eos_ids)


@pytest.mark.parametrize("build", [
    lambda e: generate(jax.random.PRNGKey(0), LM, None, PROMPT[None], jnp.array([1]),
                       max_new_tokens=T, eos_ids=e),
    lambda e: power_model(LM, None, PROMPT, alpha=2.0, max_new_tokens=T, eos_ids=e),
    lambda e: twisted_model(LM, None, PROMPT, P.token_count(0), max_new_tokens=T, eos_ids=e),
    lambda e: mh_power_components(LM, None, PROMPT, alpha=2.0, max_new_tokens=T, block_size=1,
                                  mh_steps=1, eos_ids=e),
], ids=["generate", "power", "twisted", "mh_power"])
def test_every_algorithm_checks_eos_ids_before_tracing(build):
    with pytest.raises(ValueError, match="eos_ids"):
        build([FIRST, LM.vocab_size])


def test_a_row_stops_at_either_id_and_is_filled_with_the_first(params):
    eos_ids = decoding.resolve_eos(LM, None)
    prefilled = decoding.prefill(LM, params, PROMPT[None], jnp.array([1], jnp.int32))
    s = decoding.start(LM, prefilled, max_new_tokens=T, eos_ids=eos_ids, copies=3)
    s = decoding.append(LM, params, prefilled, s, jnp.array([0, FIRST, SECOND], jnp.int32),
                        jnp.zeros(3), eos_ids)
    assert np.asarray(s.done).tolist() == [False, True, True]
    assert np.asarray(s.ended_with_eos).tolist() == [False, True, True]
    assert np.asarray(s.body_length).tolist() == [1, 0, 0]
    s = decoding.append(LM, params, prefilled, s, jnp.array([SECOND, 0, 0], jnp.int32),
                        jnp.zeros(3), eos_ids)
    assert np.asarray(s.length).tolist() == [2, 1, 1]
    assert np.asarray(s.ended_with_eos).tolist() == [True, True, True]
    np.testing.assert_array_equal(np.asarray(s.tokens), [[0, SECOND, FIRST],
                                                         [FIRST, FIRST, FIRST],
                                                         [SECOND, FIRST, FIRST]])


def test_forced_eos_is_the_first_id(params):
    eos_ids = decoding.resolve_eos(LM, None)
    prefilled = decoding.prefill(LM, params, PROMPT[None], jnp.array([1], jnp.int32))
    s = decoding.start(LM, prefilled, max_new_tokens=T, eos_ids=eos_ids, copies=2)
    for token in (0, 1):
        s = decoding.append(LM, params, prefilled, s, jnp.full((2,), token, jnp.int32),
                            jnp.zeros(2), eos_ids)
    tokens, logq, forced = decoding.draw_token(jax.random.PRNGKey(0), s, s.logprobs, eos_ids,
                                               forced_eos=True)
    assert np.asarray(forced).all() and np.asarray(tokens).tolist() == [FIRST, FIRST]
    assert np.asarray(logq).tolist() == [0.0, 0.0]


def test_generate_stops_at_either_id_and_only_at_those_passed(params):
    rows = 256
    prompts, lengths = jnp.tile(PROMPT[None], (rows, 1)), jnp.ones((rows,), jnp.int32)
    key = jax.random.PRNGKey(1)
    both = generate(key, LM, params, prompts, lengths, max_new_tokens=T)
    tokens, length = np.asarray(both.tokens), np.asarray(both.length)
    ends = tokens[np.arange(rows), length - 1]
    ended = np.asarray(both.ended_with_eos)
    np.testing.assert_array_equal(ended, np.isin(ends, LM.eos_ids))
    assert {FIRST, SECOND} <= set(ends[ended].tolist())       # rows end at either id
    for row in range(rows):
        assert not np.isin(tokens[row, :length[row] - 1], LM.eos_ids).any()   # at the first
        assert (tokens[row, length[row]:] == FIRST).all()                       # fill
    first_only = generate(key, LM, params, prompts, lengths, max_new_tokens=T, eos_ids=FIRST)
    tokens, length = np.asarray(first_only.tokens), np.asarray(first_only.length)
    inside = np.arange(T)[None, :] < (length - 1)[:, None]
    assert (inside & (tokens == SECOND)).any()         # the second id no longer ends a row
    assert not (inside & (tokens == FIRST)).any()


def exact_power(params):
    seqs, logp = LM.enumerate(params)
    a = ALPHA * logp
    log_z = np.logaddexp.reduce(a)
    return seqs, np.exp(a - log_z), np.exp(log_z)


def test_power_smc_is_exact_with_two_eos_ids(params):
    """The checks of tests/test_power.py (z-tests of Z_hat and of each sequence, TV over its noise
    floor < TV_TOLERANCE). With ``eos_ids=FIRST`` instead, the run puts its mass on sequences
    that continue past the second id, outside the support (checked by hand: the checks fail)."""
    seqs, pi, Z = exact_power(params)
    assert 0.1 < sum(p for s, p in zip(seqs, pi) if s[-1] == SECOND) < 0.9   # both ids matter
    run = jax.jit(jax.vmap(lambda k: power_smc(k, LM, params, PROMPT, alpha=ALPHA,
                                               num_particles=N_LARGE, max_new_tokens=T,
                                               ramp_length=2)))
    result = run(jax.random.split(jax.random.PRNGKey(2), R))
    assert_matches_exact(result, seqs, pi, Z)


def test_masked_twisted_smc_allows_every_eos_id(params):
    """A token DFA over the ordinary tokens (``at least one 0``) allows no EOS column itself:
    twisted.py must allow each EOS id where the body is complete. Z_hat / Z has mean 1 and the
    weighted mass of the sequences ending with the second id matches the exact one."""
    trans = np.array([[1, 0], [1, 1]])             # state 1 once a 0 has been seen (accepting)
    potential = P.dfa_constraint(trans, 0, [False, True])
    seqs, logp = LM.enumerate(params)
    ok = np.array([0 in (s[:-1] if s[-1] in LM.eos_ids else s) for s in seqs])
    mass = np.where(ok, np.exp(logp), 0.0)
    Z = mass.sum()
    second = sum(m for s, m in zip(seqs, mass) if s[-1] == SECOND) / Z
    assert 0.1 < second < 0.9
    replicates, n = 64, 256
    run = jax.jit(jax.vmap(lambda k: twisted_smc(k, LM, params, PROMPT, potential,
                                                 num_particles=n, max_new_tokens=T,
                                                 forced_eos=False)))
    result = run(jax.random.split(jax.random.PRNGKey(3), replicates))
    ratio = np.exp(np.asarray(result.log_evidence, np.float64)) / Z
    assert abs(ratio.mean() - 1.0) < 4.0 * ratio.std(ddof=1) / np.sqrt(replicates), ratio.mean()
    tokens, length = np.asarray(result.particles.tokens), np.asarray(result.particles.length)
    last = np.take_along_axis(tokens, (length - 1)[..., None], axis=-1)[..., 0]
    weights = np.asarray(result.weights, np.float64)
    per_run = (weights * (last == SECOND)).sum(-1)
    z = (per_run.mean() - second) / (per_run.std(ddof=1) / np.sqrt(replicates))
    assert abs(z) < 4.5, (per_run.mean(), second)


@pytest.mark.parametrize("build", [
    lambda: power_model(LM, None, PROMPT, alpha=2.0, max_new_tokens=T, eos_ids=-1,
                        forced_eos=True),
    lambda: twisted_model(LM, None, PROMPT, P.token_count(0), max_new_tokens=T, eos_ids=-1,
                          forced_eos=True),
], ids=["power", "twisted"])
def test_forced_eos_without_an_eos_token_is_refused(build):
    """eos_ids=-1 (no token ends a row) leaves forced_eos nothing to force: token -1 would be
    written into the sequences."""
    with pytest.raises(ValueError, match="forced_eos"):
        build()
