"""Twisted SMC with the exact masked proposal q(v) ~ p(v)^{1/tau} 1[v allowed] (targets/lm/twisted).

- ``allowed`` against the potential itself: for random prefixes, token v is allowed exactly when
  appending it leaves the prefix potential finite (the complete one when the sequence ends there).
- Exactness on the enumerable toy LM of tests/test_power.py, with its Monte Carlo checks (Z_hat / Z
  mean-1 z-test over R replicates; per-sequence z-tests; TV against its noise floor): a character
  regex ' ?\\d+\\.?' on string tokens (compiled by outlines-core; tempered proposal, blocks of 2),
  a JSON Schema (strings of at most 2 characters over the tokens '"', 'a', 'b'), and a token DFA
  times soft rewards with a forced EOS (the mask then looks at ``complete`` one token before the
  end). The targets are p(y) 1[y in L] exp(lam r(y)) by enumeration (Python's ``re`` for the
  regex, ``json.loads`` and `jsonschema` for the schema). The configurations of tests/test_twisted.py with banned tokens
  and DFAs (resample-move and lookahead among them) run masked too: it is the default.
- Particle survival: an LM that puts all but 2e-60 of its mass on tokens the regex forbids loses
  every particle without the mask (deterministically, in float32) and none with it, and is exact
  with it; a row with no allowed token at all gets weight -inf, never NaN.
"""
import itertools
import json
import re

import jax
import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from targets.lm import potentials as P
from targets.lm.twisted import twisted_components, twisted_smc
from tests.test_power import LM, T, assert_matches_exact, check_against_exact

N, R = 256, 64
PROMPT = jnp.array([LM.bos_id])
EOS = LM.eos_ids[0]
NUMBER_TOKENS = ["1", ".", " "]       # tokens 0, 1, 2 as text
NUMBER = r" ?\d+\.?"
STRING_TOKENS = ['"', "a", "b"]       # a JSON string over tokens 0, 1, 2
SHORT_STRING = {"type": "string", "maxLength": 2}


@pytest.fixture(scope="module")
def params():
    return LM.init_params(jax.random.PRNGKey(3), scale=0.8)


def zero_then_two():
    """Token DFA: no token 1, and every 0 is followed by a 2 (state 1: a 2 is owed)."""
    trans = np.full((2, LM.vocab_size), -1, np.int64)
    trans[0, 0], trans[0, 2], trans[1, 2] = 1, 0, 0
    return P.dfa_constraint(trans, 0, [True, False])


def in_zero_then_two(b):
    return 1 not in b and all(y == 2 for x, y in itertools.pairwise(b + [None]) if x == 0)


def number_text(b):
    return "".join(NUMBER_TOKENS[t] for t in b)


def json_valid(b, schema):
    try:
        return jsonschema.validators.validator_for(schema)(schema).is_valid(
            json.loads("".join(STRING_TOKENS[t] for t in b)))
    except json.JSONDecodeError:
        return False


def short_string():
    # EOS and BOS are not text: special_ids keeps their literal names out of the language
    return P.json_schema_constraint(SHORT_STRING, STRING_TOKENS + ["<eos>", "<bos>"],
                                    special_ids=[EOS, LM.bos_id])


def body(seq):
    return [x for x in seq if x != EOS]


# name -> (potential, exact log phi on a body, options)
CONFIGS = {
    "regex_tempered_block2": (
        P.regex_constraint(NUMBER, NUMBER_TOKENS + ["<eos>", "<bos>"]),
        lambda b: 0.0 if re.fullmatch(NUMBER, number_text(b)) else -np.inf,
        {"temperature": 0.7, "block_size": 2, "forced_eos": False}),
    "json_schema_string": (
        short_string(), lambda b: 0.0 if json_valid(b, SHORT_STRING) else -np.inf,
        {"forced_eos": False}),
    "dfa_times_soft_rewards": (
        P.product(zero_then_two(), P.token_count(2, 0.9), P.length_potential(-0.3)),
        lambda b: 0.9 * b.count(2) - 0.3 * len(b) if in_zero_then_two(b) else -np.inf,
        {}),                                   # the default: forced EOS
}


def exact_tilted(params, log_phi, forced_eos=True):
    """(sequences, pi, Z); with ``forced_eos`` only EOS-terminated sequences (<= T - 1 tokens)."""
    seqs = LM.sequences()
    a = np.array([LM.sequence_logprob(params, s) + log_phi(body(s))
                  if s[-1] == EOS or not forced_eos else -np.inf for s in seqs])
    log_z = np.logaddexp.reduce(a)
    return seqs, np.exp(a - log_z), np.exp(log_z)


def test_allowed_is_exactly_where_the_next_potential_is_finite():
    regex = P.regex_constraint(NUMBER, NUMBER_TOKENS + ["<eos>", "<bos>"])
    potentials = {"dfa": zero_then_two(), "regex": regex, "banned": P.banned_tokens([1]),
                  "json": short_string(),
                  "lazy_regex": P.regex_constraint(r"^(?:a|ab)+?b?$", ["a", "b", "ab"]),
                  "product": P.product(regex, P.banned_tokens([2]), P.token_count(0, 1.0))}
    V = LM.vocab_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 3, (300, T)).astype(np.int32)
    length = rng.integers(0, T, 300).astype(np.int32)
    ext = np.repeat(tokens[None], 3, 0)             # [3, M, T]: v appended at position length
    ext[:, np.arange(len(length)), length] = np.arange(3)[:, None]
    for name, pot in potentials.items():
        @jax.jit
        def verdicts(tokens, length, ext, pot=pot):
            out = []
            for final, score in ((False, pot.prefix), (True, pot.complete)):
                allow = jax.vmap(lambda t, n, f=final: pot.allowed(t, n, V, jnp.asarray(f)))(
                    tokens, length)
                out.append((allow, jnp.isfinite(jax.vmap(jax.vmap(score), (0, None))(ext,
                                                                                  length + 1))))
            return out
        for final, (allow, finite) in enumerate(verdicts(tokens, length, ext)):
            allow, finite = np.asarray(allow), np.asarray(finite)      # [M, V], [3, M]
            # ordinary tokens only (EOS / BOS are decided by twisted.py)
            np.testing.assert_array_equal(allow[:, :3], finite.T, err_msg=f"{name} {final}")
            assert 0 < allow[:, :3].mean() < 1, name      # both outcomes exercised
    assert P.token_count(0).allowed is None and P.product(P.token_count(0)).allowed is None


