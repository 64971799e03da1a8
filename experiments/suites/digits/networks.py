"""Small Flax (linen) networks for the digits: a conditional noise predictor, a conditional flow
velocity and a classifier.

`EpsNet`: eps_hat(x_t [N, 64], t [N], label [N], thick [N]) -> [N, 64], an MLP with a sinusoidal
time embedding and learned embeddings of the class (0..9, NULL_LABEL = 10 for none) and the
thickness (0, 1, NULL_THICK = 2 for none). Trained with label dropout, one network gives the
unconditional, class-, thickness- and jointly conditional scores (classifier-free guidance style);
`score` turns it into score(x [N, 64], t) -> [N, 64] through `sde.score_from_eps`.

`VelocityNet`: the same network read as a flow-matching velocity v(x_t, t, label, thick) ~
E[eps - x0 | x_t] on the linear interpolant x_t = (1 - t) x0 + t eps; `flow_score` turns it into a
score on `sde.LinearInterpolant()` through `sde.score_from_velocity` (`sde.convert_score` moves
it to another schedule).

`Classifier`: logits [N, 10] and penultimate features [N, FEATURES] of clean digits; `reward` is
r(x0) = log softmax(logits(x0))[c], the reward of `digits_reward`; `features` feed the Frechet
distance.

Weights live in `weights/` (msgpack, `flax.serialization`), written by
`experiments.suites.digits.train`.
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import serialization

from experiments.suites.digits.data import DIM, NUM_CLASSES
from targets.diffusion import sde

Array = jax.Array
Params = Any
NULL_LABEL = NUM_CLASSES  # "no class": the unconditional / thickness-only score
NULL_THICK = 2            # "no thickness"
WEIGHTS = pathlib.Path(__file__).resolve().parent / "weights"
SCORE_FILE, CLASSIFIER_FILE, MANIFEST = "score.msgpack", "classifier.msgpack", "manifest.json"
FLOW_FILE = "flow.msgpack"


def time_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
    """[sin(1000 t w_k), cos(1000 t w_k)], w_k = max_period^(-k / (dim/2)), [N, dim] for t [N]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = 1000.0 * t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class EpsNet(nn.Module):
    """Residual MLP noise predictor conditioned on time, class and thickness."""

    hidden: int = 192
    depth: int = 3
    time_dim: int = 64

    @nn.compact
    def __call__(self, x: Array, t: Array, label: Array, thick: Array) -> Array:
        emb = nn.Dense(self.hidden)(nn.silu(nn.Dense(self.hidden)(
            time_embedding(t, self.time_dim))))
        emb = emb + nn.Embed(NUM_CLASSES + 1, self.hidden)(label)
        emb = emb + nn.Embed(NULL_THICK + 1, self.hidden)(thick)
        h = nn.Dense(self.hidden)(x)
        for _ in range(self.depth):
            z = nn.Dense(self.hidden)(nn.silu(nn.LayerNorm()(h)) + emb)
            h = h + nn.Dense(self.hidden)(nn.silu(z))
        return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(nn.silu(nn.LayerNorm()(h)))


class VelocityNet(EpsNet):
    """EpsNet's architecture (and parameter tree) trained as a flow velocity: its output is
    v(x_t, t, label, thick) ~ E[eps - x0 | x_t] on the linear interpolant."""


class Classifier(nn.Module):
    """MLP on clean digits: (logits [N, 10], penultimate features [N, hidden[-1]])."""

    hidden: Sequence[int] = (128, 32)

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, Array]:
        h = x
        for width in self.hidden:
            h = nn.silu(nn.Dense(width)(h))
        return nn.Dense(NUM_CLASSES)(h), h


# ---------------------------------------------------------------------------------------------
# The networks as the functions the rest of the repo takes


