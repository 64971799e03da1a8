"""Scripted experiments and benchmarks: a registry, typed configs, a crash-safe results store,
reports, a demo.

    python -m experiments list [NAME]
    python -m experiments run NAME [key=value ...] [--config FILE] [--seeds 0,1,2] [--out FILE]
    python -m experiments sweep NAME --grid key=v1,v2 ... [--seeds 0-4] [--out results.jsonl]
    python -m experiments report results.jsonl [--out DIR]
    python -m experiments demo [--out DIR] [--quick]
    python -m experiments bench NAME [options] | --all [--readme README.md]

`experiments.harness` holds the machinery, `experiments.suites` the experiments and
`experiments.benchmarks` the benchmarks. From Python: `experiments.get("lgssm")`,
`experiments.register(Experiment(...))`, and `experiments.harness.runner` to run points yourself.
Importing this package does not import JAX.
"""
from experiments.harness.config import ConfigError, param
from experiments.harness.registry import (
    Benchmark,
    Demo,
    Experiment,
    Plan,
    all_experiments,
    get,
    register,
)

__all__ = ["Benchmark", "ConfigError", "Demo", "Experiment", "Plan", "all_experiments", "get",
           "param", "register"]
