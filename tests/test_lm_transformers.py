"""The JAX Llama, tokenizer and chat template against Hugging Face transformers on the same GGUF.

transformers loads the file with its own GGUF code (config, Q/K un-permutation, tokenizer) and
runs its own torch fp32 Llama, so agreement checks our loader, model and tokenizer end to end
against an independent implementation. Skipped without torch/transformers (the `bench` extra).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")
torch = pytest.importorskip("torch", reason="needs torch (pip install -e '.[bench]')")
pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[bench]')")

from smollm2 import GGUF_PATH, needs_model

pytestmark = needs_model

MAX_LEN = 128
TEXTS = ["Hello, world!", "  leading and   multiple spaces\n\ttab\r\n", "Héllo wörld — naïve café",
         "日本語のテキスト 🙂👍🏽 Ελληνικά русский عربى", "12345 + 67.8 = ? x²",
         "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x ** 2  # ünïcødé\n", "ﬁ ẞ ǅ \u200b\u00a0"]
CONVERSATIONS = [
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "2+2? Answer in ünïcødé 🙂."}],
]


@pytest.fixture(scope="module")
def hf():
    from experiments.benchmarks.decode import load_transformers
    # one thread: torch's OpenMP threads slow down several-fold on a loaded 2-core machine
    return load_transformers(GGUF_PATH, threads=1)


@pytest.fixture(scope="module")
def ours():
    from targets.lm.load import load
    # lax.scan over layers: quick to compile; test_lm_llama checks it equals the unrolled loop
    return load(GGUF_PATH, max_len=MAX_LEN, scan_layers=True)


def _hf_ids(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_tokenizer_ids_and_round_trip_match(hf, ours):
    hf_tok, _ = hf
    tok = ours[2]
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False)
        assert ids == _hf_ids(hf_tok, text), text
        assert tok.decode(ids) == text == hf_tok.decode(ids)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches(hf, ours, add_generation_prompt):
    hf_tok, _ = hf
    tok = ours[2]
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert text == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tok.encode_chat(messages, add_generation_prompt) == _hf_ids(hf_tok, text)


def test_logits_match(hf, ours):
    """Every position's logits of three prompts, ours vs transformers (both fp32)."""
    _, hf_model = hf
    model, params, tok = ours
    prompts = [tok.encode_chat(CONVERSATIONS[2]), tok.encode(TEXTS[3]), tok.encode(TEXTS[6])]
    forward = jax.jit(model.forward)
    for ids in prompts:
        ours_logits = np.asarray(forward(params, jnp.asarray([ids]))[0], np.float64)
        with torch.no_grad():
            theirs = hf_model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        diff = np.abs(ours_logits - theirs).max()
        # fp32 round-off through 30 layers: ~1e-5 of the logit spread (std ~3); a wrong norm,
        # RoPE pair or head grouping moves logits by O(1)
        assert diff < 2e-4 * theirs.std(), (diff, theirs.std())
        assert (ours_logits.argmax(-1) == theirs.argmax(-1)).all()


def test_greedy_continuations_match_for_64_tokens(hf, ours):
    """64 greedy tokens (stopping at EOS) of a prompt placed in row 1 of a right-padded batch."""
    from targets.lm.generate import generate
    _, hf_model = hf
    model, params, tok = ours
    prompt = tok.encode_chat(
        [{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
    n = 64
    padded = np.full((2, len(prompt)), tok.eos_id, np.int32)
    padded[0, :5], padded[1] = prompt[:5], prompt  # row 0: a shorter prompt
    out = jax.jit(lambda p, t, lens: generate(jax.random.key(0), model, p, t, lens,
                                              max_new_tokens=n, temperature=0.0))(
        params, jnp.asarray(padded), jnp.asarray([5, len(prompt)]))
    with torch.no_grad():
        seq = hf_model.generate(input_ids=torch.tensor([prompt]), do_sample=False,
                                max_new_tokens=n, pad_token_id=tok.eos_id)[0, len(prompt):]
    assert int(out.length[1]) == n  # a long answer: all 64 tokens are compared
    assert np.asarray(out.tokens[1]).tolist() == seq.tolist()
