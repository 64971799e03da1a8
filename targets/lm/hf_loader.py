"""Read a Hugging Face model folder (``config.json`` and safetensors) into our config and weights.

`read_config` translates ``config.json`` into a `targets.lm.config.TransformerConfig`,
`read_weights` lays the safetensors out as that module documents, and `read_generation_eos` reads
the ids that end a sequence. Supported ``model_type``: llama, mistral, qwen2, qwen3 and
gemma3_text (``Gemma3ForCausalLM``). Every problem is a `CheckpointError` naming the file, raised
before anything is compiled.

What the config means is what transformers makes of it: missing keys take the defaults of
transformers' own config classes (e.g. ``tie_word_embeddings`` false except for Gemma 3,
``head_dim`` 128 for Qwen 3 and 256 for Gemma 3, Mistral's ``sliding_window`` 4096), keys that
transformers ignores for an architecture are ignored here too (Mistral's ``layer_types``, Qwen's ``sliding_window`` when ``use_sliding_window`` is false, a tied
``lm_head.weight``), and both RoPE formats are read: the old one (``rope_theta``,
``rope_scaling``, Gemma's ``rope_local_base_freq``) and transformers 5's ``rope_parameters``
(one dict, or for Gemma 3 one per layer type).

Other keys are ignored, except these, which change the network in ways we do not implement and so
raise: ``quantization_config``; ``mlp_bias`` true; ``attention_bias`` true for Mistral; a
``hidden_act`` / ``hidden_activation`` other than silu/swish or a tanh-approximated GELU
(gelu_pytorch_tanh, gelu_new, gelu_tanh, gelu_python_tanh, gelu_fast); a RoPE type other than
default, linear or llama3 (yarn, dynamic, longrope, mrope, ...); ``partial_rotary_factor`` != 1;
Qwen's ``use_sliding_window`` true or ``layer_types`` naming a layer other than full attention;
Gemma's ``use_bidirectional_attention`` true, ``attn_logit_softcapping`` set (transformers'
Gemma 3 ignores it; Gemma 3 has none) or a ``layer_types`` entry other than full/sliding
attention.

Weights keep their stored dtype (float32, float16 or bfloat16, the last as
``ml_dtypes.bfloat16``, which safetensors >= 0.4.1 returns once ml_dtypes is imported) so that a
bfloat16 checkpoint is not doubled in memory; the model's cast converts them. Gemma's norm
weights ``w`` become the effective multipliers ``1 + w``, computed and kept in float32 as
transformers' Gemma RMSNorm does.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from smc.validation import static_bool, static_finite, static_int, static_positive
from targets.lm.config import (
    GEMMA3_LOCAL_ROPE_BASE,
    GEMMA3_SLIDING_PATTERN,
    ROPE_SCALINGS,
    Rope,
    TransformerConfig,
    every_nth_global,
)

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_tanh": "gelu_tanh",
               "gelu_python_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
LAYER_TYPES = ("full_attention", "sliding_attention")
# safetensors dtype names we read, and what numpy calls them
DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# tensors a checkpoint may carry that the network does not use (old RoPE buffers)
HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)
# prefixes of the multimodal Gemma3ForConditionalGeneration checkpoints
MULTIMODAL_PREFIXES = ("language_model.", "model.language_model.", "vision_tower.",
                       "model.vision_tower.", "multi_modal_projector.",
                       "model.multi_modal_projector.")


class CheckpointError(ValueError):
    """A Hugging Face model folder that is missing, incomplete, corrupt or of an unsupported kind;
    the message names the file and the problem."""


@dataclasses.dataclass(frozen=True)
class Defaults:
    """What transformers' config class of an architecture assumes for a missing key
    (None: derived, ``n_heads`` for the KV heads and ``dim // n_heads`` for the head size)."""

    kv_heads: int | None
    head_dim: int | None
    context_length: int
    tie_embeddings: bool
    rope_theta: float = 10000.0


DEFAULTS = {
    "llama": Defaults(kv_heads=None, head_dim=None, context_length=2048, tie_embeddings=False),
    "mistral": Defaults(kv_heads=8, head_dim=None, context_length=131072, tie_embeddings=False),
    "qwen2": Defaults(kv_heads=32, head_dim=None, context_length=32768, tie_embeddings=False),
    "qwen3": Defaults(kv_heads=32, head_dim=128, context_length=32768, tie_embeddings=False),
    "gemma3_text": Defaults(kv_heads=4, head_dim=256, context_length=131072,
                            tie_embeddings=True, rope_theta=1e6),
}
GEMMA3_SLIDING_WINDOW = 4096
GEMMA3_QUERY_PRE_ATTN_SCALAR = 256
MISTRAL_SLIDING_WINDOW = 4096
_MISSING = object()


def model_folder(folder: str | os.PathLike) -> Path:
    """`folder` as a Path, checked to be an existing directory."""
    path = Path(folder)
    if not path.exists():
        raise CheckpointError(f"model folder not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a folder (a Hugging Face model is a folder holding "
                              f"{CONFIG_FILE} and safetensors)")
    return path


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


class ConfigFields:
    """Typed reads of a config dict whose errors name the file and the key."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path = path
        self.data = data

    def error(self, message: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {message}")

    def raw(self, key: str, default: Any = _MISSING, source: dict | None = None) -> Any:
        source = self.data if source is None else source
        if key in source and source[key] is not None:
            return source[key]
        if default is _MISSING:
            raise self.error(f"missing field '{key}'")
        return default

    def checked(self, check, key: str, default: Any, source: dict | None, *args) -> Any:
        value = self.raw(key, default, source)
        try:
            return check(f"'{key}'", value, *args)
        except (TypeError, ValueError) as e:
            raise self.error(str(e)) from None

    def int(self, key: str, default: Any = _MISSING, source: dict | None = None) -> int:
        return self.checked(static_int, key, default, source, 1)

    def positive(self, key: str, default: Any = _MISSING, source: dict | None = None) -> float:
        return self.checked(static_positive, key, default, source)

    def finite(self, key: str, default: Any = _MISSING, source: dict | None = None) -> float:
        return self.checked(static_finite, key, default, source)

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        return self.checked(static_bool, key, default, None)

    def optional_positive(self, key: str) -> float | None:
        return None if self.data.get(key) is None else self.positive(key)


def read_config(folder: str | os.PathLike) -> TransformerConfig:
    """The `TransformerConfig` of a Hugging Face model folder, from its ``config.json``.

    See the module docstring for the defaults and for the keys that raise.
    """
    path = model_folder(folder) / CONFIG_FILE
    fields = ConfigFields(path, read_json(path))
    model_type = fields.raw("model_type")
    if model_type == "gemma3":
        raise fields.error("model_type 'gemma3' is the multimodal Gemma3ForConditionalGeneration; "
                           "only the text model (model_type 'gemma3_text', Gemma3ForCausalLM) is "
                           "supported")
    if model_type not in MODEL_TYPES:
        raise fields.error(f"unsupported model_type {model_type!r} (supported: "
                           f"{', '.join(MODEL_TYPES)})")
    if fields.data.get("quantization_config") is not None:
        raise fields.error("quantized checkpoints (quantization_config) are not supported; "
                           "use float32, float16 or bfloat16 weights")
    if fields.data.get("mlp_bias"):
        raise fields.error("mlp_bias true (biases on the MLP projections) is not supported")
    defaults = DEFAULTS[model_type]
    gemma = model_type == "gemma3_text"

    dim = fields.int("hidden_size")
    n_heads = fields.int("num_attention_heads")
    n_kv_heads = fields.int("num_key_value_heads", defaults.kv_heads or n_heads)
    head_dim = fields.int("head_dim", defaults.head_dim or dim // n_heads)
    context_length = fields.int("max_position_embeddings", defaults.context_length)
    activation_key = "hidden_activation" if gemma else "hidden_act"
    activation = fields.raw(activation_key, "gelu_pytorch_tanh" if gemma else "silu")
    if activation not in ACTIVATIONS:
        raise fields.error(f"unsupported {activation_key} {activation!r} (supported: "
                           f"{', '.join(ACTIVATIONS)})")
    options = {
        "architecture": "gemma3" if gemma else model_type,
        "vocab_size": fields.int("vocab_size"), "dim": dim,
        "n_layers": fields.int("num_hidden_layers"), "n_heads": n_heads,
        "n_kv_heads": n_kv_heads, "head_dim": head_dim, "ffn_dim": fields.int("intermediate_size"),
        "norm_eps": fields.positive("rms_norm_eps", 1e-6), "context_length": context_length,
        "tie_embeddings": fields.bool("tie_word_embeddings", defaults.tie_embeddings),
        "activation": ACTIVATIONS[activation]}
    attention_bias = fields.bool("attention_bias", False)
    if model_type == "mistral" and attention_bias:
        raise fields.error("attention_bias true is not supported for mistral (transformers' "
                           "MistralForCausalLM has no attention biases)")
    if model_type == "qwen2":
        options.update(qkv_bias=True)
    elif model_type != "mistral":
        options.update(qkv_bias=attention_bias, out_bias=attention_bias)
    if model_type == "mistral":
        options.update(sliding_options(fields, options["n_layers"]))
    if model_type in ("qwen2", "qwen3"):
        check_no_qwen_sliding(fields)
    if model_type == "qwen3":
        options.update(qk_norm=True)
    if gemma:
        options.update(gemma3_options(fields, options["n_layers"], dim))
    else:
        base = fields.positive("rope_theta", defaults.rope_theta)
        options.update(rope=read_rope(fields, flat_rope_parameters(fields), base, context_length,
                                      "rope_parameters"))
    try:
        return TransformerConfig(**options)
    except ValueError as e:
        raise fields.error(str(e)) from None


def sliding_options(fields: ConfigFields, n_layers: int) -> dict[str, Any]:
    """Mistral: one window for every layer, none when ``sliding_window`` is null."""
    if "sliding_window" in fields.data and fields.data["sliding_window"] is None:
        return {}
    window = fields.int("sliding_window", MISTRAL_SLIDING_WINDOW)
    return {"sliding_window": window, "sliding_layers": (True,) * n_layers}


def check_no_qwen_sliding(fields: ConfigFields) -> None:
    """Qwen's sliding windows apply only with ``use_sliding_window`` (transformers ignores
    ``sliding_window`` otherwise); we implement neither them nor per-layer types."""
    if fields.bool("use_sliding_window", False):
        raise fields.error("use_sliding_window true (Qwen sliding-window layers) is not supported")
    layer_types = fields.data.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list)
                                    or any(t != "full_attention" for t in layer_types)):
        raise fields.error(f"layer_types {layer_types!r}: only 'full_attention' layers are "
                           "supported for qwen models")


def gemma3_options(fields: ConfigFields, n_layers: int, dim: int) -> dict[str, Any]:
    """Gemma 3's extras: sandwich and q/k norms, scaled embeddings, the query scale, logit
    soft-capping, sliding layers and a RoPE per layer type."""
    if fields.data.get("use_bidirectional_attention"):
        raise fields.error("use_bidirectional_attention true is not supported (causal models only)")
    layer_types = fields.data.get("layer_types")
    if layer_types is None:
        pattern = fields.int("sliding_window_pattern", GEMMA3_SLIDING_PATTERN)
        sliding = every_nth_global(n_layers, pattern)
    else:
        if (not isinstance(layer_types, list) or len(layer_types) != n_layers
                or any(t not in LAYER_TYPES for t in layer_types)):
            raise fields.error(f"layer_types must list one of {', '.join(LAYER_TYPES)} for each "
                               f"of the {n_layers} layers, got {layer_types!r}")
        sliding = tuple(t == "sliding_attention" for t in layer_types)
    window = None
    if any(sliding):
        window = fields.int("sliding_window", GEMMA3_SLIDING_WINDOW)
    global_rope, local_rope = gemma3_ropes(fields)
    scalar = fields.positive("query_pre_attn_scalar", GEMMA3_QUERY_PRE_ATTN_SCALAR)
    if fields.data.get("attn_logit_softcapping") is not None:
        # Gemma 2 capped attention logits; Gemma 3 replaced that by the q/k norms, and
        # transformers' Gemma 3 reads the key but never applies it: which one is meant is unclear
        raise fields.error("attn_logit_softcapping is not supported for gemma3 (Gemma 3 has "
                           "none; transformers ignores it), got "
                           f"{fields.data['attn_logit_softcapping']!r}")
    return {"qk_norm": True, "sandwich_norm": True, "embed_scale": math.sqrt(dim),
            "attn_scale": scalar ** -0.5, "sliding_window": window, "sliding_layers": sliding,
            "rope": global_rope, "rope_local": local_rope,
            "final_logit_softcap": fields.optional_positive("final_logit_softcapping")}


def flat_rope_parameters(fields: ConfigFields) -> dict[str, Any]:
    """The one RoPE dict of a non-Gemma config, as transformers picks it: ``rope_scaling`` when
    given (old format), else ``rope_parameters`` (transformers 5; its ``full_attention`` entry if
    it is split by layer type)."""
    params = fields.data.get("rope_scaling") or fields.data.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise fields.error(f"RoPE parameters must be a JSON object, got {params!r}")
    if isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    return params


def gemma3_ropes(fields: ConfigFields) -> tuple[Rope, Rope]:
    """Gemma 3's global (full-attention) and local (sliding) RoPE: ``rope_parameters`` per layer
    type, the old ``rope_scaling`` updating the global one, and the old ``rope_theta`` /
    ``rope_local_base_freq`` as the bases where the dicts give none."""
    params = fields.data.get("rope_parameters") or {}
    if not isinstance(params, dict) or (params and not set(params) & set(LAYER_TYPES)):
        raise fields.error(f"gemma3 rope_parameters must hold one dict per layer type "
                           f"({', '.join(LAYER_TYPES)}), got {params!r}")
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    scaling = fields.data.get("rope_scaling")
    if scaling:
        if not isinstance(scaling, dict):
            raise fields.error(f"rope_scaling must be a JSON object, got {scaling!r}")
        full.update(scaling)
    context = fields.int("max_position_embeddings", DEFAULTS["gemma3_text"].context_length)
    global_theta = fields.positive("rope_theta", DEFAULTS["gemma3_text"].rope_theta)
    local_theta = fields.positive("rope_local_base_freq", GEMMA3_LOCAL_ROPE_BASE)
    return (read_rope(fields, full, global_theta, context, "rope_parameters.full_attention"),
            read_rope(fields, local, local_theta, context, "rope_parameters.sliding_attention"))


def read_rope(fields: ConfigFields, params: dict[str, Any], base: float, context_length: int,
              where: str) -> Rope:
    """A `Rope` from one transformers RoPE dict; `base` is the base when the dict has no
    ``rope_theta``."""
    if not isinstance(params, dict):
        raise fields.error(f"{where} must be a JSON object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise fields.error(f"{where}: unsupported RoPE type {kind!r} (supported: "
                           f"{', '.join(ROPE_SCALINGS)})")
    partial = params.get("partial_rotary_factor", fields.data.get("partial_rotary_factor"))
    if partial is not None and partial != 1:
        raise fields.error(f"partial_rotary_factor {partial!r} (RoPE on part of each head) is "
                           "not supported")
    options = {"base": fields.positive("rope_theta", base, params), "scaling": kind}
    if kind in ("linear", "llama3"):
        options.update(factor=fields.positive("factor", source=params))
    if kind == "llama3":
        # a top-level original_max_position_embeddings wins over the dict's, as in transformers
        context = fields.raw("original_max_position_embeddings", context_length, params)
        original = fields.int("original_max_position_embeddings", context)
        options.update(low_freq_factor=fields.positive("low_freq_factor", source=params),
                       high_freq_factor=fields.positive("high_freq_factor", source=params),
                       original_context=original)
        if options["high_freq_factor"] <= options["low_freq_factor"]:
            raise fields.error(f"{where}: high_freq_factor must exceed low_freq_factor")
    try:
        return Rope(**options)
    except ValueError as e:
        raise fields.error(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# weights


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors of a safetensors file from its header, after checking that the file holds every
    byte the header promises (a truncated download fails here, before any tensor is read)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file: the header "
                                  f"claims {header_len} bytes but the file has {size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    out, end = {}, 0
    for name, entry in header.items():
        try:
            dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(static_int("shape", s, 0) for s in shape)
            start, stop = static_int("offset", start, 0), static_int("offset", stop, 0)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}': "
                                  f"{entry!r}") from e
        end = max(end, stop)
        out[name] = TensorInfo(path, str(dtype), shape)
    needed = 8 + header_len + end
    if needed > size:
        raise CheckpointError(f"{path}: truncated: its header describes {needed} bytes but the "
                              f"file has {size} (an incomplete download?)")
    return out


def checkpoint_tensors(folder: Path) -> tuple[Path, dict[str, TensorInfo]]:
    """Where the weights are described (``model.safetensors`` or the shard index) and every
    tensor of the checkpoint, from the headers."""
    single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
    if single.exists():
        return single, read_safetensors_header(single)
    if not index.exists():
        others = sorted(p.name for p in folder.iterdir()
                        if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".safetensors"))
        found = f" (found: {', '.join(others)})" if others else ""
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} nor {INDEX_FILE}{found}: the weights "
                              "must be safetensors (PyTorch .bin checkpoints are not read; convert "
                              "them with transformers' save_pretrained(safe_serialization=True))")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: missing or empty 'weight_map'")
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        path = folder / str(shard)
        if not path.is_file():
            raise CheckpointError(f"{index}: shard '{shard}' is listed but missing from {folder}")
        for name, info in read_safetensors_header(path).items():
            if name in tensors:
                raise CheckpointError(f"{index}: tensor '{name}' is stored in both "
                                      f"{tensors[name].file.name} and {shard}")
            tensors[name] = info
    for name, shard in weight_map.items():
        if name not in tensors or tensors[name].file.name != str(shard):
            raise CheckpointError(f"{index}: lists tensor '{name}' in shard '{shard}', which does "
                                  "not hold it")
    return index, tensors


@dataclasses.dataclass(frozen=True)
class Wanted:
    """A checkpoint tensor the model uses: where it goes and how."""

    ours: str              # our weight name (targets.lm.config)
    shape: tuple[int, ...]  # its shape in the checkpoint (PyTorch's [out, in] for matrices)
    transpose: bool        # matrices become [in, out]
    gemma_norm: bool       # stored w -> 1 + w in float32


def wanted_tensors(config: TransformerConfig) -> dict[str, tuple[Wanted, int | None]]:
    """Checkpoint name -> (what it becomes, its layer or None) for every tensor `config` needs."""
    c = config
    gemma = c.architecture == "gemma3"
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    per_layer = {
        "self_attn.q_proj.weight": ("wq", (q, c.dim)),
        "self_attn.k_proj.weight": ("wk", (kv, c.dim)),
        "self_attn.v_proj.weight": ("wv", (kv, c.dim)),
        "self_attn.o_proj.weight": ("wo", (c.dim, q)),
        "input_layernorm.weight": ("attn_norm", (c.dim,)),
        "mlp.gate_proj.weight": ("w_gate", (c.ffn_dim, c.dim)),
        "mlp.up_proj.weight": ("w_up", (c.ffn_dim, c.dim)),
        "mlp.down_proj.weight": ("w_down", (c.dim, c.ffn_dim)),
    }
    if gemma:
        per_layer.update({"post_attention_layernorm.weight": ("post_attn_norm", (c.dim,)),
                          "pre_feedforward_layernorm.weight": ("ffn_norm", (c.dim,)),
                          "post_feedforward_layernorm.weight": ("post_ffn_norm", (c.dim,))})
    else:
        per_layer["post_attention_layernorm.weight"] = ("ffn_norm", (c.dim,))
    if c.qkv_bias:
        per_layer.update({"self_attn.q_proj.bias": ("bq", (q,)),
                          "self_attn.k_proj.bias": ("bk", (kv,)),
                          "self_attn.v_proj.bias": ("bv", (kv,))})
    if c.out_bias:
        per_layer["self_attn.o_proj.bias"] = ("bo", (c.dim,))
    if c.qk_norm:
        per_layer.update({"self_attn.q_norm.weight": ("q_norm", (c.head_dim,)),
                          "self_attn.k_norm.weight": ("k_norm", (c.head_dim,))})

    def wanted(ours, shape):
        return Wanted(ours, shape, transpose=len(shape) == 2,
                      gemma_norm=gemma and ours.endswith("norm"))

    out = {"model.embed_tokens.weight": (Wanted("embed", (c.vocab_size, c.dim), False, False),
                                         None),
           "model.norm.weight": (wanted("final_norm", (c.dim,)), None)}
    if not c.tie_embeddings:
        out["lm_head.weight"] = (wanted("lm_head", (c.vocab_size, c.dim)), None)
    for i in range(c.n_layers):
        for name, (ours, shape) in per_layer.items():
            out[f"model.layers.{i}.{name}"] = (wanted(ours, shape), i)
    return out


def is_ignored(name: str, config: TransformerConfig) -> bool:
    """Tensors transformers does not use either: old RoPE buffers, and a tied ``lm_head``
    (transformers ties it to the embeddings and ignores the stored copy; so do we)."""
    return name.endswith(HARMLESS_SUFFIXES) or (config.tie_embeddings and name == "lm_head.weight")


def read_weights(folder: str | os.PathLike, config: TransformerConfig) -> dict[str, Any]:
    """The weights of a Hugging Face folder in the layout of `targets.lm.config` (numpy, stored
    dtype kept; matrices transposed to ``[in, out]``; per-layer arrays stacked on a leading layer
    axis). Names, shapes and dtypes of every tensor are checked from the safetensors headers
    before any tensor is read; a tensor the model would not use is an error, not skipped."""
    # imported here: reading configs needs neither; ml_dtypes registers numpy's "bfloat16",
    # which safetensors asks numpy for
    import ml_dtypes  # noqa: F401
    from safetensors import safe_open

    folder = model_folder(folder)
    source, tensors = checkpoint_tensors(folder)
    wanted = wanted_tensors(config)
    multimodal = sorted(n for n in tensors if n.startswith(MULTIMODAL_PREFIXES))
    if multimodal:
        raise CheckpointError(f"{source}: holds multimodal Gemma3ForConditionalGeneration weights "
                              f"(e.g. '{multimodal[0]}'); only the text model (Gemma3ForCausalLM) "
                              "is supported")
    unexpected = sorted(n for n in tensors if n not in wanted and not is_ignored(n, config))
    if unexpected:
        shown = ", ".join(f"'{n}'" for n in unexpected[:5])
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{source}: tensors that a {config.architecture} model with this "
                              f"{CONFIG_FILE} does not use: {shown}{more}")
    for name, (want, _) in wanted.items():
        if name not in tensors:
            raise CheckpointError(f"{source}: tensor '{name}' is missing")
        info = tensors[name]
        if info.dtype not in DTYPES:
            raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, which is "
                                  f"not supported (supported: {', '.join(DTYPES)}; quantized "
                                  "weights such as int8 or float8 are not read)")
        if info.shape != want.shape:
            raise CheckpointError(f"{info.file}: tensor '{name}' has shape {list(info.shape)}, "
                                  f"expected {list(want.shape)} from {CONFIG_FILE}")

    layers: dict[str, list[np.ndarray | None]] = {}
    weights: dict[str, Any] = {}
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(tensors[name].file, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="np") as f:
                for name in names:
                    want, layer = wanted[name]
                    array = convert(f.get_tensor(name), want)
                    if layer is None:
                        weights[want.ours] = array
                    else:
                        layers.setdefault(want.ours, [None] * config.n_layers)[layer] = array
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error type on a bad file
            raise CheckpointError(f"{path}: could not read the tensors: {type(e).__name__}: "
                                  f"{e}") from e
    weights["layers"] = {k: np.stack(v) for k, v in layers.items()}
    return weights


def convert(array: np.ndarray, want: Wanted) -> np.ndarray:
    """One stored tensor -> our layout: ``[in, out]`` matrices (contiguous), Gemma norms as
    float32 ``1 + w``; otherwise the stored values and dtype."""
    if want.gemma_norm:
        return array.astype(np.float32) + np.float32(1.0)
    if want.transpose:
        return np.ascontiguousarray(array.T)
    return array


# ---------------------------------------------------------------------------------------------
# end of sequence


def read_generation_eos(folder: str | os.PathLike) -> tuple[int, ...]:
    """The ids that end a sequence: ``eos_token_id`` (an int or a list) of
    ``generation_config.json``, else of ``config.json``; () when neither names one."""
    folder = model_folder(folder)
    for name in (GENERATION_CONFIG_FILE, CONFIG_FILE):
        path = folder / name
        if not path.exists():
            continue
        eos = read_json(path).get("eos_token_id")
        if eos is None:
            continue
        ids = eos if isinstance(eos, list) else [eos]
        try:
            ids = [static_int("eos_token_id", i, 0) for i in ids]
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: eos_token_id must be a token id or a list of token "
                                  f"ids, got {eos!r} ({e})") from None
        return tuple(dict.fromkeys(ids))
    return ()
