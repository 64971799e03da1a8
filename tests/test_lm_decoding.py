"""The LanguageModel protocol and the decoding layer every LM algorithm is made of."""
import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from targets.lm import decoding
from targets.lm.protocol import LanguageModel, check_language_model
from targets.toy.enumerable_lm import EnumerableLM

LM = EnumerableLM(n_tokens=3, max_new=4)
EOS_IDS = LM.eos_ids
T = LM.max_new
ROOT = pathlib.Path(__file__).resolve().parents[1]
ALGORITHMS = ("generate", "power", "twisted", "mh_power")


@pytest.fixture(scope="module")
def params():
    return LM.init_params(jax.random.PRNGKey(0))


def test_models_satisfy_the_protocol():
    from targets.lm.config import TransformerConfig
    from targets.lm.transformer import Transformer
    config = TransformerConfig(architecture="llama", vocab_size=11, dim=8, n_layers=1, n_heads=2,
                               n_kv_heads=1, head_dim=4, ffn_dim=16, norm_eps=1e-5,
                               context_length=32)
    for model in (LM, Transformer(config, max_len=16, eos_ids=(1,))):
        assert isinstance(model, LanguageModel)
        check_language_model(model)


def test_an_object_without_the_protocol_is_refused_by_name():
    class NotAModel:
        vocab_size = 3
    with pytest.raises(TypeError, match="lacks .*decode"):
        check_language_model(NotAModel())
    with pytest.raises(TypeError, match="LanguageModel"):
        decoding.check_prompts(NotAModel(), np.zeros((1, 1), np.int32), np.ones(1, np.int32), 1)


def prefilled(params):
    return decoding.prefill(LM, params, jnp.array([[LM.bos_id]], jnp.int32),
                            jnp.array([1], jnp.int32))


def start(params, copies=3):
    return decoding.start(LM, prefilled(params), max_new_tokens=T, eos_ids=EOS_IDS,
                          copies=copies)


def test_append_writes_live_rows_and_freezes_the_others(params):
    s = start(params)
    tokens = jnp.array([0, LM.eos_ids[0], 2], jnp.int32)
    s1 = decoding.append(LM, params, prefilled(params), s, tokens, jnp.zeros(3), EOS_IDS)
    assert np.asarray(s1.length).tolist() == [1, 1, 1]
    assert np.asarray(s1.done).tolist() == [False, True, False]
    assert np.asarray(s1.ended_with_eos).tolist() == [False, True, False]
    expected = np.asarray(decoding.token_logprob(s, tokens))
    np.testing.assert_allclose(np.asarray(s1.token_logp[:, 0]), expected)
    # the ended row is frozen: its next token is ignored, nothing is written or scored
    s2 = decoding.append(LM, params, prefilled(params), s1, jnp.array([1, 1, 1], jnp.int32),
                         jnp.zeros(3), EOS_IDS)
    assert np.asarray(s2.length).tolist() == [2, 1, 2]
    assert int(s2.tokens[1, 1]) == LM.eos_ids[0] and float(s2.token_logp[1, 1]) == 0.0
    np.testing.assert_array_equal(np.asarray(s2.logprobs[1]), np.asarray(s1.logprobs[1]))


def test_rows_end_at_max_new_tokens(params):
    s = start(params, copies=2)
    for _ in range(T):
        s = decoding.append(LM, params, prefilled(params), s, jnp.array([0, 0], jnp.int32),
                            jnp.zeros(2), EOS_IDS)
    assert np.asarray(s.done).all() and not np.asarray(s.ended_with_eos).any()
    assert np.asarray(s.length).tolist() == [T, T]


