"""Tensor parallelism: the transformer's parameters over a ``("particles", "model")`` mesh.

Particles (rows) go over ``"particles"`` (the SMC engine shards them); each parameter that has
a dimension worth splitting puts it over ``"model"``, in three groups (the layout of
`targets.lm.transformer.cast_params`):

- attention: the KV heads, axis KV of ``wqkv [KV, G + 2, hd, D]``, ``bqkv [KV, G + 2, hd]`` and
  ``wo [D, KV, G, hd]``. A KV head travels with its G query heads, key and value (the grouped
  layout), so each device computes whole heads: the attention itself needs no communication,
  only ``wo``'s sum over heads does (one all-reduce per layer), and the KV cache, which the
  keys and values fill, can stay split over the same heads;
- MLP: the hidden units, axis F of ``w_gate_up [F, 2, D]`` and ``w_down [D, F]`` (Megatron's
  column-then-row split: the gate, up and activation are local, ``w_down``'s sum over F is one
  all-reduce);
- vocabulary: axis V of ``embed [V, D]`` and ``lm_head [V, D]``, the largest matrices of a small
  model (SmolLM2's embedding is 21% of its weights); the log-softmax over V then reduces across
  devices.

Everything else (norms, ``bo``, and everything when the mesh has no ``"model"`` axis) is
replicated. A group whose dimension the ``"model"`` axis does not divide is replicated too:
splitting a head or a hidden unit is not possible with `NamedSharding`'s equal blocks, and
padding would change the model. SmolLM2-135M has 3 KV heads, so on ``model`` = 2, 4 or 8 its
attention is replicated while its MLP (1536 units) and vocabulary (49152) are split. `layout`
says which groups are split and which replicated (and why) before anything is placed;
`targets.lm.load` warns with `ReplicatedWarning` when a group is replicated on a ``"model"``
axis of more than one device (a warning rather than a fourth return value: every caller unpacks
three, and a sweep's log or a notebook shows it).

XLA partitions the computation from the parameters' shardings (`jax.device_put` with
`NamedSharding`); there is no hand-written communication. One hint is needed: the KV caches
(per row ``[N, KV, T, hd]`` and the prompt's ``[B, KV, P, hd]``) keep their heads over
``"model"`` only when pinned there (`ShardedTransformer`, which `shard` and `load` return when
the attention is split), and the SMC engine constrains only the particle axis of its particles,
so the pinned heads stay split through resampling.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from targets.lm.config import TransformerConfig
from targets.lm.transformer import Transformer

PARTICLES, MODEL = "particles", "model"
AXES = (PARTICLES, MODEL)


class ReplicatedWarning(UserWarning):
    """A parameter group is replicated on a ``"model"`` axis that does not divide it."""


class Group(NamedTuple):
    """A set of parameters split together over ``"model"`` along one model dimension."""

    name: str                   # "attention", "mlp", "vocabulary"
    dimension: str              # what is split: "KV heads", "hidden units", "tokens"
    size: int                   # that dimension's size in this model
    split: bool                 # True: over "model"; False: replicated


class Layout(NamedTuple):
    """Which parameter groups a mesh splits over its ``"model"`` axis (of `model_devices`)."""

    model_devices: int
    groups: tuple[Group, ...]

    @property
    def replicated(self) -> tuple[Group, ...]:
        """The groups not split although the mesh has a ``"model"`` axis of several devices."""
        return tuple(g for g in self.groups if not g.split and self.model_devices > 1)

    def is_split(self, name: str) -> bool:
        return any(g.split for g in self.groups if g.name == name)

    def describe(self) -> str:
        if self.model_devices == 1:
            return "no \"model\" axis of several devices: every parameter replicated"
        parts = [f"{g.name} ({g.size} {g.dimension}) "
                 + ("split" if g.split else f"replicated: {self.model_devices} does not divide "
                    f"{g.size}")
                 for g in self.groups]
        return f"over \"model\" = {self.model_devices} devices: " + "; ".join(parts)


# parameter name -> (its group, the axis of it split over "model")
SPLIT_AXIS = {"wqkv": ("attention", 0), "bqkv": ("attention", 0), "wo": ("attention", 1),
              "w_gate_up": ("mlp", 0), "w_down": ("mlp", 1),
              "embed": ("vocabulary", 0), "lm_head": ("vocabulary", 0)}


def check_mesh(mesh: Any) -> Mesh | None:
    """`mesh` (None, or a `jax.sharding.Mesh` whose axes are among ``("particles", "model")``);
    TypeError / ValueError naming ``mesh`` otherwise."""
    if mesh is None:
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    unknown = [name for name in mesh.axis_names if name not in AXES]
    if unknown:
        raise ValueError(f"mesh axis names must be among {AXES}, got {tuple(mesh.axis_names)} "
                         f"({', '.join(map(repr, unknown))} unknown)")
    return mesh


def model_devices(mesh: Mesh | None) -> int:
    """The size of the mesh's ``"model"`` axis (1 without one)."""
    return 1 if mesh is None else dict(mesh.shape).get(MODEL, 1)


