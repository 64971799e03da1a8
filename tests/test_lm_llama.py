"""The JAX Llama against an independent float64 numpy implementation of the same GGUF file.

The reference below is written from the architecture description and shares no code with
targets/lm: it reads the file with gguf directly (a causal forward in float64, no KV cache), keeps llama.cpp's Q/K row layout and therefore
applies RoPE to adjacent pairs (2i, 2i+1), while the JAX model un-permutes at load time and uses
"rotate half". Agreement checks the loader's permutation, GQA, RoPE base, norms and tied head.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from smollm2 import GGUF_PATH, needs_model

MAX_LEN = 128


# ----------------------------------------------------------------------------- reference
class NumpyLlama:
    """Plain numpy float64 causal Llama forward (batch 1, no cache)."""

    def __init__(self, path):
        from targets.lm.gguf_loader import open_gguf
        r = open_gguf(path)  # gguf's parser; shared with the model's loader: parsing takes ~10 s
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

    def norm(self, x, g):  # x [t, d]
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * g

    def rope(self, x):  # x [t, heads, hd]; pairs (2i, 2i+1) rotate by t * base^(-2i/hd)
        theta = np.arange(len(x))[:, None] * self.base ** (-np.arange(0, self.hd, 2) / self.hd)
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        even, odd = x[..., 0::2], x[..., 1::2]
        y = np.empty_like(x)
        y[..., 0::2] = even * c - odd * s
        y[..., 1::2] = even * s + odd * c
        return y

    def logits(self, tokens):
        """Next-token logits after every prefix of ``tokens``: ``[len(tokens), V]`` float64."""
        x = self.w["token_embd.weight"][tokens]
        n = len(tokens)
        group = self.n_head // self.n_kv
        causal = np.tril(np.ones((n, n), bool))
        for i in range(self.n_layer):
            b = f"blk.{i}."
            h = self.norm(x, self.w[b + "attn_norm.weight"])
            q = self.rope((h @ self.w[b + "attn_q.weight"].T).reshape(n, self.n_head, self.hd))
            k = self.rope((h @ self.w[b + "attn_k.weight"].T).reshape(n, self.n_kv, self.hd))
            v = (h @ self.w[b + "attn_v.weight"].T).reshape(n, self.n_kv, self.hd)
            att = np.empty((n, self.n_head, self.hd))
            for hh in range(self.n_head):
                sc = q[:, hh] @ k[:, hh // group].T / np.sqrt(self.hd)  # [query, key]
                sc = np.where(causal, sc, -np.inf)
                sc = np.exp(sc - sc.max(axis=1, keepdims=True))
                att[:, hh] = (sc / sc.sum(axis=1, keepdims=True)) @ v[:, hh // group]
            x = x + att.reshape(n, -1) @ self.w[b + "attn_output.weight"].T
            h = self.norm(x, self.w[b + "ffn_norm.weight"])
            g = h @ self.w[b + "ffn_gate.weight"].T
            u = h @ self.w[b + "ffn_up.weight"].T
            x = x + (g / (1 + np.exp(-g)) * u) @ self.w[b + "ffn_down.weight"].T
        return self.norm(x, self.w["output_norm.weight"]) @ self.out.T

def _one_blas_thread():
    """BLAS threads spin-wait and run ~10x slower on a loaded 2-core machine; one is enough."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    return threadpool_limits(1)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def lm():
    """The real model with the layer loop as a lax.scan (quick to compile; the unrolled loop runs
    the same layer code, checked against it on a small random model below)."""
    from targets.lm.load import load
    model, params, _ = load(GGUF_PATH, max_len=MAX_LEN, scan_layers=True)
    return model, params


@pytest.fixture(scope="module")
def jitted(lm):
    """One jitted forward/prefill/decode for the module, so that equal shapes compile once."""
    model, _ = lm
    return {name: jax.jit(getattr(model, name)) for name in ("forward", "prefill", "decode")}


@pytest.fixture(scope="module")
def prompt():
    from targets.lm.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(GGUF_PATH)
    return tok.encode_chat([{"role": "user", "content": "Name three colours."}])


