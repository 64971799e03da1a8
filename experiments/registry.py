"""The experiments registry: name -> Experiment (description, typed config, run function, demo).

An experiment module builds an `Experiment` and calls `register` at import time:

    register(Experiment(
        name="lgssm",
        description="bootstrap filter on a linear-Gaussian state-space model vs the Kalman filter",
        config_type=LGSSMConfig,             # frozen dataclass of `config.param` fields
        run=run_lgssm,                       # (config, key, mesh=None) -> dict of metrics
        demo=Demo(...),                      # optional: what `python -m experiments demo` runs
    ))

and its module name is added to MODULES below, so the command line (`list`, `run`, `sweep`,
`demo`) finds it. `run` gets the PRNG key from the runner (the seed is not part of the config) and a
`jax.sharding.Mesh` over every device when there are several and the particle count divides; it
should pass the mesh on to `smc.run(..., mesh=mesh)` and otherwise ignore it. Metrics are JSON
values: numbers, strings, bools, or lists of them (traces). Jit the work with
`experiments.timing.jit` (a drop-in for `jax.jit`) and the runner records compile time and run
time apart; cache the jitted function per config (e.g. `functools.lru_cache` on a builder taking
the frozen config and the mesh) and only the first seed of a config compiles.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments.config import ConfigError, suggest

# Modules that register experiments when imported; the demo includes every experiment with a
# `demo`, in this order.
MODULES: list[str] = ["experiments.toys", "experiments.fkc", "experiments.das",
                      "experiments.power_lm", "experiments.digits.experiment"]

RunFn = Callable[..., dict]
PlotFn = Callable[[list, Any], list]


@dataclasses.dataclass(frozen=True)
class Plan:
    """A grid of config values (every combination), seeds for each point, fixed overrides."""

    grid: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)
    seeds: Sequence[int] = (0,)
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Demo:
    """What the demo runs for an experiment: a full plan and a tiny `--quick` one (for tests).

    `columns` are the metrics the demo's table shows (mean ± std over seeds); `x` the config key
    the plots put on the horizontal axis; `plot_metrics` what they show.
    """

    full: Plan
    quick: Plan
    columns: Sequence[str] = ("log_evidence", "exact_log_evidence", "abs_error")
    x: str = "num_particles"
    plot_metrics: Sequence[str] = ("abs_error",)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """name, one-line description, typed config dataclass, run(config, key, mesh=None) -> metrics.

    particles_key names the config field holding the particle count (the runner shards over
    devices when it divides); summary_metrics are the columns `report` shows first; plots are
    extra figures `report` draws, `plots(records, out_dir) -> [paths]`.
    """

    name: str
    description: str
    config_type: type
    run: RunFn
    demo: Demo | None = None
    particles_key: str | None = "num_particles"
    summary_metrics: Sequence[str] = ()
    plots: PlotFn | None = None

    def default_config(self) -> Any:
        return self.config_type()


_REGISTRY: dict[str, Experiment] = {}
_loaded = False


def register(experiment: Experiment, replace: bool = False) -> Experiment:
    """Add `experiment`; registering a taken name is an error unless `replace`."""
    if not dataclasses.is_dataclass(experiment.config_type):
        raise TypeError(f"{experiment.name}: config_type must be a dataclass")
    if experiment.name in _REGISTRY and not replace:
        if _REGISTRY[experiment.name] is experiment:
            return experiment
        raise ValueError(f"an experiment called {experiment.name!r} is already registered")
    _REGISTRY[experiment.name] = experiment
    return experiment


def load(extra_modules: Sequence[str] = ()) -> None:
    """Import MODULES (once) and `extra_modules` (user plugins), which register experiments."""
    global _loaded
    modules = list(extra_modules) + ([] if _loaded else MODULES)
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name or name.startswith(f"{error.name}."):
                raise ConfigError(f"cannot import experiment module {name!r}: {error}") from None
            raise
    _loaded = True


def get(name: str) -> Experiment:
    """The experiment called `name`; ConfigError listing the registered names otherwise."""
    load()
    try:
        return _REGISTRY[name]
    except KeyError:
        names = sorted(_REGISTRY)
        raise ConfigError(f"unknown experiment {name!r}{suggest(name, names)}; registered: "
                          f"{', '.join(names) or '(none)'}") from None


def all_experiments() -> list[Experiment]:
    """Every registered experiment, in registration order."""
    load()
    return list(_REGISTRY.values())