def layout(config: TransformerConfig, mesh: Mesh | None) -> Layout:
    """What `shard_params` splits over `mesh`'s ``"model"`` axis, and what it replicates."""
    devices = model_devices(check_mesh(mesh))
    sizes = (("attention", "KV heads", config.n_kv_heads),
             ("mlp", "hidden units", config.ffn_dim),
             ("vocabulary", "tokens", config.vocab_size))
    return Layout(devices, tuple(Group(name, dim, size, devices > 1 and size % devices == 0)
                                 for name, dim, size in sizes))


def param_specs(params: Any, plan: Layout) -> Any:
    """A `PartitionSpec` for every leaf of the model's `params` (`cast_params`' layout)."""
    def spec(path, leaf) -> PartitionSpec:
        name = getattr(path[-1], "key", None)
        if name not in SPLIT_AXIS or not plan.is_split(SPLIT_AXIS[name][0]):
            return PartitionSpec()
        axes = [None] * leaf.ndim
        axes[SPLIT_AXIS[name][1]] = MODEL
        return PartitionSpec(*axes)

    return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(params: Any, config: TransformerConfig, mesh: Mesh) -> tuple[Any, Layout]:
    """`params` placed on `mesh` (split as `layout` says, replicated over ``"particles"``) and
    that layout."""
    plan = layout(config, mesh)
    shardings = jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                       param_specs(params, plan))
    return jax.device_put(params, shardings), plan


def cache_sharding(mesh: Mesh, plan: Layout) -> NamedSharding | None:
    """Where the KV caches' heads go: axis 1 of every ``[rows, KV, length, hd]`` leaf over
    ``"model"`` when the attention is split (None otherwise: nothing to pin). The row axis is
    left to the caller (the SMC engine puts particles over ``"particles"``; a batch that the
    axis does not divide stays whole)."""
    if not plan.is_split("attention"):
        return None
    return NamedSharding(mesh, PartitionSpec(PartitionSpec.UNCONSTRAINED, MODEL))


def constrain_cache(cache: Any, where: NamedSharding | None) -> Any:
    """The transformer's cache (or prompt cache) with its keys and values pinned to `where`."""
    if where is None:
        return cache
    pin = lambda leaf: jax.lax.with_sharding_constraint(leaf, where)
    return {**cache, "k": jax.tree_util.tree_map(pin, cache["k"]),
            "v": jax.tree_util.tree_map(pin, cache["v"])}


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedTransformer(Transformer):
    """The transformer whose caches keep their KV heads over ``"model"`` (`cache_sharding`).

    XLA's propagation alone replicated them: the cache starts as zeros with no sharding and is
    carried through the decoding loop, and on a 2 x 4 mesh it chose whole heads on every
    device (and gathered the keys and values each step), although the projections that fill it
    are split by head. Pinning the outputs of `init_cache`, `prefill` and `decode` is enough
    for the loop to keep them split.
    """

    cache_sharding: NamedSharding | None = None

    def init_cache(self, batch: int, length: int):
        return constrain_cache(super().init_cache(batch, length), self.cache_sharding)

    def prefill(self, params, tokens, lengths):
        prompt_cache, logprobs = super().prefill(params, tokens, lengths)
        return constrain_cache(prompt_cache, self.cache_sharding), logprobs

    def decode(self, params, prompt_cache, cache, tokens, positions):
        cache, logprobs = super().decode(params, prompt_cache, cache, tokens, positions)
        return constrain_cache(cache, self.cache_sharding), logprobs


def shard(model: Transformer, params: Any, mesh: Mesh) -> tuple[Transformer, Any, Layout]:
    """``(model, params, layout)`` on `mesh`: the parameters placed by `shard_params`; the
    model a `ShardedTransformer` when its attention is split (else a plain `Transformer`)."""
    params, plan = shard_params(params, model.config, mesh)
    where = cache_sharding(mesh, plan)
    if where is not None or isinstance(model, ShardedTransformer):
        fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(Transformer)}
        model = (Transformer(**fields) if where is None
                 else ShardedTransformer(**fields, cache_sharding=where))
    return model, params, plan