_RUNNERS = {}


def run_replicates(params, name, mask_proposal=True):
    """R replicate runs (vmap over keys); one compilation per (config, mask_proposal)."""
    if (name, mask_proposal) not in _RUNNERS:
        potential, _, options = CONFIGS[name]
        _RUNNERS[name, mask_proposal] = jax.jit(jax.vmap(
            lambda k, params: twisted_smc(k, LM, params, PROMPT, potential, num_particles=N,
                                          max_new_tokens=T, mask_proposal=mask_proposal,
                                          **options), (0, None)))
    return _RUNNERS[name, mask_proposal](jax.random.split(jax.random.PRNGKey(1), R), params)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_masked_twisted_smc_is_exact(params, name):
    _, log_phi, options = CONFIGS[name]
    seqs, pi, Z = exact_tilted(params, log_phi, options.get("forced_eos", True))
    assert np.sum(pi > 0.005) >= 5 and np.mean(pi == 0) > 0.5   # spread out, a real constraint
    result = run_replicates(params, name)
    assert int(result.nonfinite_increments.sum()) == 0
    # the mask keeps every particle alive until the end (these constraints never dead-end)
    assert bool(np.all(np.isfinite(np.asarray(result.log_weights))))
    assert_matches_exact(result, seqs, pi, Z)


def dominated_params():
    """p puts all but ~2e-60 of its mass on '.' (token 1) and EOS at every step (logit 0; tokens
    '1' and ' ' at -60): no text of the language starts with either."""
    logits = np.full((T, LM.vocab_size, LM.vocab_size), -60.0, np.float32)
    logits[:, :, 1] = logits[:, :, EOS] = 0.0
    logits[:, :, LM.bos_id] = -np.inf
    return {"table": jax.nn.log_softmax(jnp.asarray(logits), axis=-1)}


def test_mask_keeps_particles_that_the_unmasked_proposal_loses_deterministically():
    name = "regex_tempered_block2"
    params = dominated_params()
    seqs, pi, Z = exact_tilted(params, CONFIGS[name][1], forced_eos=False)
    on, off = run_replicates(params, name, True), run_replicates(params, name, False)
    # unmasked, every first token is '.' or EOS (q = 1 - e^-86 in float32): all rows die
    assert bool(jnp.all(jnp.isneginf(off.log_weights))) and bool(jnp.all(jnp.isneginf(
        off.log_evidence)))
    assert bool(jnp.all(jnp.isfinite(on.log_weights)))
    assert int(on.nonfinite_increments.sum() + off.nonfinite_increments.sum()) == 0
    # two sequences carry the target ('1', '1.'): TV is then one z-score, the z-tests cover it
    z_evidence, z_max, _ = check_against_exact(on, seqs, pi, Z)
    assert abs(z_evidence) < 4.0, z_evidence
    assert z_max < 4.5, z_max


def test_no_allowed_token_gives_weight_minus_inf_not_nan():
    """Language {0 0 0 0 0 0}: live prefixes, but at T = 4 no token (nor EOS) completes it."""
    trans = np.full((7, LM.vocab_size), -1, np.int64)
    trans[np.arange(6), 0] = np.arange(1, 7)
    potential = P.dfa_constraint(trans, 0, [False] * 6 + [True])
    params = LM.init_params(jax.random.PRNGKey(0))
    r = jax.jit(lambda k: twisted_smc(k, LM, params, PROMPT, potential, num_particles=16,
                                      max_new_tokens=T, forced_eos=False))(jax.random.PRNGKey(0))
    assert bool(jnp.all(jnp.isneginf(r.log_weights))) and bool(jnp.isneginf(r.log_evidence))
    assert int(r.nonfinite_increments.sum()) == 0
    tokens, length = r.particles.tokens, r.particles.length
    assert bool(jnp.all(length == T)) and bool(jnp.all(tokens[:, :T - 1] == 0))   # masked


def test_bad_allowed_raises_before_generation():
    params = LM.init_params(jax.random.PRNGKey(0))
    base = P.banned_tokens([1])
    bad = base._replace(allowed=lambda tok, n, V, final: jnp.ones((V - 1,), bool))
    with pytest.raises(ValueError, match="allowed"):
        twisted_components(LM, params, PROMPT, bad, max_new_tokens=T)
    twisted_components(LM, params, PROMPT, bad, max_new_tokens=T, mask_proposal=False)   # unused
    wide = np.zeros((1, LM.vocab_size + 3), np.int64)
    with pytest.raises(ValueError, match="vocabulary"):
        twisted_components(LM, params, PROMPT, P.dfa_constraint(wide, 0, [True]), max_new_tokens=T)
    with pytest.raises(TypeError, match="mask_proposal"):
        twisted_components(LM, params, PROMPT, base, max_new_tokens=T, mask_proposal=1)
