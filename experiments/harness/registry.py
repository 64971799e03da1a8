"""The registry: name -> Experiment (description, typed config, run function, demo) or Benchmark
(description, its command-line options, its work).

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
`experiments.harness.timing.jit` (a drop-in for `jax.jit`) and the runner records compile time
and run time apart; cache the jitted function per config (e.g. `functools.lru_cache` on a builder
taking the frozen config and the mesh) and only the first seed of a config compiles.

A benchmark module registers a `Benchmark` the same way:

    register(Benchmark(
        name="resampling",
        description="resampling speed: ours vs particles vs blackjax",
        options=add_options,                 # (argparse parser) -> None: its own options only
        run=run,                             # (parsed args) -> Markdown: caption and table
        quick=["--sizes", "1000"],           # the argv of `--quick` (a smoke test)
        repeats=7,                           # default of the shared --repeats (None: none)
    ))

`python -m experiments bench NAME` adds the options every benchmark shares (--repeats, --quick,
--out) and the "Command: ..." caption (`experiments.harness.bench_cli`). Names are unique within
each kind: the experiment `tempering` (`run tempering`) and the benchmark `tempering` (`bench
tempering`) are two entries.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments.harness.config import ConfigError, suggest

# Modules that register experiments and benchmarks when imported; the demo includes every
# experiment with a `demo`, and `bench --all` every benchmark, in this order.
MODULES: list[str] = ["experiments.suites.toys", "experiments.suites.fkc",
                      "experiments.suites.das", "experiments.suites.lm",
                      "experiments.suites.answers",
                      "experiments.suites.digits.experiment",
                      "experiments.benchmarks.resampling", "experiments.benchmarks.tempering",
                      "experiments.benchmarks.overhead", "experiments.benchmarks.fkc",
                      "experiments.benchmarks.power", "experiments.benchmarks.decode",
                      "experiments.benchmarks.prompt_cache", "experiments.benchmarks.sampling",
                      "experiments.benchmarks.constraints", "experiments.benchmarks.genlm"]

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


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """name, one-line description, options(parser) adding its own command-line options, and
    run(args) -> Markdown (caption and table; the harness adds the "Command: ..." line).

    quick is the argv that `--quick` puts first (tiny sizes: a smoke test, numbers meaningless);
    repeats the default of the shared `--repeats` option, None for a benchmark without it.
    """

    name: str
    description: str
    options: Callable[[Any], None]
    run: Callable[[Any], str]
    quick: Sequence[str] = ()
    repeats: int | None = None


Entry = Experiment | Benchmark

_REGISTRY: dict[tuple[type, str], Entry] = {}
_loaded = False


def register(entry: Entry, replace: bool = False) -> Entry:
    """Add an experiment or benchmark; registering a taken name is an error unless `replace`."""
    if isinstance(entry, Experiment) and not dataclasses.is_dataclass(entry.config_type):
        raise TypeError(f"{entry.name}: config_type must be a dataclass")
    slot = (type(entry), entry.name)
    if slot in _REGISTRY and not replace:
        if _REGISTRY[slot] is entry:
            return entry
        raise ValueError(f"{_LABELS[type(entry)]} called {entry.name!r} is already registered")
    _REGISTRY[slot] = entry
    return entry


FIRST_PARTY = ("experiments", "smc", "proposals", "targets")


def load(extra_modules: Sequence[str] = ()) -> None:
    """Import MODULES (once) and `extra_modules` (user plugins), which register entries.

    A plugin that cannot be imported, for whatever reason, is a ConfigError naming it, the error
    and where it arose; a built-in module's failure is a bug and propagates as it is.
    """
    global _loaded
    for name in extra_modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001 - any failure of a plugin is reported
            raise ConfigError(f"cannot import experiment module {name!r}: "
                              f"{_import_failure(error)}") from None
    for name in [] if _loaded else MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name == name or name.startswith(f"{error.name}."):
                raise ConfigError(f"cannot import experiment module {name!r}: {error}") from None
            if (error.name or "").split(".")[0] not in FIRST_PARTY:
                raise ConfigError(f"the experiments need the '{error.name}' package: "
                                  f"pip install 'smc-scaling[experiments]'") from None
            raise
    _loaded = True


def _import_failure(error: Exception) -> str:
    """'Type: message (file, line n)', located in the innermost frame of the plugin's own code."""
    if isinstance(error, SyntaxError):
        where = (error.filename, error.lineno)
        return f"{type(error).__name__}: {error.msg} ({where[0]}, line {where[1]})"
    machinery = (__file__, os.path.dirname(importlib.__file__))
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if not f.filename.startswith(("<frozen", *machinery))]
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text + (f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else "")


def _entries(kind: type) -> list:
    load()
    return [entry for entry in _REGISTRY.values() if isinstance(entry, kind)]


_LABELS = {Experiment: "an experiment", Benchmark: "a benchmark"}
_COMMANDS = {Experiment: "run", Benchmark: "bench"}


def _get(name: str, kind: type) -> Any:
    load()
    if (kind, name) in _REGISTRY:
        return _REGISTRY[kind, name]
    label = _LABELS[kind].split()[1]
    other = next((k for k in _LABELS if k is not kind and (k, name) in _REGISTRY), None)
    if other is not None:
        raise ConfigError(f"{name!r} is {_LABELS[other]}, not {_LABELS[kind]}: "
                          f"`python -m experiments {_COMMANDS[other]} {name}`")
    names = sorted(e.name for e in _entries(kind))
    raise ConfigError(f"unknown {label} {name!r}{suggest(name, names)}; registered: "
                      f"{', '.join(names) or '(none)'}")


def get(name: str) -> Experiment:
    """The experiment called `name`; ConfigError listing the registered names otherwise."""
    return _get(name, Experiment)


def get_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`; ConfigError listing the registered names otherwise."""
    return _get(name, Benchmark)


def all_experiments() -> list[Experiment]:
    """Every registered experiment, in registration order."""
    return _entries(Experiment)


def all_benchmarks() -> list[Benchmark]:
    """Every registered benchmark, in registration order."""
    return _entries(Benchmark)
