"""Gemma 3 270M (the shipped Q4_K_M GGUF) against Hugging Face transformers on the same file.

transformers' own GGUF loader and torch Gemma 3 (fp32) produced tests/data/gemma3_reference.npz
(tests/data/make_gemma3_reference.py; loading transformers live takes minutes here): logits of
three prompts, one longer than the 512-token sliding window, and 64 greedy tokens of each. We
load the file with `targets.lm.load` and run the three prompts as one right-padded batch.
"""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("gguf")

from gemma3 import GEMMA3_PATH, needs_gemma3

pytestmark = needs_gemma3
REFERENCE = Path(__file__).parent / "data" / "gemma3_reference.npz"
PROMPTS = 3


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(REFERENCE))


@pytest.fixture(scope="module")
def batch(reference):
    """Right-padded prompts [3, P] and their lengths."""
    prompts = [reference[f"prompt_{i}"] for i in range(PROMPTS)]
    width = max(len(p) for p in prompts)
    tokens = np.zeros((PROMPTS, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return tokens, np.asarray([len(p) for p in prompts], np.int32)


@pytest.fixture(scope="module")
def gemma(reference, batch):
    from targets.lm.load import load
    width = batch[0].shape[1]
    new = len(reference["greedy_0"])
    # unrolled layers: 64 decode steps run ~1.5x faster than with scan_layers, which outweighs
    # their slower compilation here
    return load(GEMMA3_PATH, max_len=width + new)


def test_config_is_gemma3(gemma):
    model, _, tokenizer = gemma
    c = model.config
    assert (c.architecture, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim) == \
        ("gemma3", 18, 640, 4, 1, 256)
    assert c.sliding_window == 512 and sum(c.sliding_layers) == 15 and c.rope_local.base == 1e4
    assert model.eos_ids == (1,) and model.bos_id == 2 and tokenizer.vocab_size == 262144


def test_logits_match_transformers(gemma, reference, batch):
    """At every stored position and id: |ours - transformers| <= 1e-4 x the std of the
    reference's logit row (the float32 rounding of two implementations summing in different
    orders is ~1e-6 relative; a wrong norm, scale, window or RoPE base is O(1))."""
    model, params, _ = gemma
    tokens, _ = batch
    positions = [reference[f"positions_{i}"] for i in range(PROMPTS)]
    width = max(len(p) for p in positions)
    at = np.stack([np.pad(p, (0, width - len(p)), mode="edge") for p in positions])
    logits = np.asarray(jax.jit(model.forward)(params, jnp.asarray(tokens), jnp.asarray(at)))
    for i in range(PROMPTS):
        k = len(positions[i])
        ours = np.take_along_axis(logits[i, :k], reference[f"ids_{i}"], axis=1)
        err = np.abs(ours - reference[f"logits_{i}"]) / reference[f"std_{i}"][:, None]
        assert err.max() <= 1e-4, (i, float(err.max()))


def test_64_greedy_tokens_match_transformers(gemma, reference, batch):
    """The three prompts decode together (right-padded, one of them past the sliding window)
    and each row's 64 greedy tokens are transformers' for that prompt alone."""
    from targets.lm.generate import generate
    model, params, _ = gemma
    tokens, lengths = batch
    new = len(reference["greedy_0"])
    out = jax.jit(lambda p, t, n: generate(jax.random.key(0), model, p, t, n, max_new_tokens=new,
                                           temperature=0.0, eos_ids=-1))(params, tokens, lengths)
    for i in range(PROMPTS):
        np.testing.assert_array_equal(np.asarray(out.tokens[i]), reference[f"greedy_{i}"])
