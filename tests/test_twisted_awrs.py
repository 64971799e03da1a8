"""Twisted SMC with a constraint that can only be evaluated (``Potential.accepts``), drawn by AWRS
(targets/lm/twisted.py, proposals/awrs.py, targets/lm/potentials/predicate.py).

Exactness on the enumerable toy LM of tests/test_power.py with its checks (Z_hat / Z z-test over R
replicates, per-sequence z-tests, TV against its noise floor): balanced brackets, a context-free
language no token automaton gives, as a host predicate on the text, alone (tempered, blocks of 2)
and times a token-count reward, and as a Lark grammar checked by llguidance; the target p(y) 1[balanced] exp(lam r(y)) by enumeration.
"""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from targets.lm import potentials as P
from targets.lm.potentials.grammar import lark_constraint
from targets.lm.potentials.predicate import predicate_constraint, prefix_text
from targets.lm.twisted import twisted_components, twisted_smc
from tests.test_power import LM, T, assert_matches_exact

N, R = 256, 48
PROMPT = jnp.array([LM.bos_id])
EOS = LM.eos_ids[0]
TEXT = ["(", ")", "x", "<eos>", "<bos>"]


def depths(text):
    depth = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        yield depth


def open_brackets_ok(text):
    return all(d >= 0 for d in depths(text))


def balanced(text):
    return open_brackets_ok(text) and list(depths(text))[-1:] in ([], [0])


BRACKETS_LARK = """start: item*
item: "(" item* ")" | "x"
"""


def brackets(evaluations=None):
    return predicate_constraint(open_brackets_ok, balanced, TEXT, name="brackets",
                                evaluations=evaluations)


def body(seq):
    return [x for x in seq if x != EOS]


def text_of(b):
    return "".join(TEXT[t] for t in b)


# name -> (potential, exact log phi on a body, options)
CONFIGS = {
    "brackets_tempered_block2": (
        brackets(), lambda b: 0.0 if balanced(text_of(b)) else -np.inf,
        {"temperature": 0.7, "block_size": 2, "forced_eos": False}),
    "lark_brackets": (
        lark_constraint(BRACKETS_LARK, TEXT, special_ids=[3, 4]),
        lambda b: 0.0 if balanced(text_of(b)) else -np.inf, {"forced_eos": False}),
    "brackets_times_reward": (
        P.product(brackets(), P.token_count(2, 0.8)),
        lambda b: 0.8 * b.count(2) if balanced(text_of(b)) else -np.inf, {}),
    # a mask too (banning BOS, which the model never draws): the proposal masks the EOS where
    # the body is unbalanced, so a row whose every next token is refused (e.g. "((" with one
    # token left before the forced EOS) holds a fill token of q = 0; its weight must be 0,
    # not NaN (-inf - -inf: what the genlm benchmark's grammar runs flagged)
    "brackets_and_mask": (
        P.product(brackets(), P.banned_tokens([LM.bos_id])),
        lambda b: 0.0 if balanced(text_of(b)) else -np.inf, {}),
}


@pytest.fixture(scope="module")
def params():
    return LM.init_params(jax.random.PRNGKey(3), scale=0.8)


def exact_tilted(params, log_phi, forced_eos=True):
    """(sequences, pi, Z); with ``forced_eos`` (twisted SMC's default) only the sequences that
    end with an EOS."""
    seqs = LM.sequences()
    a = np.array([LM.sequence_logprob(params, s) + log_phi(body(s))
                  if s[-1] == EOS or not forced_eos else -np.inf for s in seqs])
    log_z = np.logaddexp.reduce(a)
    return seqs, np.exp(a - log_z), np.exp(log_z)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_awrs_twisted_smc_is_exact(params, name):
    potential, log_phi, options = CONFIGS[name]
    seqs, pi, Z = exact_tilted(params, log_phi, options.get("forced_eos", True))
    assert np.sum(pi > 0.005) >= 4 and np.mean(pi == 0) > 0.5   # spread out, a real constraint
    run = jax.jit(jax.vmap(lambda k: twisted_smc(k, LM, params, PROMPT, potential,
                                                 num_particles=N, max_new_tokens=T, **options)))
    result = run(jax.random.split(jax.random.PRNGKey(1), R))
    assert int(result.nonfinite_increments.sum()) == 0
    assert_matches_exact(result, seqs, pi, Z)


def test_only_drawn_tokens_are_evaluated_and_counted(params):
    evaluations = collections.Counter()
    r = jax.jit(lambda k: twisted_smc(k, LM, params, PROMPT, brackets(evaluations),
                                      num_particles=64, max_new_tokens=T))(jax.random.PRNGKey(0))
    assert bool(jnp.all(jnp.isfinite(r.log_weights) | jnp.isneginf(r.log_weights)))
    # at most: per row and token, every ordinary token once plus one verification, and the
    # potential of the row; the masked route would need all 3 per row and token
    asked, tokens = evaluations["checks"], int(r.particles.length.sum())
    assert 0 < evaluations["calls"] <= asked
    assert asked < 64 * T * (3 + 2 + 2)
    assert tokens > 0


def test_predicate_that_raises_names_the_constraint(params):
    def broken(text):
        raise KeyError("boom")
    potential = predicate_constraint(broken, balanced, TEXT, name="my grammar")
    with pytest.raises(Exception, match="my grammar"):
        jax.block_until_ready(twisted_smc(jax.random.PRNGKey(0), LM, params, PROMPT, potential,
                                          num_particles=4, max_new_tokens=T).log_weights)


def test_rejuvenate_is_refused_and_bad_accepts_raise(params):
    with pytest.raises(ValueError, match="rejuvenate"):
        twisted_components(LM, params, PROMPT, brackets(), max_new_tokens=T, rejuvenate=True)
    bad = brackets()._replace(accepts=lambda tok, n, c, f: jnp.zeros((2,), bool))
    with pytest.raises(ValueError, match="accepts"):
        twisted_components(LM, params, PROMPT, bad, max_new_tokens=T)


def test_prefix_text_drops_an_unfinished_character():
    assert prefix_text("é".encode()[:1]) == ""
    assert prefix_text(b"a" + "é".encode()[:1]) == "a"
    assert prefix_text(b"a\xff") == "a\ufffd"
