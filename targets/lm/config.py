"""The static description of a decoder-only transformer: one dataclass for every architecture.

The architectures we load (llama, mistral, qwen2, qwen3, gemma3) are one network with options;
`TransformerConfig` holds those options and nothing else, so that the loaders (Hugging Face
folders, GGUF files) translate their file's vocabulary into it once and the model
(`targets.lm.transformer`) reads only it. Pure Python: importing it needs neither JAX nor a file
format library.

Weight conventions shared by the loaders (numpy arrays in the file's float dtype, float32,
float16 or bfloat16, never upcast: the model's `cast_params` converts; ``y = x @ w``):

    embed [V, D]   final_norm [D]   lm_head [D, V] (absent when tied to embed)
    layers: a dict of arrays stacked on a leading layer axis L:
        attn_norm [L, D]  wq [L, D, H*hd]  wk [L, D, KV*hd]  wv [L, D, KV*hd]  wo [L, H*hd, D]
        ffn_norm [L, D]   w_gate [L, D, F]  w_up [L, D, F]   w_down [L, F, D]
      optional, present exactly when the config asks for them:
        bq [L, H*hd]  bk [L, KV*hd]  bv [L, KV*hd]                (qkv_bias)
        bo [L, D]                                                 (out_bias)
        q_norm [L, hd]  k_norm [L, hd]                             (qk_norm)
        post_attn_norm [L, D]  post_ffn_norm [L, D]                (sandwich_norm)

Norm weights are the *effective* multipliers: Gemma's ``x_hat * (1 + w)`` is stored as ``1 + w``
(the loader adds the one), so the model has one RMSNorm. Query/key rows are in the Hugging Face
("rotate half") RoPE layout.
"""
from __future__ import annotations

import dataclasses
import math

ACTIVATIONS = ("silu", "gelu_tanh")
ROPE_SCALINGS = ("default", "linear", "llama3")
# Gemma 3's defaults where a file leaves them out (both loaders use them): all layers but every
# sixth are local (sliding-window), with RoPE base 1e4
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 1e4


def every_nth_global(n_layers: int, pattern: int = GEMMA3_SLIDING_PATTERN) -> tuple[bool, ...]:
    """Sliding-layer flags with every `pattern`-th layer global (layer i is global iff
    (i + 1) % pattern == 0), Gemma's ``sliding_window_pattern``."""
    return tuple((i + 1) % pattern != 0 for i in range(n_layers))


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary position embedding of one kind of layer.

    ``scaling``: "default" (plain), "linear" (positions divided by ``factor``) or "llama3"
    (Llama 3.1's frequency-dependent rescaling with ``factor``, ``low_freq_factor``,
    ``high_freq_factor`` and ``original_context``).
    """

    base: float = 10000.0
    scaling: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192

    def __post_init__(self):
        if self.scaling not in ROPE_SCALINGS:
            raise ValueError(f"unsupported RoPE scaling '{self.scaling}' (supported: "
                             f"{', '.join(ROPE_SCALINGS)})")
        if not (math.isfinite(self.base) and self.base > 0):
            raise ValueError(f"RoPE base must be a positive number, got {self.base}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ValueError(f"RoPE scaling factor must be positive, got {self.factor}")

    def inverse_frequencies(self, head_dim: int) -> list[float]:
        """The ``head_dim / 2`` angular frequencies (float64 Python floats)."""
        inv = [self.base ** (-2 * i / head_dim) for i in range(head_dim // 2)]
        if self.scaling == "linear":
            return [f / self.factor for f in inv]
        if self.scaling == "llama3":
            low_wavelen = self.original_context / self.low_freq_factor
            high_wavelen = self.original_context / self.high_freq_factor
            out = []
            for f in inv:
                wavelen = 2 * math.pi / f
                if wavelen > low_wavelen:          # low frequencies: fully rescaled
                    out.append(f / self.factor)
                elif wavelen < high_wavelen:       # high frequencies: unchanged
                    out.append(f)
                else:                              # in between: interpolated
                    smooth = ((self.original_context / wavelen - self.low_freq_factor)
                              / (self.high_freq_factor - self.low_freq_factor))
                    out.append((1 - smooth) * f / self.factor + smooth * f)
            return out
        return inv


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Every option of the decoder (see the module docstring for the weights it implies).

    ``sliding_window`` applies to the layers flagged in ``sliding_layers`` (a query at position
    p sees keys at p - window < t <= p), which use ``rope_local`` when given, else ``rope``.
    ``attn_scale`` multiplies q.k (1/sqrt(head_dim) unless the model says otherwise, e.g.
    Gemma's ``query_pre_attn_scalar ** -0.5``); ``embed_scale`` multiplies the embeddings
    (Gemma: sqrt(D), rounded to the parameters' dtype as Gemma does).
    """

    architecture: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float
    context_length: int
    rope: Rope = Rope()
    tie_embeddings: bool = True
    activation: str = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    embed_scale: float | None = None
    attn_scale: float | None = None
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()
    rope_local: Rope | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{self.architecture} config: {name} must be a positive "
                                 f"integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.architecture} config: n_heads {self.n_heads} is not a "
                             f"multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"{self.architecture} config: head_dim {self.head_dim} must be "
                             "even for RoPE")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.architecture} config: unsupported activation "
                             f"'{self.activation}' (supported: {', '.join(ACTIVATIONS)})")
        if self.sliding_layers and len(self.sliding_layers) != self.n_layers:
            raise ValueError(f"{self.architecture} config: sliding_layers has "
                             f"{len(self.sliding_layers)} entries for {self.n_layers} layers")
        if any(self.sliding_layers) and not self.sliding_window:
            raise ValueError(f"{self.architecture} config: sliding layers need a sliding_window")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"{self.architecture} config: sliding_window must be >= 1, got "
                             f"{self.sliding_window}")
        if not self.norm_eps > 0:
            raise ValueError(f"{self.architecture} config: norm_eps must be positive, got "
                             f"{self.norm_eps}")

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def query_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_layers) and self.sliding_layers[layer]

    def window(self, layer: int) -> int | None:
        """The sliding window of a layer, None for a global layer."""
        return self.sliding_window if self.is_sliding(layer) else None

    def rope_of(self, layer: int) -> Rope:
        if self.is_sliding(layer) and self.rope_local is not None:
            return self.rope_local
        return self.rope
