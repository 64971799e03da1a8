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
copy every layer's cache on every step). Attention products are batched over (row, KV head) with
a KV head's queries as one axis, ``[B, KV, m, hd]``, the layout every XLA backend has a kernel
for. Attention runs over the whole cache, so size it to the need (``max_len`` = prompt + new
tokens).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from proposals.tokens import log_softmax
from targets.lm.config import Rope, TransformerConfig

Params = dict[str, Any]
F32 = jnp.float32


def rms_norm(x, w, eps):
    """RMSNorm with float32 statistics; ``w`` is the effective multiplier (see config.py)."""
    x32 = x.astype(F32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(F32)).astype(x.dtype)


def rope_tables(positions, head_dim: int, rope: Rope):
    """cos/sin tables ``[..., head_dim]`` for integer positions ``[...]``: numpy tables for numpy
    positions (known when tracing), computed once on the host; traced ones in the program.

    In the program XLA:CPU fuses the cos and sin into each use of the tables and evaluates them
    again for every head of every layer (SmolLM2 bf16 prefill of 64 x 40 tokens: 105 of 770 ms;
    from host tables, 27)."""
    xp = np if isinstance(positions, np.ndarray) else jnp
    inv_freq = np.asarray(rope.inverse_frequencies(head_dim), np.float32)
    angle = positions.astype(np.float32)[..., None] * inv_freq
    angle = xp.concatenate([angle, angle], axis=-1)
    return xp.cos(angle), xp.sin(angle)