def _index(value, size: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
        raise ValueError(f"{name} must be an int in [0, {size}), got {value!r}")
    return value


def _condition(value: int | None, null: int, size: int, name: str) -> int:
    return null if value is None else _index(value, size, name)


def eps_model(net: EpsNet, params: Params, label: int | None = None,
              thick: int | None = None) -> Callable[[Array, Array], Array]:
    """eps_hat(x [N, 64], t scalar) for a fixed condition (None: dropped, i.e. marginalised);
    for a `VelocityNet`, its velocity v(x, t) the same way."""
    label = _condition(label, NULL_LABEL, NUM_CLASSES, "label")
    thick = _condition(thick, NULL_THICK, 2, "thick")

    def model(x: Array, t: Array) -> Array:
        n = x.shape[0]
        return net.apply(params, x, jnp.full((n,), t, x.dtype), jnp.full((n,), label, jnp.int32),
                         jnp.full((n,), thick, jnp.int32))

    return model


def score(net: EpsNet, params: Params, schedule: sde.Schedule, label: int | None = None,
          thick: int | None = None) -> sde.ScoreFn:
    """grad log q_t(x | condition) = -eps_hat / sigma_t: score(x [N, 64], t) -> [N, 64]."""
    return sde.score_from_eps(schedule, eps_model(net, params, label, thick))


def flow_score(net: VelocityNet, params: Params, label: int | None = None,
               thick: int | None = None) -> sde.ScoreFn:
    """grad log q_t(x | condition) on the linear interpolant, -(x + (1 - t) v) / t:
    score(x [N, 64], t) -> [N, 64] for t in (0, 1) (`sde.LinearInterpolant`)."""
    return sde.score_from_velocity(sde.LinearInterpolant(), eps_model(net, params, label, thick))


def logits_and_features(net: Classifier, params: Params) -> Callable[[Array], tuple[Array, Array]]:
    """x0 [N, 64] -> (logits [N, 10], features [N, F])."""
    return lambda x: net.apply(params, x)


def reward(net: Classifier, params: Params, label: int) -> Callable[[Array], Array]:
    """r(x0) = log softmax(logits(x0))[label], [N] for x0 [N, 64] (<= 0; 0 = certain)."""
    label = _index(label, NUM_CLASSES, "label")
    return lambda x: jax.nn.log_softmax(net.apply(params, x)[0], axis=-1)[:, label]


# ---------------------------------------------------------------------------------------------
# Weights on disk


def init_params(net: nn.Module, key: Array | None = None) -> Params:
    """Fresh parameters for `net` (jitted: flax's eager init dispatches op by op, slowly)."""
    key = jax.random.PRNGKey(0) if key is None else key
    return jax.jit(functools.partial(_init, net))(key)


def _init(net: nn.Module, key: Array) -> Params:
    x = jnp.zeros((1, DIM), jnp.float32)
    if isinstance(net, EpsNet):
        zeros = jnp.zeros((1,), jnp.int32)
        return net.init(key, x, jnp.zeros((1,), jnp.float32), zeros, zeros)
    return net.init(key, x)


def save_params(params: Params, path: pathlib.Path) -> None:
    path.write_bytes(serialization.to_bytes(params))


def load_params(net: nn.Module, path: pathlib.Path) -> Params:
    """Parameters of `net` from a msgpack file; a clear error if missing or of another shape."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with "
                                f"`python -m experiments.suites.digits.train --out {path.parent}`")
    template = jax.eval_shape(functools.partial(_init, net), jax.random.PRNGKey(0))
    try:
        params = serialization.from_bytes(template, path.read_bytes())
    except (ValueError, KeyError) as error:
        raise ValueError(f"{path} does not hold weights of {net!r}: {error}") from None
    shapes = jax.tree_util.tree_map(jnp.shape, params)
    if shapes != jax.tree_util.tree_map(jnp.shape, template):
        raise ValueError(f"{path} does not hold weights of {net!r}")
    return jax.tree_util.tree_map(jnp.asarray, params)


def load(directory: pathlib.Path | str = WEIGHTS) -> tuple[EpsNet, Params, Classifier, Params]:
    """(eps network, its params, classifier, its params) from `directory` and its manifest."""
    directory = pathlib.Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    eps_net = EpsNet(**manifest["score"]["network"])
    clf_net = Classifier(hidden=tuple(manifest["classifier"]["network"]["hidden"]))
    return (eps_net, load_params(eps_net, directory / SCORE_FILE),
            clf_net, load_params(clf_net, directory / CLASSIFIER_FILE))


def load_flow(directory: pathlib.Path | str = WEIGHTS) -> tuple[VelocityNet, Params]:
    """(flow network, its params) from `directory` and its manifest's "flow" entry."""
    directory = pathlib.Path(directory)
    manifest = json.loads((directory / MANIFEST).read_text())
    if "flow" not in manifest:
        raise FileNotFoundError(f"{directory / MANIFEST} has no flow network: train it with "
                                f"`python -m experiments.suites.digits.train --what flow`")
    net = VelocityNet(**manifest["flow"]["network"])
    return net, load_params(net, directory / FLOW_FILE)
