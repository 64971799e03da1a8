"""The harness: the registry of experiments and benchmarks, typed configs, the runner, the
crash-safe results store, reports, the console, the demo and the command lines
(`cli`: `python -m experiments ...`; `bench_cli`: the options every benchmark shares).

Suites (`experiments.suites`) and benchmarks (`experiments.benchmarks`) import the harness; the
harness imports them only by name, through `registry.MODULES`.
"""
