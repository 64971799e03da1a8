"""Train the digits noise predictor, flow network and classifier; write their weights and a
manifest.

The shipped weights in `experiments/suites/digits/weights/` were made by exactly

    python -m experiments.suites.digits.train --what all     (score network and classifier)
    python -m experiments.suites.digits.train --what flow    (flow network, added later)

(JAX on CPU; fixed seeds, fixed batch order; every random draw is a fold_in of the seed and the
step number; `--what all` now trains the flow network too). `--steps N` overrides the number of
steps of each network trained, `--out DIR` writes elsewhere. The manifest (`manifest.json`) records each network's architecture, training
config, seed, final losses, package versions and the sha256 of its weight file.

Score network: denoising score matching for the VP schedule (`targets.diffusion.sde.VP`),

    L = E_{x0, t ~ U(t_min, 1), eps} || eps_hat(alpha_t x0 + sigma_t eps, t, c, h) - eps ||^2 / 64,

with the class c and the thickness h each replaced by "none" with their dropout probabilities
(one network, every conditioning). Adam with cosine decay; the saved weights are an EMA.
Flow network: flow matching on the linear interpolant (`sde.LinearInterpolant`),

    L = E_{x0, t ~ U(t_min, 1 - t_min), eps} || v(x_t, t, c, h) - (eps - x0) ||^2 / 64,
    x_t = (1 - t) x0 + t eps,

with the same architecture, conditioning dropout, optimiser and EMA as the score network, its own
seed and half the steps (about 50 s on one core; at 12000 steps the held-out loss rose from 0.513
to 0.522 while the training loss fell: 1347 images are memorised).
Classifier: cross-entropy with AdamW on clean digits plus small Gaussian pixel noise.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.suites.digits import data as data_lib
from experiments.suites.digits import networks
from targets.diffusion import sde

Array = jax.Array
CHUNK = 500  # steps per compiled scan (and per logged loss)
SCHEDULE = sde.VP()
FLOW_SCHEDULE = sde.LinearInterpolant()


@dataclasses.dataclass(frozen=True)
class ScoreTraining:
    hidden: int = 192
    depth: int = 3
    time_dim: int = 64
    steps: int = 12_000
    batch_size: int = 256
    learning_rate: float = 1e-3
    drop_label: float = 0.5   # P(class -> none)
    drop_thick: float = 0.5   # P(thickness -> none), independently
    ema_decay: float = 0.999
    t_min: float = 1e-3
    seed: int = 0

    def network(self) -> dict:
        return {"hidden": self.hidden, "depth": self.depth, "time_dim": self.time_dim}


@dataclasses.dataclass(frozen=True)
class FlowTraining(ScoreTraining):
    """The score network's recipe for the velocity network, t ~ U(t_min, 1 - t_min); half the
    steps (12,000 lowered the training loss and raised the held-out one: memorised digits)."""

    steps: int = 6_000
    seed: int = 2


@dataclasses.dataclass(frozen=True)
class ClassifierTraining:
    hidden: tuple = (128, 32)
    steps: int = 3_000
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    noise_std: float = 0.1    # pixel noise augmentation (in [-1, 1] units)
    seed: int = 1

    def network(self) -> dict:
        return {"hidden": list(self.hidden)}


class Trained(NamedTuple):
    """params (EMA for the score network); losses: mean training loss per CHUNK steps."""

    params: Any
    losses: list


# ---------------------------------------------------------------------------------------------
# Objectives


def dsm_loss(eps_fn: Callable[[Array, Array], Array], schedule: sde.Schedule, x0: Array, t: Array,
             noise: Array) -> Array:
    """Per-example || eps_fn(alpha_t x0 + sigma_t noise, t) - noise ||^2 / d, [B].

    x0, noise [B, d]; t [B]; eps_fn(x_t [B, d], t [B]) -> [B, d].
    """
    a, s = sde.alpha(schedule, t)[:, None], sde.sigma(schedule, t)[:, None]
    return jnp.mean((eps_fn(a * x0 + s * noise, t) - noise) ** 2, axis=-1)


def flow_matching_loss(velocity_fn: Callable[[Array, Array], Array], x0: Array, t: Array,
                       noise: Array) -> Array:
    """Per-example || velocity_fn((1 - t) x0 + t noise, t) - (noise - x0) ||^2 / d, [B].

    x0, noise [B, d]; t [B]; velocity_fn(x_t [B, d], t [B]) -> [B, d]. The minimiser is
    E[eps - x0 | x_t], the velocity `sde.score_from_velocity` takes on the linear interpolant.
    """
    x_t = (1.0 - t)[:, None] * x0 + t[:, None] * noise
    return jnp.mean((velocity_fn(x_t, t) - (noise - x0)) ** 2, axis=-1)


def cross_entropy(logits: Array, labels: Array) -> Array:
    """-log softmax(logits)[label], [B]."""
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]


def _batch(key: Array, step: Array, n: int, size: int) -> Array:
    """Indices of batch `step`: slices of one permutation per epoch (fold_in(key, epoch))."""
    per_epoch = n // size
    perm = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), n)
    return jax.lax.dynamic_slice(perm, ((step % per_epoch) * size,), (size,))


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps


# ---------------------------------------------------------------------------------------------
# Training loops (one jitted scan per CHUNK steps)


def train_score(config: ScoreTraining, train: data_lib.Split,
                schedule: sde.Schedule = SCHEDULE) -> Trained:
    """Denoising score matching with label dropout; returns the EMA parameters."""
    return _train_conditional(_score_trainer(dataclasses.replace(config, seed=0), schedule),
                              config, train)


def train_flow(config: FlowTraining, train: data_lib.Split) -> Trained:
    """Flow matching on the linear interpolant with label dropout; returns the EMA parameters."""
    return _train_conditional(_flow_trainer(dataclasses.replace(config, seed=0)), config, train)


def _train_conditional(trainer, config: ScoreTraining, train: data_lib.Split) -> Trained:
    steps = _check_steps(config.steps)
    net, optimizer, chunk = trainer
    key = jax.random.PRNGKey(config.seed)
    params = networks.init_params(net, jax.random.fold_in(key, 0))
    data = (jnp.asarray(train.x), jnp.asarray(train.label), jnp.asarray(train.thick))
    out = _scan_chunks(chunk, (params, params, optimizer.init(params)), steps, key, data)
    return Trained(out.carry[1], out.losses)


@functools.lru_cache(maxsize=8)
def _score_trainer(config: ScoreTraining, schedule: sde.Schedule):
    """(net, optimizer, jitted chunk of steps) for a config; the seed enters as an argument, so
    runs that differ only in their seed share one compilation."""
    net = networks.EpsNet(**config.network())
    return _conditional_trainer(config, net, 1.0,
                                lambda apply, x0, t, noise: dsm_loss(apply, schedule, x0, t, noise))


@functools.lru_cache(maxsize=8)
def _flow_trainer(config: FlowTraining):
    """As `_score_trainer`, with the flow-matching objective (t kept away from both ends)."""
    net = networks.VelocityNet(**config.network())
    return _conditional_trainer(config, net, 1.0 - config.t_min, flow_matching_loss)


def _conditional_trainer(config: ScoreTraining, net, t_max: float, objective):
    """One step of training ``net(x, t, label, thick)`` on ``objective(apply, x0, t, noise)``
    (per-example losses), t ~ U(t_min, t_max), with label and thickness dropout, Adam with cosine
    decay and an EMA of the parameters."""
    optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.steps,
                                                       alpha=0.1))
    b = config.batch_size

    def loss_fn(p, step, key, data):
        x_all, label_all, thick_all = data
        idx = _batch(jax.random.fold_in(key, 1), step, x_all.shape[0], b)
        draws = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, 2), step), 4)
        t = jax.random.uniform(draws[0], (b,), minval=config.t_min, maxval=t_max)
        noise = jax.random.normal(draws[1], (b, data_lib.DIM))
        label = jnp.where(jax.random.bernoulli(draws[2], config.drop_label, (b,)),
                          networks.NULL_LABEL, label_all[idx])
        thick = jnp.where(jax.random.bernoulli(draws[3], config.drop_thick, (b,)),
                          networks.NULL_THICK, thick_all[idx])
        apply = lambda x, tt: net.apply(p, x, tt, label, thick)
        return jnp.mean(objective(apply, x_all[idx], t, noise))

    def one_step(carry, step, key, data):
        p, ema, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, step, key, data)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        # EMA with warm-up so that short runs are not dominated by the initial weights.
        decay = jnp.minimum(config.ema_decay, (1.0 + step) / (10.0 + step))
        ema = jax.tree_util.tree_map(lambda e, q: decay * e + (1.0 - decay) * q, ema, p)
        return (p, ema, opt_state), loss

    return net, optimizer, _chunk(one_step)


def train_classifier(config: ClassifierTraining, train: data_lib.Split) -> Trained:
    """Cross-entropy on noise-augmented clean digits."""
    steps = _check_steps(config.steps)
    net, optimizer, chunk = _classifier_trainer(dataclasses.replace(config, seed=0))
    key = jax.random.PRNGKey(config.seed)
    params = networks.init_params(net, jax.random.fold_in(key, 0))
    data = (jnp.asarray(train.x), jnp.asarray(train.label))
    out = _scan_chunks(chunk, (params, optimizer.init(params)), steps, key, data)
    return Trained(out.carry[0], out.losses)


@functools.lru_cache(maxsize=8)
def _classifier_trainer(config: ClassifierTraining):
    net = networks.Classifier(hidden=tuple(config.hidden))
    optimizer = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    b = config.batch_size

    def loss_fn(p, step, key, data):
        x_all, label_all = data
        idx = _batch(jax.random.fold_in(key, 1), step, x_all.shape[0], b)
        noise = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 2), step),
                                  (b, data_lib.DIM))
        logits, _ = net.apply(p, x_all[idx] + config.noise_std * noise)
        return jnp.mean(cross_entropy(logits, label_all[idx]))

    def one_step(carry, step, key, data):
        p, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(p, step, key, data)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    return net, optimizer, _chunk(one_step)


def _chunk(one_step):
    """jit(carry, step_ids, key, data -> scan of one_step over step_ids)."""
    @jax.jit
    def chunk(carry, step_ids, key, data):
        return jax.lax.scan(lambda c, step: one_step(c, step, key, data), carry, step_ids)

    return chunk


class _Scanned(NamedTuple):
    carry: Any
    losses: list


def _scan_chunks(chunk, carry, steps: int, key, data) -> _Scanned:
    """Runs steps 0..steps-1 in jitted scans of CHUNK steps (the last shorter)."""
    losses = []
    for start in range(0, steps, CHUNK):
        carry, chunk_losses = chunk(carry, jnp.arange(start, min(start + CHUNK, steps)), key,
                                    data)
        losses.append(float(jnp.mean(chunk_losses)))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"training diverged: loss {losses[-1]} at step {start}")
    return _Scanned(carry, losses)


# ---------------------------------------------------------------------------------------------
# Held-out evaluation


def held_out_loss(net: networks.EpsNet, params, test: data_lib.Split, label: bool = False,
                  repeats: int = 8, seed: int = 123, schedule: sde.Schedule = SCHEDULE,
                  t_min: float = 1e-3) -> float:
    """Mean DSM loss on the test split (fixed noise draws), unconditional or class-conditional."""
    x0 = jnp.tile(jnp.asarray(test.x), (repeats, 1))
    n = x0.shape[0]
    k_t, k_noise = jax.random.split(jax.random.PRNGKey(seed))
    t = jax.random.uniform(k_t, (n,), minval=t_min, maxval=1.0)
    noise = jax.random.normal(k_noise, x0.shape)
    labels = jnp.tile(jnp.asarray(test.label), repeats) if label else jnp.full(
        (n,), networks.NULL_LABEL)
    thick = jnp.full((n,), networks.NULL_THICK)
    eps_fn = lambda x, tt: net.apply(params, x, tt, labels, thick)
    return float(jnp.mean(jax.jit(lambda: dsm_loss(eps_fn, schedule, x0, t, noise))()))


def held_out_flow_loss(net: networks.VelocityNet, params, test: data_lib.Split,
                       label: bool = False, repeats: int = 8, seed: int = 123,
                       t_min: float = 1e-3) -> float:
    """Mean flow-matching loss on the test split (fixed draws, t ~ U(t_min, 1 - t_min)),
    unconditional or class-conditional."""
    x0 = jnp.tile(jnp.asarray(test.x), (repeats, 1))
    n = x0.shape[0]
    k_t, k_noise = jax.random.split(jax.random.PRNGKey(seed))
    t = jax.random.uniform(k_t, (n,), minval=t_min, maxval=1.0 - t_min)
    noise = jax.random.normal(k_noise, x0.shape)
    labels = jnp.tile(jnp.asarray(test.label), repeats) if label else jnp.full(
        (n,), networks.NULL_LABEL)
    thick = jnp.full((n,), networks.NULL_THICK)
    velocity_fn = lambda x, tt: net.apply(params, x, tt, labels, thick)
    return float(jnp.mean(jax.jit(lambda: flow_matching_loss(velocity_fn, x0, t, noise))()))


def accuracy(net: networks.Classifier, params, split: data_lib.Split) -> float:
    logits, _ = net.apply(params, jnp.asarray(split.x))
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == split.label))


# ---------------------------------------------------------------------------------------------
# Command line


def _versions() -> dict:
    import flax
    import sklearn

    return {"python": platform.python_version(), "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else "",
            "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "platform": platform.platform(),
            "backend": jax.default_backend()}


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.suites.digits.train",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("score", "classifier", "flow", "all"), default="all")
    parser.add_argument("--steps", type=int, help="training steps of each network trained")
    parser.add_argument("--out", type=pathlib.Path, default=networks.WEIGHTS)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    digits = data_lib.load()
    manifest_path = args.out / networks.MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    command = "python -m experiments.suites.digits.train " + " ".join(sys.argv[1:] if argv is None
                                                                 else argv)
    jobs = {"score": ScoreTraining(), "classifier": ClassifierTraining(), "flow": FlowTraining()}
    for what, config in jobs.items():
        if args.what not in (what, "all"):
            continue
        if args.steps is not None:
            config = dataclasses.replace(config, steps=args.steps)
        start = time.perf_counter()
        if what == "score":
            out = train_score(config, digits.train)
            net = networks.EpsNet(**config.network())
            evaluation = {"test_dsm_loss": held_out_loss(net, out.params, digits.test),
                          "test_dsm_loss_class": held_out_loss(net, out.params, digits.test,
                                                               label=True)}
            path = args.out / networks.SCORE_FILE
        elif what == "flow":
            out = train_flow(config, digits.train)
            net = networks.VelocityNet(**config.network())
            evaluation = {"test_fm_loss": held_out_flow_loss(net, out.params, digits.test),
                          "test_fm_loss_class": held_out_flow_loss(net, out.params, digits.test,
                                                                   label=True)}
            path = args.out / networks.FLOW_FILE
        else:
            out = train_classifier(config, digits.train)
            net = networks.Classifier(hidden=tuple(config.hidden))
            evaluation = {"train_accuracy": accuracy(net, out.params, digits.train),
                          "test_accuracy": accuracy(net, out.params, digits.test)}
            path = args.out / networks.CLASSIFIER_FILE
        networks.save_params(out.params, path)
        seconds = time.perf_counter() - start
        manifest[what] = {"file": path.name, "sha256": sha256(path), "network": config.network(),
                          "training": dataclasses.asdict(config), "seed": config.seed,
                          "final_train_loss": out.losses[-1], "train_losses": out.losses,
                          **evaluation, "seconds": round(seconds, 1), "command": command,
                          "versions": _versions()}
        print(f"{what}: {config.steps} steps in {seconds:.0f} s, final loss {out.losses[-1]:.4f}, "
              f"{evaluation}, {path} ({path.stat().st_size / 1e6:.2f} MB)")
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