def _greedy_jax(model, jitted, params, prompt, n):
    prompt_cache, lp = jitted["prefill"](params, jnp.asarray([prompt]),
                                         jnp.asarray([len(prompt)]))
    cache = model.init_cache(1, n)
    out = []
    for i in range(n):
        t = int(jnp.argmax(lp[0]))
        out.append(t)
        cache, lp = jitted["decode"](params, prompt_cache, cache, jnp.asarray([t]),
                                     jnp.asarray([len(prompt) + i]))
    return out


# ----------------------------------------------------------------------------- tests
@needs_model
def test_logits_and_greedy_match_numpy_reference(lm, jitted, prompt):
    """Logits at every position of the prompt and of our 8 greedy tokens, and each greedy token is
    the reference's argmax after its prefix (so the greedy continuations are equal).
    tests/test_lm_transformers.py compares 64 greedy tokens against transformers."""
    model, params = lm
    n = 8
    ours = _greedy_jax(model, jitted, params, prompt, n)
    ref = NumpyLlama(GGUF_PATH)
    with _one_blas_thread():
        ref_logits = ref.logits(prompt + ours)  # [P + n, V]
    logits = np.asarray(jitted["forward"](params, jnp.asarray([prompt]))[0], np.float64)
    rel = np.abs(logits - ref_logits[:len(prompt)]).max() / ref_logits.std()
    assert rel < 1e-3, rel
    assert ref_logits[len(prompt) - 1:-1].argmax(-1).tolist() == ours


@needs_model
def test_kv_cache_decoding_equals_full_recomputation(lm, jitted, prompt):
    model, params = lm
    seq = prompt + [504, 3458, 28, 2114, 30, 1175]
    P = len(prompt)
    full = jax.nn.log_softmax(jitted["forward"](params, jnp.asarray([seq]))[0], axis=-1)
    prompt_cache, lp = jitted["prefill"](params, jnp.asarray([prompt]), jnp.asarray([P]))
    cache = model.init_cache(1, len(seq) - P)
    got = [lp[0]]
    for i, t in enumerate(seq[P:-1]):
        cache, lp = jitted["decode"](params, prompt_cache, cache, jnp.asarray([t]),
                                     jnp.asarray([P + i]))
        got.append(lp[0])
    np.testing.assert_allclose(np.stack(got), np.asarray(full[P - 1:-1]), atol=2e-4, rtol=0)


@needs_model
def test_rows_at_different_lengths_are_independent(lm, jitted, prompt):
    model, params = lm
    prompts = [prompt, prompt[:7], prompt[3:20]]
    P = max(map(len, prompts))
    pad = np.full((3, P), 2, np.int32)
    for b, p in enumerate(prompts):
        pad[b, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts])
    prompt_cache, lp = jitted["prefill"](params, jnp.asarray(pad), lengths)
    cache = model.init_cache(3, 3)
    feed = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
    batched = [lp]
    for i in range(3):
        cache, lp = jitted["decode"](params, prompt_cache, cache,
                                     jnp.asarray([f[i] for f in feed]), lengths + i)
        batched.append(lp)
    for b, p in enumerate(prompts):  # each row alone, padded differently (with token 0)
        alone = np.zeros((1, P), np.int32)
        alone[0, :len(p)] = p
        p1, l1 = jitted["prefill"](params, jnp.asarray(alone), jnp.asarray([len(p)]))
        c1 = model.init_cache(1, 3)
        single = [l1]
        for i in range(3):
            c1, l1 = jitted["decode"](params, p1, c1, jnp.asarray([feed[b][i]]),
                                      jnp.asarray([len(p) + i]))
            single.append(l1)
        for s, bt in zip(single, batched):
            np.testing.assert_allclose(np.asarray(bt[b]), np.asarray(s[0]), atol=2e-4, rtol=0)


