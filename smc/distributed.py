"""Particles over devices: global resampling (XLA partitions it) and island resampling.

Global: the particle axis is sharded over a mesh axis and resampling gathers across devices, so the
result is the single-device algorithm exactly. Islands: each device runs SMC on its own N / D
particles and never communicates until the end; each island's Z_hat_d is unbiased, so
Z_hat = mean_d Z_hat_d is too, and the pooled particles carry weights W_i proportional to
Z_hat_d W_{d,i}.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Array = jax.Array


def particle_sharding(mesh: Mesh, axis_name: str) -> NamedSharding:
    """The leading (particle) axis over `axis_name` (for the particles: `constrain_particles`)."""
    return NamedSharding(mesh, PartitionSpec(axis_name))


def constrain_particles(tree: Any, sharding: NamedSharding) -> Any:
    """Constrain only the leading axis of every leaf to `sharding`'s; its other axes are left
    to XLA (`PartitionSpec.UNCONSTRAINED`), so that an axis the model shards stays sharded (a
    KV cache's heads over a "model" axis): a plain spec would replicate them, i.e. all-gather
    the cache at every step."""
    def constrain(leaf: Array) -> Array:
        rest = [PartitionSpec.UNCONSTRAINED] * (jnp.ndim(leaf) - len(sharding.spec))
        spec = PartitionSpec(*sharding.spec, *rest)
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(sharding.mesh, spec))

    return jax.tree_util.tree_map(constrain, tree)


def num_shards(mesh: Mesh, axis_name: str, num_particles: int) -> int:
    """Devices along `axis_name`; N must split evenly over them."""
    if axis_name not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis_name!r}; its axes are {tuple(mesh.shape)}")
    devices = mesh.shape[axis_name]
    if num_particles % devices:
        raise ValueError(f"num_particles={num_particles} must be a multiple of the {devices} "
                         f"devices on mesh axis {axis_name!r}")
    return devices


def run_islands(run_local: Callable[[Array], Any], key: Array, mesh: Mesh, axis_name: str,
                num_islands: int) -> Any:
    """run_local(key) on every device of `axis_name` with its own key, then pool the islands.

    Traces (ess, increments, resampled, nan counts, ancestors, num_steps) keep a leading island
    axis [D, ...]; particles and log-weights are pooled to [N, ...].
    """
    keys = jax.random.split(key, num_islands)

    def local(keys: Array) -> Any:
        return jax.tree_util.tree_map(lambda leaf: leaf[None], run_local(keys[0]))

    spec = PartitionSpec(axis_name)
    # check_vma off: the local run mixes per-device values with constants in its loop carries.
    stacked = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)(keys)
    return pool(stacked)


def pool(stacked: Any) -> Any:
    """Pool [D, n, ...] island results into one [D * n, ...] weighted particle system."""
    log_z = stacked.log_evidence                                   # [D]
    # Each island's normalised weights, scaled by its evidence; a dead island weighs zero.
    local_norm = logsumexp(stacked.log_weights, axis=1, keepdims=True)
    scaled = jnp.where(jnp.isneginf(local_norm), -jnp.inf,
                       stacked.log_weights - local_norm + log_z[:, None])
    log_weights = scaled.reshape(-1)
    log_evidence = logsumexp(log_z) - jnp.log(log_z.shape[0])
    flatten = lambda leaf: leaf.reshape((-1,) + leaf.shape[2:])
    return stacked._replace(
        particles=jax.tree_util.tree_map(flatten, stacked.particles),
        log_weights=log_weights,
        log_evidence=log_evidence,
        degenerate=~jnp.isfinite(log_evidence),
    )
