"""The memory a run needs, estimated before compiling, and a refusal for runs that cannot fit.

`smc.run` calls `check_fits(estimate_bytes(...))` before it traces anything but the model's
shapes, so that a run too large for the device fails at once with the figures, instead of the
allocator failing after compilation or the kernel killing the process.

The estimate is a lower bound of the peak. It counts what the engine itself must hold at once:

- two copies of the particles: the carried cloud and the new one that a resampling gather (or the
  step) writes while the old one is still live; XLA cannot update either in place;
- `PER_PARTICLE_VECTORS` vectors of N log-weights or indices: the log-weights, the increments,
  the resampler's cdf, counts and ancestors;
- the traces: a few scalars per step, the ancestors [T, N] int32 when recorded, and the summaries
  [T + 1] when given.

It leaves out the model's own temporaries (an LM's activations, a score network's), so a run that
passes may still run out of memory; a run that is refused cannot fit. It is for one run: a `vmap`
over R runs needs about R times it, which the engine cannot see.

The limit: `device.memory_stats()["bytes_limit"]` where the backend reports it (GPU, TPU); on a
CPU, the machine's available physical memory (MemAvailable in /proc/meminfo, else the free pages
from `os.sysconf`). SMC_SKIP_MEMORY_CHECK=1 in the environment skips the check.
"""
from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp

from smc.feynman_kac import FeynmanKac

PyTree = Any

PARTICLE_COPIES = 2
PER_PARTICLE_VECTORS = 6
TRACE_SCALARS = 4          # ess, log-evidence increment, resampled flag, non-finite count
SKIP_VARIABLE = "SMC_SKIP_MEMORY_CHECK"


def tree_bytes(tree: PyTree) -> int:
    """Bytes of every leaf of a pytree of arrays or jax.ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
               for leaf in jax.tree_util.tree_leaves(tree))


def estimate_bytes(model: FeynmanKac, num_particles: int, *, record_ancestors: bool = False,
                   summary: Any = None, particles: PyTree | None = None,
                   log_weight_dtype: Any = jnp.float32) -> int:
    """A lower bound of the bytes that `smc.run(key, model, num_particles, ...)` needs (module doc).

    particles: init's particles as jax.ShapeDtypeStructs when the caller has them (else init is
    traced abstractly here: nothing is allocated). summary: `run`'s summary function, if any.
    """
    n = num_particles
    if particles is None:
        particles, _ = jax.eval_shape(lambda key: model.init(key, n), jax.random.PRNGKey(0))
    steps = int(model.num_steps)
    width = max(jnp.dtype(log_weight_dtype).itemsize, 4)
    total = PARTICLE_COPIES * tree_bytes(particles) + PER_PARTICLE_VECTORS * n * width
    total += (steps + 1) * TRACE_SCALARS * width
    if record_ancestors:
        total += steps * n * 4
    if summary is not None:
        log_weights = jax.ShapeDtypeStruct((n,), log_weight_dtype)
        total += (steps + 1) * tree_bytes(jax.eval_shape(summary, particles, log_weights))
    return int(total)


def available_bytes(device: Any = None) -> int | None:
    """The memory a run may use on `device` (default: the first device), None if unknown."""
    device = jax.devices()[0] if device is None else device
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        return host_available_bytes()
    return None


def host_available_bytes() -> int | None:
    """Physical memory available to a new allocation, without swapping, None if unknown.

    MemAvailable counts the page cache that the kernel can drop; free pages alone (sysconf) would
    refuse runs that fit on a machine whose memory holds cached files.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(num_bytes: int, device: Any = None) -> None:
    """MemoryError, naming the bytes needed and the limit, when num_bytes exceed what `device`
    has (`available_bytes`); nothing when the limit is unknown or SMC_SKIP_MEMORY_CHECK=1."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        return
    limit = available_bytes(device)
    if limit is not None and num_bytes > limit:
        device = jax.devices()[0] if device is None else device
        raise MemoryError(
            f"this SMC run needs at least {num_bytes:,} bytes ({num_bytes / 2**30:.1f} GiB: the "
            f"particles twice, the weights and the traces; smc.memory) but {device} has "
            f"{limit:,} bytes ({limit / 2**30:.1f} GiB); use fewer particles or smaller ones, or "
            f"set {SKIP_VARIABLE}=1 to skip this check")