@needs_model
def test_decode_under_vmap_matches_flat_batch(lm, jitted, prompt):
    model, params = lm
    B = 4
    toks = jnp.asarray([prompt] * B)
    prompt_cache, _ = jitted["prefill"](params, toks, jnp.full((B,), len(prompt)))
    cache = model.init_cache(B, 2)
    new = jnp.asarray([5, 6, 7, 8])
    pos = jnp.asarray([len(prompt)] * B)
    _, flat = jitted["decode"](params, prompt_cache, cache, new, pos)
    group = lambda tree: jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[1:]), tree)
    _, lp = jax.jit(jax.vmap(model.decode, in_axes=(None, 0, 0, 0, 0)))(
        params, group(prompt_cache), group(cache), new.reshape(2, 2), pos.reshape(2, 2))
    np.testing.assert_allclose(np.asarray(lp.reshape(B, -1)), np.asarray(flat), atol=1e-4)


@needs_model
def test_position_past_max_len_writes_nothing(lm, jitted, prompt):
    model, params = lm
    prompt_cache, _ = jitted["prefill"](params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]))
    # one real token first, so that the cache has something an errant write would change
    cache, _ = jitted["decode"](params, prompt_cache, model.init_cache(1, 2), jnp.asarray([7]),
                                jnp.asarray([len(prompt)]))
    cache2, lp = jitted["decode"](params, prompt_cache, cache, jnp.asarray([5]),
                                  jnp.asarray([MAX_LEN]))
    assert np.isfinite(np.asarray(lp)).all()
    np.testing.assert_array_equal(np.asarray(cache2["k"]), np.asarray(cache["k"]))
    np.testing.assert_array_equal(np.asarray(cache2["v"]), np.asarray(cache["v"]))


@needs_model
def test_bf16_weights_close_to_fp32(lm, jitted, prompt):
    from targets.lm.load import load
    _, params = lm
    model16, params16, _ = load(GGUF_PATH, dtype=jnp.bfloat16, max_len=MAX_LEN, scan_layers=True)
    assert params16["layers"][0]["wqkv"].dtype == jnp.bfloat16
    c16, lp16 = jax.jit(model16.prefill)(params16, jnp.asarray([prompt]),
                                         jnp.asarray([len(prompt)]))
    _, lp32 = jitted["prefill"](params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((c16["k"], c16["v"])))
    p32 = np.exp(np.asarray(lp32[0], np.float64))
    tv = 0.5 * np.abs(np.exp(np.asarray(lp16[0], np.float64)) - p32).sum()
    assert tv < 0.1, tv
    assert int(jnp.argmax(lp16)) == int(jnp.argmax(lp32))


def _random_model(seed=0, L=3, D=32, H=4, KV=2, hd=6, F=48, V=50):
    """A small random model in the loaders' numpy layout (no file needed) with every option of
    the layer on: q/k/v/o biases, q/k norms, sandwich norms, GeGLU, sliding-window layers with
    their own RoPE base between global ones, soft-capping."""
    from targets.lm.config import Rope, TransformerConfig
    from targets.lm.transformer import Transformer, cast_params
    rng = np.random.default_rng(seed)

    def mat(*shape):
        return rng.normal(size=(L, *shape)).astype(np.float32) / np.sqrt(shape[0])

    def near_one(*shape):
        return 1 + 0.1 * rng.normal(size=(L, *shape)).astype(np.float32)

    layers = {"attn_norm": near_one(D), "ffn_norm": near_one(D), "q_norm": near_one(hd),
              "k_norm": near_one(hd), "post_attn_norm": near_one(D), "post_ffn_norm": near_one(D),
              "wq": mat(D, H * hd), "wk": mat(D, KV * hd), "wv": mat(D, KV * hd),
              "wo": mat(H * hd, D), "w_gate": mat(D, F), "w_up": mat(D, F), "w_down": mat(F, D),
              "bq": 0.1 * mat(1, H * hd)[:, 0], "bk": 0.1 * mat(1, KV * hd)[:, 0],
              "bv": 0.1 * mat(1, KV * hd)[:, 0], "bo": 0.1 * mat(1, D)[:, 0]}
    params = {"embed": rng.normal(size=(V, D)).astype(np.float32),
              "final_norm": np.ones(D, np.float32), "layers": layers}
    cfg = TransformerConfig(
        architecture="test", vocab_size=V, dim=D, n_layers=L, n_heads=H, n_kv_heads=KV,
        head_dim=hd, ffn_dim=F, norm_eps=1e-5, context_length=64, rope=Rope(base=1e5),
        activation="gelu_tanh", qkv_bias=True, out_bias=True, qk_norm=True, sandwich_norm=True,
        embed_scale=D ** 0.5, attn_scale=0.3, sliding_window=3, sliding_layers=(True, False, True),
        rope_local=Rope(base=100.0), attn_logit_softcap=5.0, final_logit_softcap=3.0)
    return Transformer(cfg, max_len=16), cast_params(params, cfg)