def apply_rope(x, cos, sin):
    """x ``[..., heads, hd]`` ("rotate half" layout); cos/sin ``[..., hd]`` broadcast over heads."""
    half = x.shape[-1] // 2
    x32 = x.astype(F32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


def project(x, w, *, contract: int = 1, dtype=None):
    """Contract the last ``contract`` axes of ``x`` with the last ones of ``w``, accumulated in
    float32 and returned in ``dtype`` (default ``x``'s): ``x [..., *in]`` by ``w [*out, *in]``
    gives ``[..., *out]``.

    Weights are stored outputs first, as torch's ``Linear`` stores them: XLA:CPU multiplies a
    few rows by a weight read from memory up to twice as fast with the contracted axis last
    (SmolLM2's gate/up product on 40 rows: 0.75 vs 1.51 ms; on 16: 0.55 vs 0.71).

    Accumulating in float32 is what bf16 models are trained and served with; it also keeps
    XLA:CPU off its scalar path: a bf16 x bf16 -> bf16 product ran ~9x slower than the same
    product with a float32 result (16 rows by 262144 x 640: 230 vs 25 ms). A single bf16 row is
    multiplied as two: XLA:CPU's bf16 matrix-vector product is slow whatever the result type
    (210 vs 35 ms); its matrix-matrix product is not.
    """
    lead, inner = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
    size = math.prod(inner)
    # a plain [rows, in] x [out, in] product: XLA:CPU has no bf16 x bf16 -> f32 kernel for
    # several contracted axes, and it copied a weight with several output axes into [in, out]
    # on every call. The split axis of a "model" mesh (targets.lm.sharding) leads its merged
    # group, so that each device's block stays one block
    flat = x.reshape(-1, size)
    out_shape = w.shape[:w.ndim - contract]
    w2 = w.reshape(-1, size)
    single = flat.shape[0] == 1 and x.dtype != F32
    if single:
        flat = jnp.concatenate([flat, flat])
    out = jax.lax.dot_general(flat, w2, (((1,), (w2.ndim - 1,)), ((), ())),
                              preferred_element_type=F32)
    if single:
        out = out[:1]
    return out.reshape(*lead, *out_shape).astype(dtype or x.dtype)


def write_rows(cache, slot, values):
    """``cache [N, KV, T, hd]`` with row r's ``values [N, KV, hd]`` at ``cache[r, :, slot[r]]``
    (slots past T dropped).

    On CPU a 16-bit cache is written by a select over the whole cache rather than a scatter:
    XLA:CPU has no 16-bit float scatter and turned a bf16 one into a float32 copy of the cache,
    the scatter and a copy back, most of a bf16 decode step (SmolLM2, 64 rows: 70 of 110 ms; the
    select costs 7). Bitcasting to uint16 for the scatter cost 27 ms: XLA:CPU copies for each
    bitcast. Elsewhere the scatter writes in place, which a select cannot."""
    values = values.astype(cache.dtype)
    if cache.dtype.itemsize == 2 and jax.default_backend() == "cpu":
        hit = jnp.arange(cache.shape[2])[None, None, :, None] == slot[:, None, None, None]
        return jnp.where(hit, values[:, :, None, :], cache)
    return cache.at[jnp.arange(cache.shape[0]), :, slot].set(values, mode="drop")


def softmax_blocks(*scores):
    """The softmax over the concatenation of score blocks ``[..., T_i]`` (masked entries
    ``-inf``), returned block by block: one shared maximum and normaliser, i.e. the exact
    log-sum-exp merge of the blocks' partial softmaxes, without concatenating the keys."""
    top = functools.reduce(jnp.maximum, [jnp.max(s, axis=-1, keepdims=True) for s in scores])
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = [jnp.exp(s - top) for s in scores]
    total = sum(jnp.sum(w, axis=-1, keepdims=True) for w in weights)
    return [w / total for w in weights]


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
    prefill_chunk: int = 512     # prompt positions per prefill step (memory ~ chunk x prompt)

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
        # [..., F, 2], kept in float32 for the gate: XLA:CPU's bf16 silu/gelu ran ~2x slower than
        # the float32 one plus the rounding (SmolLM2 bf16 prefill of 64 x 40 tokens: 166 ms)
        gate_up = project(x, lp["w_gate_up"], dtype=F32)
        gate, up = gate_up[..., 0], gate_up[..., 1]
        act = jax.nn.silu(gate) if c.activation == "silu" else jax.nn.gelu(gate, approximate=True)
        y = project((act * up).astype(self.dtype), lp["w_down"])
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
        logits = project(x, params.get("lm_head", params["embed"]), dtype=F32)
        return soft_cap(logits, self.config.final_logit_softcap)

    # ------------------------------------------------------------------ interface
    def init_cache(self, batch: int, length: int):
        """Keys and values of ``length`` generated tokens per row, ``[batch, KV, length, hd]``
        per layer; the prompt's are in the prompt cache, stored once per prompt (`prefill`)."""
        c = self.config
        shape = (batch, c.n_kv_heads, length, c.head_dim)
        # one buffer per leaf: a shared one could not be donated twice
        return {name: tuple(jnp.zeros(shape, self.dtype) for _ in range(c.n_layers))
                for name in ("k", "v")}

    def _causal_layers(self, params, tokens):
        """All layers on ``tokens [B, P]`` at positions 0..P-1, ``prefill_chunk`` positions at
        a time: each chunk writes its keys and values into the prompt's buffers and attends to
        them, so memory grows with chunk x P, not P x P. Returns h ``[B, P, D]`` and per-layer
        tuples of keys and values ``[B, KV, P, hd]``."""
        c = self.config
        B, P = tokens.shape
        C = min(self.prefill_chunk, P)
        n = -(-P // C)
        width = n * C
        chunks = jnp.pad(tokens, ((0, 0), (0, width - P))).reshape(B, n, C).swapaxes(0, 1)
        key = jnp.arange(width)[None, :]
        empty = tuple((jnp.zeros((B, c.n_kv_heads, width, c.head_dim), self.dtype),) * 2
                      for _ in range(c.n_layers))

        tables = self._rope_pair(np.arange(width))

        def chunk_step(kv, xs):
            index, chunk = xs
            first = index * C
            query = first + jnp.arange(C)[:, None]
            causal = key <= query
            window = causal & (key > query - (c.sliding_window or width))
            # rows and positions flattened into one axis: XLA:CPU multiplies a [B*C, D] matrix
            # about twice as fast as a [B, C, D] array by the same weights
            h = self._embed(params, chunk.reshape(B * C))
            ropes = jax.tree.map(
                lambda t: jnp.tile(jax.lax.dynamic_slice_in_dim(t, first, C), (B, 1)), tables)

            def layer(h, lp, sliding, buffers):
                cos, sin = pick(sliding, ropes[1], ropes[0])
                q, k, v = self._qkv(lp, h, cos, sin)
                bk, bv = (jax.lax.dynamic_update_slice_in_dim(
                    b, x.reshape(B, C, c.n_kv_heads, c.head_dim).swapaxes(1, 2).astype(b.dtype),
                    first, axis=2) for b, x in zip(buffers, (k, v)))
                # each KV head's C x G queries as one axis m, [B, KV, m, hd]: the products are
                # in the layout every XLA backend has a kernel for (XLA:CPU has none for a bf16
                # "bqkgd,bktd" product), and the swap moves whole [G, hd] blocks, where letting
                # XLA pick the layout transposed hd against the positions (SmolLM2, 64 x 40
                # tokens: 160 of the prefill's ms in float32 and in bf16)
                q = q.reshape(B, C, c.n_kv_heads, -1).swapaxes(1, 2).reshape(
                    B, c.n_kv_heads, C * c.group_size, c.head_dim)
                s = self._scores(jnp.einsum("bkmd,bktd->bkmt", q, bk,
                                            preferred_element_type=F32))
                s = s.reshape(B, c.n_kv_heads, C, c.group_size, width)
                s = jnp.where(pick(sliding, window, causal)[:, None, :], s, -jnp.inf)
                a = jax.nn.softmax(s, axis=-1).astype(self.dtype).reshape(q.shape[:3] + (width,))
                o = jnp.einsum("bkmt,bktd->bkmd", a, bv, preferred_element_type=F32)
                o = o.astype(self.dtype).reshape(B, c.n_kv_heads, C, -1).swapaxes(1, 2)
                o = o.reshape(B * C, c.n_kv_heads, c.group_size, c.head_dim)
                return self._out_ffn(lp, h, o), (bk, bv)

            h, kv = self._over_layers(params["layers"], layer, h, kv)
            return kv, h.reshape(B, C, -1)

        kv, h = jax.lax.scan(chunk_step, empty, (jnp.arange(n), chunks))
        h = h.swapaxes(0, 1).reshape(B, width, -1)[:, :P]
        return h, tuple(k[:, :, :P] for k, _ in kv), tuple(v[:, :, :P] for _, v in kv)

    def forward(self, params, tokens, positions=None):
        """Logits ``[B, P, V]`` after every prefix of ``tokens [B, P]``; with ``positions
        [B, K]`` only there (``[B, K, V]``): the vocabulary projection, the largest product for
        a long prompt, runs on the K rows only."""
        h, _, _ = self._causal_layers(params, tokens)
        if positions is not None:
            h = jnp.take_along_axis(h, positions[..., None], axis=1)
        return self._logits(params, h)

    def prefill(self, params, tokens, lengths):
        """The prompt cache (keys and values ``[B, KV, P, hd]`` per layer and the ``lengths``)
        and the next-token log-probabilities after each prompt."""
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"prompt length {tokens.shape[1]} exceeds max_len {self.max_len}")
        h, ks, vs = self._causal_layers(params, tokens)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
        prompt_cache = {"k": ks, "v": vs, "length": jnp.asarray(lengths, jnp.int32)}
        return prompt_cache, log_softmax(self._logits(params, last))

    def decode(self, params, prompt_cache, cache, tokens, positions):
        """One token per row; row r continues prompt ``r // (N / B)``. Attention runs over the
        prompt's shared keys and each row's own generated ones, one softmax over both
        (`softmax_blocks`), so no row holds a copy of its prompt."""
        c = self.config
        N, B = tokens.shape[0], prompt_cache["length"].shape[0]
        if N % B:
            raise ValueError(f"{N} rows do not split evenly over {B} prompts")
        copies = N // B
        P, T = prompt_cache["k"][0].shape[2], cache["k"][0].shape[2]
        length = jnp.repeat(prompt_cache["length"], copies, total_repeat_length=N)
        slot = jnp.where(positions < self.max_len, positions - length, T)  # T: written nowhere
        h = self._embed(params, tokens)
        ropes = self._rope_pair(positions)
        reach = positions[:, None] - (c.sliding_window or self.max_len)  # keys past it: out
        prompt_key = jnp.arange(P)[None, :]
        own_key = jnp.arange(T)[None, :]
        prompt_causal = prompt_key < length[:, None]
        own_causal = own_key <= slot[:, None]
        masks = ((prompt_causal & (prompt_key > reach),                  # sliding layers
                  own_causal & (own_key + length[:, None] > reach)),
                 (prompt_causal, own_causal))                                 # global layers

        def layer(h, lp, sliding, kv):
            (pk, pv), (ck, cv) = kv  # [B, KV, P, hd] shared; [N, KV, T, hd] per row
            cos, sin = pick(sliding, ropes[1], ropes[0])
            q, k, v = self._qkv(lp, h, cos, sin)
            ck, cv = write_rows(ck, slot, k), write_rows(cv, slot, v)
            # products with the caches as stored, accumulated in float32: a float32 copy of a
            # bf16 cache was most of a bf16 decode step on XLA:CPU
            q = q.reshape(B, copies, c.n_kv_heads, c.group_size, c.head_dim).astype(ck.dtype)
            own = lambda x: x.reshape(B, copies, *x.shape[1:])   # [B, copies, KV, T, hd]
            # a prompt's rows and query heads as one axis m: [B, KV, m, .] products in the
            # layout every XLA backend has a kernel for (a bf16 one included)
            rows_first = lambda x: x.reshape(B, c.n_kv_heads, copies, c.group_size,
                                             x.shape[-1]).swapaxes(1, 2)
            heads_first = lambda x: x.swapaxes(1, 2).reshape(B, c.n_kv_heads, -1, x.shape[-1])
            s_prompt = rows_first(jnp.einsum("bkmd,bktd->bkmt", heads_first(q), pk,
                                             preferred_element_type=F32))
            s_own = jnp.einsum("bckgd,bcktd->bckgt", q, own(ck), preferred_element_type=F32)
            visible = pick(sliding, masks[0], masks[1])
            a_prompt, a_own = softmax_blocks(
                *(jnp.where(m.reshape(B, copies, 1, 1, -1), self._scores(x), -jnp.inf)
                  for m, x in zip(visible, (s_prompt, s_own))))
            o = (rows_first(jnp.einsum("bkmt,bktd->bkmd", heads_first(a_prompt).astype(pv.dtype),
                                       pv, preferred_element_type=F32))
                 + jnp.einsum("bckgt,bcktd->bckgd", a_own.astype(cv.dtype), own(cv),
                              preferred_element_type=F32))
            o = o.reshape(N, c.n_kv_heads, c.group_size, c.head_dim)
            return self._out_ffn(lp, h, o.astype(self.dtype)), (ck, cv)

        shared = zip(prompt_cache["k"], prompt_cache["v"])
        per_row = zip(cache["k"], cache["v"])
        h, kv = self._over_layers(params["layers"], layer, h, tuple(zip(shared, per_row)))
        cache = {"k": tuple(k for k, _ in kv), "v": tuple(v for _, v in kv)}
        return cache, log_softmax(self._logits(params, h))

    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per particle and position: layers x 2 x kv_heads x head_dim x itemsize."""
        c = self.config
        return 2 * c.n_layers * c.n_kv_heads * c.head_dim * jnp.dtype(self.dtype).itemsize


NORMS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


def cast_params(weights: Params, config: TransformerConfig, dtype=jnp.float32) -> Params:
    """Loader weights (numpy, the layout of `targets.lm.config`) -> the model's jax params.

    ``embed [V, D]``, ``final_norm [D]``, ``lm_head [V, D]`` (untied only) and ``layers``: a tuple
    of per-layer dicts ``attn_norm``, ``wqkv [KV, G + 2, hd, D]`` (and ``bqkv [KV, G + 2, hd]``),
    ``wo [D, KV, G, hd]`` (and ``bo``), ``ffn_norm``, ``w_gate_up [F, 2, D]``, ``w_down [D, F]``,
    and the optional ``q_norm``, ``k_norm``, ``post_attn_norm``, ``post_ffn_norm``; matrices
    outputs first (`project`), in ``dtype``; norms in float32.

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
                qkv = np.concatenate([q, k, v], -2)   # wqkv [D, KV, G + 2, hd], bqkv [KV, ...]
                out[name] = jnp.asarray(np.moveaxis(qkv, 0, -1) if name == "wqkv" else qkv,
                                        dtype)
            del arrays
    if "w_gate" in stacked:
        gate, up = stacked.pop("w_gate"), stacked.pop("w_up")
        for i, out in enumerate(layers):
            out["w_gate_up"] = jnp.asarray(np.stack([gate[i].T, up[i].T], 1), dtype)  # [F, 2, D]
        del gate, up
    if "wo" in stacked:
        wo = stacked.pop("wo")
        for i, out in enumerate(layers):
            out["wo"] = jnp.asarray(wo[i].T.reshape(c.dim, kv, g, hd), dtype)
        del wo
    for name in ("bo", "w_down") + NORMS:
        if name in stacked:
            array = stacked.pop(name)
            for i, out in enumerate(layers):
                out[name] = jnp.asarray(array[i].T if name == "w_down" else array[i],
                                        F32 if name in NORMS else dtype)
            del array
    if stacked:
        raise ValueError(f"weights['layers'] holds arrays the model has no place for: "
                         f"{sorted(stacked)}")
    params = {"layers": tuple(layers)}
    for name in ("embed", "final_norm", "lm_head"):
        if name in weights:
            array = weights.pop(name)
            params[name] = jnp.asarray(array.T if name == "lm_head" else array,
                                       F32 if name == "final_norm" else dtype)
    return params
