"""The demo: every registered experiment that has a `Demo`, at its built-in sizes, in one go.

    python -m experiments demo [--out DIR] [--quick] [--only NAME ...]

Each experiment's plan (a grid over particle counts, several seeds) is swept into
DIR/results.jsonl (started afresh unless --resume), then DIR/report.md and the PNG plots are
written and a table per experiment is printed. `--quick` runs the tiny plans (for tests).
"""
from __future__ import annotations

import pathlib
import time
from collections.abc import Sequence

from experiments.harness import console, registry, report, runner
from experiments.harness.config import ConfigError
from experiments.harness.store import ResultStore

DEFAULT_OUT = pathlib.Path("results") / "demo"


def experiments(only: Sequence[str] | None = None) -> list[registry.Experiment]:
    chosen = [e for e in registry.all_experiments() if e.demo is not None]
    if only:
        for name in only:
            registry.get(name)  # a clear error for an unknown name
        chosen = [e for e in chosen if e.name in only]
        if not chosen:
            raise ConfigError(f"none of {', '.join(only)} has a demo")
    return chosen


def run(out_dir: str | None = None, quick: bool = False,
        only: Sequence[str] | None = None, resume: bool = False,
        use_mesh: bool = True) -> int:
    """Run the demo; returns the exit status (0, or 1 if a point failed)."""
    start = time.perf_counter()
    chosen = experiments(only)
    out = pathlib.Path(out_dir) if out_dir else DEFAULT_OUT.with_name(
        DEFAULT_OUT.name + ("-quick" if quick else ""))
    results = out / "results.jsonl"
    plans = [(e, runner.expand_plan(e, e.demo.quick if quick else e.demo.full)) for e in chosen]
    term = console.out()
    failures = 0
    with ResultStore(results) as store:  # refused while another writer holds the file
        if not resume:
            store.clear()  # a fresh demo; --resume keeps (and skips) what is there
        total = sum(len(points) for _, points in plans)
        term.print(f"SMC demo: {', '.join(e.name for e in chosen)}; {total} runs"
                   f"{' (quick sizes)' if quick else ''}; results in {results}")
        with console.SweepProgress(total, "demo") as progress:
            for experiment, points in plans:
                keys = runner.varying_keys(points)
                columns = experiment.demo.columns[:3]
                outcome = runner.sweep(
                    points, store,
                    on_start=lambda p, keys=keys: progress.start(p.label(keys)),
                    on_done=lambda p, r, keys=keys, columns=columns: progress.done(
                        p.label(keys), console.note(r, columns)),
                    on_fail=lambda p, e, keys=keys: progress.fail(p.label(keys), e),
                    use_mesh=use_mesh)
                failures += len(outcome.failures)
                progress.count += outcome.skipped
    written = report.write(results, out, title="SMC demo")
    by_name = {}
    for record in written.contents.records:
        by_name.setdefault(record["experiment"], []).append(record)
    for experiment in chosen:
        records = by_name.get(experiment.name)
        if not records:
            continue
        tab = report.table(records, [*experiment.demo.columns, "run_time_s"], times=False)
        console.print_table(tab, f"{experiment.name}: {experiment.description}", term)
    term.print(f"report: {written.markdown_path}")
    term.print("plots: " + ", ".join(str(p) for p in written.plots), soft_wrap=True)
    term.print(f"demo finished in {time.perf_counter() - start:.1f} s"
               + (f"; {failures} run(s) FAILED" if failures else ""))
    return 1 if failures else 0