def test_unrolled_layer_loop_equals_scan():
    """The Python-unrolled layer loop (default, fast decode) and the lax.scan one agree on
    forward, prefill (logits and cache) and decode, on a small random model with every option
    (sliding and global layers are told apart statically in one, by a flag array in the other)."""
    import dataclasses
    unrolled, params = _random_model()
    scanned = dataclasses.replace(unrolled, scan_layers=True)
    tokens = jnp.asarray([[3, 14, 15, 9, 2, 6], [5, 35, 8, 9, 7, 0]])
    lengths = jnp.asarray([6, 4])

    def run(model, params):
        prompt_cache, lp = model.prefill(params, tokens, lengths)
        cache = model.init_cache(2, 3)
        steps = [lp]
        for i in range(3):
            cache, lp = model.decode(params, prompt_cache, cache, jnp.asarray([11 + i, 20 + i]),
                                     lengths + i)
            steps.append(lp)
        seq = jnp.concatenate([tokens[:1], jnp.asarray([[11, 12]])], axis=1)  # row 0 + fed
        full = jax.nn.log_softmax(model.forward(params, seq)[0], axis=-1)
        return model.forward(params, tokens), (prompt_cache, cache), steps, full

    # one program per loop strategy: compiled once each
    out = {name: jax.jit(functools.partial(run, model))(params)
           for name, model in (("unrolled", unrolled), ("scan", scanned))}
    for a, b in zip(jax.tree.leaves(out["unrolled"]), jax.tree.leaves(out["scan"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)
    # and decoding agrees with recomputation (so that neither loop is wrong in the same way)
    full = out["unrolled"][3]
    np.testing.assert_allclose(np.asarray(out["unrolled"][2][1][0]), np.asarray(full[6]),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["unrolled"][2][2][0]), np.asarray(full[7]),
                               atol=1e-5)


def test_cast_params_consumes_the_loader_weights_and_refuses_unknown_arrays():
    """`cast_params` drops each numpy array once cast (so a model is not held twice while it
    loads) and names an array it has no place for instead of ignoring it."""
    from targets.lm.config import TransformerConfig
    from targets.lm.transformer import cast_params
    cfg = TransformerConfig(architecture="llama", vocab_size=5, dim=4, n_layers=1, n_heads=2,
                            n_kv_heads=1, head_dim=2, ffn_dim=3, norm_eps=1e-5, context_length=8)

    def weights(**extra):
        zeros = lambda *s: np.zeros((1, *s), np.float32)
        layers = {"attn_norm": zeros(4), "ffn_norm": zeros(4), "wq": zeros(4, 4),
                  "wk": zeros(4, 2), "wv": zeros(4, 2), "wo": zeros(4, 4), "w_gate": zeros(4, 3),
                  "w_up": zeros(4, 3), "w_down": zeros(3, 4), **extra}
        return {"embed": np.zeros((5, 4), np.float32), "final_norm": np.ones(4, np.float32),
                "layers": layers}

    loaded = weights()
    params = cast_params(loaded, cfg)
    assert loaded == {}
    assert params["layers"][0]["wqkv"].shape == (1, 4, 2, 4)  # [KV, G + 2, hd, D]
    assert params["layers"][0]["w_gate_up"].shape == (3, 2, 4)  # [F, 2, D]
    with pytest.raises(ValueError, match="'w_extra'"):
        cast_params(weights(w_extra=np.zeros((1, 2), np.float32)), cfg)
