"""The decoder-only transformer of every architecture we load, as pure JAX functions.

One network with the options of `targets.lm.config.TransformerConfig`: grouped-query attention
with rotary position embeddings (plain, linear or Llama-3 scaled), optional q/k/v and output
biases (Qwen2, Llama with ``attention_bias``), per-head q/k RMSNorm (Qwen3, Gemma 3), sandwich
norms around attention and the feed-forward (Gemma 3), SwiGLU or tanh-GeGLU, scaled embeddings,
sliding-window layers with their own RoPE base interleaved with global ones (Mistral, Gemma 3),
attention and final-logit soft-capping. Llama, Mistral, Qwen2, Qwen3 and Gemma 3 differ only in
these options, so there is no model per architecture.

Parameters in float32 or bfloat16; activations follow them, while RMSNorm statistics, attention
scores and softmax, and the returned log-probabilities are float32. The KV cache has the
parameters' dtype.

It implements `targets.lm.protocol.LanguageModel` (see there for shapes); the cache is a dict
``{"k", "v"}`` of per-layer tuples of ``[batch, n_kv_heads, max_len, head_dim]`` arrays, the
particle axis first on every leaf. ``forward(params, tokens [B, P]) -> logits [B, P, V]`` is the
full causal recomputation without a cache (optionally at chosen positions only).

Speed (decode is memory-bound at small batch): the layers are a tuple of per-layer weight dicts
and the layer loop is unrolled in Python, because slicing one layer out of stacked ``[L, ...]``
weights in a ``lax.scan`` makes XLA copy the weights on every step (about 2x slower decode at
batch 1). The unrolled program compiles about 5x slower, so ``scan_layers=True`` runs the same
layer code in a ``lax.scan`` over weights (and caches) stacked inside the call: quick to compile,
slower to run (use it for short runs and tests). The query/key/value and the gate/up projections
are each one matrix product. The KV cache is one array per layer, ``[B, KV, T, hd]``, so that a
layer's keys for one row and head are contiguous (a stacked ``[B, L, T, KV, hd]`` cache made XLA
copy every layer's cache on every step). Decode attention is an elementwise product and a sum,
which XLA fuses into one pass over the cache. Attention runs over the whole cache, so size it to
the need (``max_len`` = prompt + new tokens).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from targets.lm.config import Rope, TransformerConfig

Params = dict[str, Any]
F32 = jnp.float32


def rms_norm(x, w, eps):
    """RMSNorm with float32 statistics; ``w`` is the effective multiplier (see config.py)."""
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(F32)).astype(x.dtype)


def rope_tables(positions, head_dim: int, rope: Rope):
    """cos/sin tables ``[..., head_dim]`` for integer positions ``[...]``."""
    inv_freq = jnp.asarray(np.asarray(rope.inverse_frequencies(head_dim), np.float32))
    angle = positions.astype(F32)[..., None] * inv_freq
    angle = jnp.concatenate([angle, angle], axis=-1)
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x, cos, sin):
    """x ``[..., heads, hd]`` ("rotate half" layout); cos/sin ``[..., hd]`` broadcast over heads."""
    half = x.shape[-1] // 2
    x32 = x.astype(F32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


def project(x, w, *, contract: int = 1, w_out_first: bool = False, dtype=None):
    """Contract the last ``contract`` axes of ``x`` with the first ones of ``w`` (with
    ``w_out_first``: ``x [..., D]`` with ``w [O, D]``'s last, e.g. a tied embedding as stored);
    accumulated in float32, returned in ``dtype`` (default ``x``'s). The result has ``x``'s
    leading axes and ``w``'s remaining ones.

    Accumulating in float32 is what bf16 models are trained and served with; it also keeps
    XLA:CPU off its scalar path: a bf16 x bf16 -> bf16 product ran ~9x slower than the same
    product with a float32 result (16 rows by 262144 x 640: 230 vs 25 ms). A single bf16 row is
    multiplied as two: XLA:CPU's bf16 matrix-vector product is slow whatever the result type
    (210 vs 35 ms); its matrix-matrix product is not.
    """
    lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    flat = x.reshape(-1, *inner)
    single = flat.shape[0] == 1 and x.dtype != F32
    if single:
        flat = jnp.concatenate([flat, flat])
    x_axes = tuple(range(1, 1 + contract))
    w_axes = (w.ndim - 1,) if w_out_first else tuple(range(contract))
    out = jax.lax.dot_general(flat, w, ((x_axes, w_axes), ((), ())), preferred_element_type=F32)
    if single:
        out = out[:1]
    return out.reshape(*lead, *out.shape[1:]).astype(dtype or x.dtype)


def soft_cap(x, cap: float | None):
    return x if cap is None else cap * jnp.tanh(x / cap)


def pick(flag, if_true, if_false):
    """``if_true`` where ``flag``: resolved in Python for a static flag (unrolled layers), by
    `jnp.where` for a traced one (layers under `lax.scan`)."""
    if isinstance(flag, (bool, np.bool_)):
        return if_true if flag else if_false
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), if_true, if_false)


@dataclasses.dataclass(frozen=True, eq=False)
class Transformer:
    config: TransformerConfig
    max_len: int = 2048
    dtype: Any = jnp.float32
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    scan_layers: bool = False

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # ------------------------------------------------------------------ pieces
    def _embed(self, params, tokens):
        h = params["embed"][tokens].astype(self.dtype)
        if self.config.embed_scale is not None:
            # Gemma multiplies by sqrt(D) rounded to the parameters' dtype
            h = h * jnp.asarray(self.config.embed_scale, self.dtype)
        return h

    def _qkv(self, lp, h, cos, sin):
        """Projections of ``h [..., D]``: q ``[..., H, hd]``, k and v ``[..., KV, hd]`` (RoPE'd)."""
        c = self.config
        x = rms_norm(h, lp["attn_norm"], c.norm_eps)
        qkv = project(x, lp["wqkv"])  # [..., KV, G + 2, hd]: each KV head's queries, key, value
        if "bqkv" in lp:
            qkv = qkv + lp["bqkv"]
        q = qkv[..., :c.group_size, :].reshape(*x.shape[:-1], c.n_heads, c.head_dim)
        k, v = qkv[..., c.group_size, :], qkv[..., c.group_size + 1, :]
        if c.qk_norm:
            q = rms_norm(q, lp["q_norm"], c.norm_eps)
            k = rms_norm(k, lp["k_norm"], c.norm_eps)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _scores(self, s):
        """Raw float32 q.k products -> scaled (and soft-capped) attention logits."""
        return soft_cap(s * self.config.query_scale, self.config.attn_logit_softcap)

    def _out_ffn(self, lp, h, o):
        """Residual attention output ``o [..., KV, G, hd]``, then the residual feed-forward."""
        c = self.config
        o = project(o, lp["wo"], contract=3)
        if "bo" in lp:
            o = o + lp["bo"]
        if c.sandwich_norm:
            o = rms_norm(o, lp["post_attn_norm"], c.norm_eps)
        h = h + o
        x = rms_norm(h, lp["ffn_norm"], c.norm_eps)
        gate_up = project(x, lp["w_gate_up"])  # [..., 2, F]
        gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        act = jax.nn.silu(gate) if c.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        y = project(act * up, lp["w_down"])
        if c.sandwich_norm:
            y = rms_norm(y, lp["post_ffn_norm"], c.norm_eps)
        return h + y

    def _layer_flags(self):
        """Per layer: True for a sliding-window layer. Python bools for the unrolled loop; under
        ``scan_layers`` an array, so that one scanned body serves both kinds of layer."""
        c = self.config
        flags = tuple(c.is_sliding(i) for i in range(c.n_layers))
        return jnp.asarray(flags) if self.scan_layers else flags

    def _over_layers(self, layers, body, carry, xs):
        """``carry, y_l = body(carry, layer_params_l, x_l)`` for each layer ``l`` (``xs``: a tuple
        with one pytree per layer); returns ``(carry, ys)`` with ``ys`` a tuple of the ``y_l``."""
        if self.scan_layers:
            stack = lambda seq: jax.tree.map(lambda *w: jnp.stack(w), *seq)
            flags = self._layer_flags()
            xs = tuple((flags[i], x) for i, x in enumerate(xs))
            carry, ys = jax.lax.scan(lambda c, lx: body(c, lx[0], *lx[1]), carry,
                                     (stack(layers), stack(xs)))
            return carry, tuple(jax.tree.map(lambda y, i=i: y[i], ys) for i in range(len(layers)))
        ys = []
        for lp, flag, x in zip(layers, self._layer_flags(), xs, strict=True):
            carry, y = body(carry, lp, flag, x)
            ys.append(y)
        return carry, tuple(ys)

    def _rope_pair(self, positions):
        """(global, local) cos/sin tables; local is the global one when the model has no
        separate local RoPE."""
        c = self.config
        full = rope_tables(positions, c.head_dim, c.rope)
        local = full if c.rope_local is None else rope_tables(positions, c.head_dim, c.rope_local)
        return full, local

    def _logits(self, params, h):
        x = rms_norm(h, params["final_norm"], self.config.norm_eps)
        if "lm_head" in params:
            logits = project(x, params["lm_head"], dtype=F32)
        else:  # contract with the [V, D] embedding as stored: no transposed copy of it
            logits = project(x, params["embed"], w_out_first=True, dtype=F32)
        return soft_cap(logits, self.config.final_logit_softcap)

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
        # rows and positions flattened into one axis: XLA:CPU multiplies a [B*P, D] matrix
        # about twice as fast as a [B, P, D] array by the same weights
        h = self._embed(params, tokens.reshape(B * P))
        positions = jnp.tile(jnp.arange(P), B)
        ropes = self._rope_pair(positions)
        query, key = jnp.arange(P)[:, None], jnp.arange(P)[None, :]
        causal = key <= query
        window = causal & (key > query - (c.sliding_window or P))

        def layer(h, lp, sliding, _):
            cos, sin = pick(sliding, ropes[1], ropes[0])
            q, k, v = self._qkv(lp, h, cos, sin)
            q = q.reshape(B, P, c.n_kv_heads, c.group_size, c.head_dim)
            k = k.reshape(B, P, c.n_kv_heads, c.head_dim)
            v = v.reshape(B, P, c.n_kv_heads, c.head_dim)
            s = self._scores(jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=F32))
            s = jnp.where(pick(sliding, window, causal), s, -jnp.inf)
            a = jax.nn.softmax(s, axis=-1).astype(self.dtype)
            o = jnp.einsum("bkgqt,btkd->bqkgd", a, v, preferred_element_type=F32)
            o = o.reshape(B * P, c.n_kv_heads, c.group_size, c.head_dim).astype(self.dtype)
            return self._out_ffn(lp, h, o), (k, v)

        h, kv = self._over_layers(params["layers"], layer, h, (None,) * c.n_layers)
        return h.reshape(B, P, -1), tuple(k for k, _ in kv), tuple(v for _, v in kv)

    def forward(self, params, tokens, positions=None):
        """Logits ``[B, P, V]`` after every prefix of ``tokens [B, P]``; with ``positions
        [B, K]`` only there (``[B, K, V]``): the vocabulary projection, the largest product for
        a long prompt, runs on the K rows only."""
        h, _, _ = self._causal_layers(params, tokens)
        if positions is not None:
            h = jnp.take_along_axis(h, positions[..., None], axis=1)
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
        h = self._embed(params, tokens)
        ropes = self._rope_pair(positions)
        rows = jnp.arange(B)
        key = jnp.arange(T)[None, :]
        causal = key <= positions[:, None]
        window = causal & (key > positions[:, None] - (c.sliding_window or T))

        def layer(h, lp, sliding, kv):
            ck, cv = kv  # [B, KV, T, hd]
            cos, sin = pick(sliding, ropes[1], ropes[0])
            q, k, v = self._qkv(lp, h, cos, sin)
            ck = ck.at[rows, :, positions].set(k.astype(ck.dtype), mode="drop")
            cv = cv.at[rows, :, positions].set(v.astype(cv.dtype), mode="drop")
            # products with the cache as stored, accumulated in float32: a float32 copy of a
            # bf16 cache was most of a bf16 decode step on XLA:CPU
            q = q.reshape(B, c.n_kv_heads, c.group_size, c.head_dim).astype(ck.dtype)
            s = self._scores(jnp.einsum("bkgd,bktd->bkgt", q, ck, preferred_element_type=F32))
            visible = pick(sliding, window, causal)[:, None, None, :]
            a = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1).astype(cv.dtype)
            o = jnp.einsum("bkgt,bktd->bkgd", a, cv, preferred_element_type=F32)
            return self._out_ffn(lp, h, o.astype(self.dtype)), (ck, cv)

        h, kv = self._over_layers(params["layers"], layer, h, tuple(zip(cache["k"], cache["v"])))
        cache = {"k": tuple(k for k, _ in kv), "v": tuple(v for _, v in kv)}
        return cache, jax.nn.log_softmax(self._logits(params, h), axis=-1)

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per particle and position: layers x 2 x kv_heads x head_dim x itemsize."""
        c = self.config
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * jnp.dtype(self.dtype).itemsize


NORMS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


def cast_params(weights: Params, config: TransformerConfig, dtype=jnp.float32) -> Params:
    """Loader weights (numpy, the layout of `targets.lm.config`) -> the model's jax params.

    ``embed [V, D]``, ``final_norm [D]``, ``lm_head [D, V]`` (untied only) and ``layers``: a tuple
    of per-layer dicts ``attn_norm``, ``wqkv [D, KV, G + 2, hd]`` (and ``bqkv [KV, G + 2, hd]``),
    ``wo [KV, G, hd, D]`` (and ``bo``), ``ffn_norm``, ``w_gate_up [D, 2, F]``, ``w_down [F, D]``,
    and the optional ``q_norm``,
    ``k_norm``, ``post_attn_norm``, ``post_ffn_norm``; weights in ``dtype``, norms in float32.

    `weights` is consumed: each of its arrays is dropped from it once cast, so that a model is
    not held twice over (numpy and JAX) while it loads; it is left empty.
    """
    stacked = weights.pop("layers")
    c = config
    kv, g, hd = c.n_kv_heads, c.group_size, c.head_dim
    # heads grouped by KV head ([KV, G + 2, hd]: its G queries, its key, its value), so that a
    # split of the KV axis over devices keeps every head whole (targets.lm.sharding)
    grouped = {"wqkv": (("wq", "wk", "wv"), (kv, g), (kv, 1)),
               "bqkv": (("bq", "bk", "bv"), (kv, g), (kv, 1))}
    layers = [{} for _ in range(c.n_layers)]
    for name, (parts, q_shape, kv_shape) in grouped.items():
        if parts[0] in stacked:
            arrays = [stacked.pop(part) for part in parts]
            for i, out in enumerate(layers):
                q, k, v = (a[i].reshape(*a[i].shape[:-1], *shape, hd)
                           for a, shape in zip(arrays, (q_shape, kv_shape, kv_shape)))
                out[name] = jnp.asarray(np.concatenate([q, k, v], -2), dtype)
            del arrays
    if "w_gate" in stacked:
        gate, up = stacked.pop("w_gate"), stacked.pop("w_up")
        for i, out in enumerate(layers):
            out["w_gate_up"] = jnp.asarray(np.stack([gate[i], up[i]], -2), dtype)  # [D, 2, F]
        del gate, up
    if "wo" in stacked:
        wo = stacked.pop("wo")
        for i, out in enumerate(layers):
            out["wo"] = jnp.asarray(wo[i].reshape(kv, g, hd, c.dim), dtype)
        del wo
    for name in ("bo", "w_down") + NORMS:
        if name in stacked:
            array = stacked.pop(name)
            for i, out in enumerate(layers):
                out[name] = jnp.asarray(array[i], F32 if name in NORMS else dtype)
            del array
    if stacked:
        raise ValueError(f"weights['layers'] holds arrays the model has no place for: "
                         f"{sorted(stacked)}")
    params = {"layers": tuple(layers)}
    for name in ("embed", "final_norm", "lm_head"):
        if name in weights:
            params[name] = jnp.asarray(weights.pop(name), F32 if name == "final_norm" else dtype)
    return params
