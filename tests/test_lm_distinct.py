"""Decoding only the distinct live rows (`targets.lm.distinct`, `distinct_rows=True`).

- `representatives` merges exactly the rows of one prompt with equal tokens and length: rows that
  differ in one early token, in length, in prompt or that are not live stay apart.
- `distinct.decode` feeds the model one row per distinct live sequence (counted by a model that
  records what it is fed) and hands every copy its representative's cache and distribution.
- Power-SMC and twisted SMC (lookahead rollouts, B prompts) give the same results with and without
  it on the enumerable LM, with far fewer rows fed to the model.
- On SmolLM2 (whose cache depends on every token, not only the last) Power-SMC resampling at
  every step keeps each particle's log p equal to a full recomputation: a row handed the wrong
  representative's cache would not (tests/test_lm_prompt_cache.py runs the same check with it).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smc
from targets.lm import decoding, distinct
from targets.lm.potentials import Potential
from targets.lm.power import power_model
from targets.lm.twisted import twisted_model
from targets.toy.enumerable_lm import EnumerableLM

LM = EnumerableLM(n_tokens=3, max_new=5)


def assert_same_runs(plain, fewer):
    """Equal results, but for the log-probabilities of ended rows: meaningless either way, and
    with `distinct_rows` the row's previous ones."""
    done = np.asarray(plain.particles.done)
    np.testing.assert_array_equal(np.asarray(plain.particles.logprobs)[~done],
                                  np.asarray(fewer.particles.logprobs)[~done])
    strip = lambda r: r._replace(particles=r.particles._replace(logprobs=None, cache=None))
    for a, b in zip(jax.tree.leaves(strip(plain)), jax.tree.leaves(strip(fewer))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@dataclasses.dataclass(frozen=True, eq=False)
class CountingLM(EnumerableLM):
    """The enumerable LM, recording the number of live rows (position < max_len) of each
    decode call on the host."""

    fed: list = dataclasses.field(default_factory=list)

    def decode(self, params, prompt_cache, cache, tokens, positions):
        live = jnp.sum(positions < self.max_len)
        jax.debug.callback(lambda n: self.fed.append(int(n)), live, ordered=True)
        return super().decode(params, prompt_cache, cache, tokens, positions)


def test_representatives_merge_exactly_the_copies():
    seq = jnp.asarray([[1, 2, 0], [1, 2, 0], [0, 2, 0], [1, 2, 0], [1, 2, 0], [1, 2, 0],
                       [1, 2, 0], [1, 2, 0]], jnp.int32)
    length = jnp.asarray([2, 2, 2, 2, 2, 3, 2, 2], jnp.int32)
    live = jnp.asarray([1, 1, 1, 1, 0, 1, 1, 1], bool)
    rep = np.asarray(distinct.representatives(seq, length, live, groups=2))
    # group 0 (rows 0-3): 0, 1, 3 equal; 2 differs in its first token
    # group 1 (rows 4-7): 4 not live, 5 longer, 6 and 7 equal (never merged with group 0)
    np.testing.assert_array_equal(rep, [0, 0, 2, 0, 4, 5, 6, 6])


def test_representatives_survive_hash_collisions_and_many_rows():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 3, size=(6, 7))
    picks = rng.integers(0, 6, size=64)
    seq = jnp.asarray(base[picks], jnp.int32)
    rep = np.asarray(distinct.representatives(seq, jnp.full((64,), 7), jnp.ones(64, bool), 1))
    first = {p: int(np.flatnonzero(picks == p)[0]) for p in set(picks.tolist())}
    np.testing.assert_array_equal(rep, [first[p] for p in picks])


def test_decode_feeds_one_row_per_distinct_live_sequence():
    lm = CountingLM(n_tokens=3, max_new=5)
    params = lm.init_params(jax.random.PRNGKey(0))
    prompts = jnp.full((2, 1), lm.bos_id, jnp.int32)
    prefilled = decoding.prefill(lm, params, prompts, jnp.ones((2,), jnp.int32))
    state = decoding.start(lm, prefilled, max_new_tokens=5, eos_ids=lm.eos_ids, copies=8)
    # prompt 0: 8 copies of token 1; prompt 1: tokens 0 and 2, four each
    tokens = jnp.asarray([1] * 8 + [0, 2] * 4, jnp.int32)
    plain = decoding.append(lm, params, prefilled, state, tokens, jnp.zeros(16), lm.eos_ids)
    fewer = decoding.append(lm, params, prefilled, state, tokens, jnp.zeros(16), lm.eos_ids,
                            distinct_rows=True)
    jax.effects_barrier()
    assert lm.fed == [16, 3]
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fewer)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def run_power(lm, params, distinct_rows, key, prompts):
    model = power_model(lm, params, prompts, alpha=3.0, max_new_tokens=lm.max_new,
                        distinct_rows=distinct_rows)
    return jax.jit(lambda k: smc.run(k, model, 64, ess_threshold=0.9))(key)


def test_power_smc_same_results_on_fewer_rows():
    lm = CountingLM(n_tokens=3, max_new=5)
    params = lm.init_params(jax.random.PRNGKey(1))
    prompts = jnp.full((2, 1), lm.bos_id, jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    plain = run_power(lm, params, False, keys, prompts)
    jax.effects_barrier()
    fed_plain, lm.fed[:] = sum(lm.fed), []
    fewer = run_power(lm, params, True, keys, prompts)
    jax.effects_barrier()
    assert np.asarray(plain.resampled).any()
    assert_same_runs(plain, fewer)
    # 3 tokens and an EOS over 5 steps: at most 4 + 16 + 64 + ... distinct prefixes per prompt
    assert sum(lm.fed) < 0.6 * fed_plain


def test_twisted_lookahead_same_results():
    params = LM.init_params(jax.random.PRNGKey(3))
    potential = Potential(prefix=lambda tokens, n: jnp.zeros(()),
                          complete=lambda tokens, n: -0.7 * jnp.sum(
                              jnp.where(jnp.arange(tokens.shape[0]) < n, tokens == 1, False)))
    prompt = jnp.asarray([LM.bos_id], jnp.int32)

    def run(distinct_rows):
        model = twisted_model(LM, params, prompt, potential, max_new_tokens=LM.max_new,
                              forced_eos=False, lookahead=4, distinct_rows=distinct_rows)
        return jax.jit(lambda k: smc.run(k, model, 32))(jax.random.PRNGKey(4))

    assert_same_runs(run(False), run(True))


def test_distinct_rows_is_checked():
    with pytest.raises(TypeError, match="distinct_rows"):
        power_model(LM, LM.init_params(jax.random.PRNGKey(0)), jnp.asarray([LM.bos_id]),
                    alpha=2.0, max_new_tokens=3, distinct_rows="yes")