def test_rollout_teacher_forces_then_samples_and_respects_the_limit(params):
    s = start(params, copies=4)
    teacher = jnp.array([[0, 1, 2, 0]] * 4, jnp.int32)
    cut = jnp.array([0, 1, 2, 3], jnp.int32)
    out = decoding.rollout(jax.random.PRNGKey(0), LM, params, prefilled(params), s,
                           lambda st: st.logprobs, EOS_IDS, limit=3, teacher=teacher, cut=cut)
    tokens, length = np.asarray(out.tokens), np.asarray(out.length)
    for row in range(4):
        kept = min(int(cut[row]), 3)
        assert tokens[row, :kept].tolist() == [0, 1, 2][:kept]
        assert length[row] <= 3 and (length[row] == 3 or out.ended_with_eos[row])
    # scores of the teacher-forced tokens are the model's
    full = decoding.rollout(jax.random.PRNGKey(1), LM, params, prefilled(params),
                            start(params, 1), lambda st: st.logprobs, EOS_IDS, teacher=teacher[:1],
                            cut=jnp.array([T], jnp.int32))
    np.testing.assert_allclose(float(full.logp[0]),
                               LM.sequence_logprob(params, (0, 1, 2, 0)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(full.token_logq), np.asarray(full.token_logp))


@pytest.mark.parametrize("prompt, message", [
    ([[LM.vocab_size]], "outside the vocabulary"),
    ([[-1]], "outside the vocabulary"),
    ([[10 ** 6]], "outside the vocabulary"),
    ([[LM.bos_id]], None),
])
def test_token_ids_outside_the_vocabulary_are_refused(params, prompt, message):
    prompt = np.asarray(prompt, np.int32)
    call = lambda: decoding.check_prompts(LM, prompt, np.ones(1, np.int32), T)
    if message is None:
        call()
        return
    with pytest.raises(ValueError, match=message):
        call()
    from targets.lm.power import power_smc
    with pytest.raises(ValueError, match=message):
        power_smc(jax.random.PRNGKey(0), LM, params, prompt[0], alpha=2.0, num_particles=2,
                  max_new_tokens=T)


def test_max_new_tokens_zero_is_refused(params):
    from targets.lm.generate import generate
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(jax.random.PRNGKey(0), LM, params, jnp.array([[LM.bos_id]]), jnp.array([1]),
                 max_new_tokens=0)


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def test_no_lm_module_imports_a_sibling_algorithm_or_a_private_name():
    for path in sorted((ROOT / "targets" / "lm").rglob("*.py")):
        for module, names in _imports(path):
            for algorithm in ALGORITHMS:
                sibling = f"targets.lm.{algorithm}"
                assert module != sibling and not (module == "targets.lm" and algorithm in names), (
                    f"{path.relative_to(ROOT)} imports the algorithm module {sibling}")
            if module.split(".")[0] in ("smc", "proposals", "targets"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.relative_to(ROOT)} imports private {private}"


def test_a_traced_prompt_outside_the_vocabulary_gives_nan_not_a_clamped_answer(params):
    from targets.lm.generate import generate
    prompts = jnp.array([[LM.bos_id], [10 ** 6]], jnp.int32)
    out = jax.jit(lambda p: generate(jax.random.PRNGKey(0), LM, params, p, jnp.array([1, 1]),
                                     max_new_tokens=T))(prompts)
    logp = np.asarray(out.logp)
    assert np.isfinite(logp[0]) and np.isnan(logp[1])


def test_prompt_length_zero_is_refused(params):
    from targets.lm.generate import generate
    with pytest.raises(ValueError, match="prompt_length"):
        generate(jax.random.PRNGKey(0), LM, params, jnp.array([[LM.bos_id]]), jnp.array([0]),
                 max_new_tokens=T)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_rows_are_written_at_their_own_slots(dtype):
    # A 16-bit cache is written by a select on CPU, a 32-bit one by a scatter: both put row r's
    # values at slot[r] and nowhere else, and drop a slot past the end.
    from targets.lm.transformer import write_rows
    cache = jax.random.normal(jax.random.PRNGKey(0), (4, 2, 5, 3)).astype(dtype)
    values = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 3)).astype(dtype)
    slot = jnp.array([0, 4, 5, 2])
    got = np.asarray(jax.jit(write_rows)(cache, slot, values).astype(jnp.float32))
    want = np.asarray(cache.astype(jnp.float32)).copy()
    for r, s in enumerate(np.asarray(slot)):
        if s < 5:
            want[r, :, s] = np.asarray(values[r].astype(jnp.float32))
    np.testing.assert_array_equal(got, want)
