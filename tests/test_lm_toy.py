"""Enumerable toy LM and the batched generation loop (exact frequencies through generate())."""
import jax
import jax.numpy as jnp
import numpy as np

from targets.lm.generate import make_generate
from targets.toy.enumerable_lm import EnumerableLM


def test_enumeration_sums_to_one(key):
    lm = EnumerableLM(n_tokens=3, max_new=4)
    seqs, lp = lm.enumerate(lm.init_params(key))
    assert len(seqs) == len(set(seqs)) == sum(3 ** n for n in range(4)) + 3 ** 4
    np.testing.assert_allclose(np.exp(lp).sum(), 1.0, atol=1e-9)


def test_generate_frequencies_match_enumeration(key):
    lm = EnumerableLM(n_tokens=2, max_new=3)
    params = lm.init_params(key)
    seqs, lp = lm.enumerate(params)
    N = 20000
    gen = make_generate(lm, max_new_tokens=lm.max_new)
    out = gen(jax.random.PRNGKey(1), params, jnp.full((N, 1), lm.bos_id), jnp.ones(N, jnp.int32))
    toks, length = np.asarray(out.tokens), np.asarray(out.length)
    got = [tuple(toks[i, :length[i]]) for i in range(N)]
    index = {s: i for i, s in enumerate(seqs)}
    counts = np.bincount([index[s] for s in got], minlength=len(seqs))
    expected = N * np.exp(lp)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = len(seqs) - 1
    assert chi2 < dof + 5 * np.sqrt(2 * dof), chi2  # ~5 sigma of the chi-square
    # logp returned by the loop equals the exact sequence log-probability
    for i in range(20):
        np.testing.assert_allclose(out.logp[i], lp[index[got[i]]], atol=1e-5)
    np.testing.assert_allclose(out.token_logq.sum(-1), out.logp, atol=1e-5)  # q = p at temperature 1
    assert np.array_equal(np.asarray(out.ended_with_eos),
                          np.array([s[-1] == lm.eos_ids[0] for s in got]))


def test_greedy_generation_is_deterministic_and_stops_at_eos(key):
    lm = EnumerableLM(n_tokens=3, max_new=5)
    params = lm.init_params(key, eos_bias=2.0)
    gen = make_generate(lm, max_new_tokens=lm.max_new, temperature=0.0)
    prompts = jnp.full((4, 1), lm.bos_id)
    a = gen(jax.random.PRNGKey(1), params, prompts, jnp.ones(4, jnp.int32))
    b = gen(jax.random.PRNGKey(2), params, prompts, jnp.ones(4, jnp.int32))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # the greedy path by hand
    table = np.asarray(params["table"])
    prev, path = lm.bos_id, []
    for j in range(lm.max_new):
        prev = int(np.argmax(table[j, prev]))
        path.append(prev)
        if prev == lm.eos_ids[0]:
            break
    n = int(a.length[0])
    assert list(np.asarray(a.tokens[0, :n])) == path
    assert np.all(np.asarray(a.tokens[0, n:]) == lm.eos_ids[0])
