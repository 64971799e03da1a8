"""The command line: `python -m experiments {list,run,sweep,report,demo,bench} ...` (see --help).

Exit status: 0 on success; 1 if a run failed or results could not be read or written; 2 for a
usage error (unknown experiment, bad key or value, bad file); 130 when interrupted. With
--distributed, a process whose peer died is ended by JAX itself (SIGABRT; smc.multihost).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from experiments.harness import config as config_lib
from experiments.harness import registry
from experiments.harness.config import ConfigError
from experiments.harness.store import StoreError

EPILOG = """\
examples:
  python -m experiments list
  python -m experiments list lgssm                      # its config keys, types, defaults
  python -m experiments run lgssm num_particles=4096 resampling=multinomial --seeds 0-4
  python -m experiments sweep lgssm --grid num_particles=256,1024,4096 --seeds 0-9 \\
      --out results/lgssm.jsonl                         # rerun the same command to resume
  python -m experiments report results/lgssm.jsonl --out results/lgssm
  python -m experiments demo
  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\
      python -m experiments sweep lgssm --grid num_particles=4096,16384 --distributed
                                                        # and JAX_PROCESS_ID=1 on the other host
  python -m experiments bench decode --repeats 3       # one benchmark (`bench decode -h`)
  python -m experiments bench --all --readme README.md  # every benchmark, into the README

grid file (TOML or JSON) for `sweep --grid-file`:
  seeds = [0, 1, 2]
  [config]                 # fixed values
  num_steps = 100
  [grid]                   # every combination
  num_particles = [256, 1024]
  resampling = ["systematic", "multinomial"]
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments", description="Run, sweep and report SMC experiments.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        metavar="MODULE", help="import MODULE first (it registers experiments)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="the registered experiments and benchmarks (or one's "
                       "config keys or options)")
    p.add_argument("name", nargs="?", help="show this experiment's config keys (a benchmark's "
                   "options where no experiment has the name; else `bench NAME -h`)")
    p.set_defaults(handler=_list)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("name", help="experiment name (see `list`)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config values")
        p.add_argument("--config", metavar="FILE", help="config values from a TOML/JSON file "
                       "(key = value); key=value arguments override it")
        p.add_argument("--no-mesh", action="store_true",
                       help="do not shard particles over several devices")
        p.add_argument("--distributed", action="store_true",
                       help="one of several processes (hosts) that run the same command as one "
                       "device pool: jax.distributed from JAX_COORDINATOR_ADDRESS, "
                       "JAX_NUM_PROCESSES and JAX_PROCESS_ID (smc.multihost); process 0 alone "
                       "writes and prints")

    p = sub.add_parser("run", help="run one configuration (for one or several seeds)")
    common(p)
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--seeds", help="several seeds: 0,1,2 or 0-9 (replaces --seed)")
    p.add_argument("--out", metavar="FILE", help="also append the records to this results file")
    p.set_defaults(handler=_run)

    p = sub.add_parser("sweep", help="run a grid of configurations into a resumable results file")
    common(p)
    p.add_argument("--grid", action="append", default=[], metavar="key=v1,v2",
                   help="values of one config key (repeat for more keys)")
    p.add_argument("--grid-file", metavar="FILE", help="grid, seeds and fixed config (TOML/JSON)")
    p.add_argument("--seeds", help="seeds of every point: 0,1,2 or 0-9 (default 0)")
    p.add_argument("--out", metavar="FILE", help="results file (default results/NAME.jsonl)")
    p.set_defaults(handler=_sweep)

    p = sub.add_parser("report", help="Markdown tables and PNG plots from a results file")
    p.add_argument("results", help="a results file (JSON lines)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: next to RESULTS)")
    p.add_argument("--x", help="config key on the horizontal axis (default num_particles)")
    p.add_argument("--metric", action="append", help="metric to plot (repeatable)")
    p.set_defaults(handler=_report)

    p = sub.add_parser("demo", help="a short suite on the built-in defaults, with plots")
    p.add_argument("--out", metavar="DIR", help="output folder (default results/demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests)")
    p.add_argument("--only", action="append", metavar="NAME", help="only this experiment")
    p.add_argument("--resume", action="store_true", help="keep and skip finished runs")
    p.add_argument("--no-mesh", action="store_true",
                   help="do not shard particles over several devices")
    p.set_defaults(handler=_demo)

    # Declares nothing: main() hands every argument after `bench` on to _bench, in order.
    p = sub.add_parser("bench", help="run one benchmark (`bench NAME [its options]`), or every "
                       "one (`bench --all [--readme FILE]`)", add_help=False)
    p.set_defaults(handler=_bench)
    return parser


# ---------------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    from experiments.harness import console

    term = console.out()
    if args.name and args.name not in {e.name for e in registry.all_experiments()}:
        from experiments.harness import bench_cli

        bench_cli.parser(registry.get_benchmark(args.name)).print_help()
        return 0
    if args.name:
        experiment = registry.get(args.name)
        from rich import box
        from rich.table import Table

        table = Table(title=f"{experiment.name}: {experiment.description}", box=box.SIMPLE_HEAD,
                      title_justify="left")
        for column in ("key", "type", "default", "meaning [allowed]"):
            table.add_column(column)
        for row in config_lib.describe(experiment.config_type):
            table.add_row(*row)
        term.print(table)
        return 0
    experiments, benchmarks = registry.all_experiments(), registry.all_benchmarks()
    width = max((len(e.name) for e in [*experiments, *benchmarks]), default=0)
    for experiment in experiments:
        print(f"{experiment.name:<{width}}  {experiment.description}")
    if benchmarks:
        print("-- benchmarks: python -m experiments bench NAME [options] (or --all) --")
    for benchmark in benchmarks:
        print(f"{benchmark.name:<{width}}  {benchmark.description}")
    return 0


def _file_values(path: str | None) -> dict[str, Any]:
    return config_lib.load_file(path) if path else {}


def _run(args: argparse.Namespace) -> int:
    from experiments.harness import console, report, runner

    experiment = registry.get(args.name)
    seeds = runner.parse_seeds(args.seeds) if args.seeds else runner.parse_seeds(str(args.seed))
    points = runner.expand(experiment, _file_values(args.config), args.overrides, {}, seeds)
    config = points[0].config
    changed = {k: v for k, v in config_lib.as_dict(config).items()
               if v != getattr(experiment.config_type(), k)}
    term = console.out()
    with runner.writer_store(args.out, points, args.distributed) as (store, _):
        term.print(f"{experiment.name}: " + (" ".join(f"{k}={v}" for k, v in changed.items())
                                            or "defaults") + f"; seeds {_seed_text(seeds)}",
                   soft_wrap=True)
        appended = 0

        def done(point: runner.Point, record: dict) -> None:
            nonlocal appended
            if store is not None:  # saved as soon as it finishes, like a sweep's
                appended += store.append(record)
            progress.done(f"seed={point.seed}", console.note(record, _note_metrics(experiment)))

        with console.SweepProgress(len(points), experiment.name) as progress:
            # No store here: `run` reruns points that are in the file already (done() saves).
            outcome = runner.sweep(
                points, None, on_start=lambda p: progress.start(f"seed={p.seed}"),
                on_done=done, on_fail=lambda p, e: progress.fail(f"seed={p.seed}", e),
                use_mesh=not args.no_mesh, done=(), stop_on_failure=args.distributed)
    if outcome.records:
        metrics = [*report.scalar_metrics(outcome.records), "wall_time_s"]
        tab = report.table(outcome.records, metrics)
        stats = tab.rows[0].stats
        devices = outcome.records[0]["mesh_devices"]
        title = (f"{experiment.name} over {len(outcome.records)} seed(s)"
                 f"{'' if len(outcome.records) == 1 else ' (mean ± std)'}"
                 f"{f'; particles sharded over {devices} devices' if devices > 1 else ''}")
        console.print_metrics(stats, title, term)
    if args.out:
        present = len(outcome.records) - appended
        term.print(f"appended {_plural(appended, 'record')} to {args.out}"
                   + (f"; {present} already there (kept: the file holds one record per "
                      f"config and seed)" if present else ""), soft_wrap=True)
    return 1 if outcome.failures else 0


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _seed_text(seeds: Sequence[int]) -> str:
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(map(str, seeds))


def _note_metrics(experiment: registry.Experiment) -> Sequence[str]:
    if experiment.demo is not None:
        return experiment.demo.columns[:3]
    return experiment.summary_metrics[:3]


def _grid_args(items: Sequence[str]) -> dict[str, list[str]]:
    grid: dict[str, list[str]] = {}
    for item in items:
        key, values = config_lib.split_override(item)
        parts = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in parts):
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,... with no empty value")
        grid[key] = parts
    return grid


def _grid_file(path: str | None) -> tuple[dict, dict, list | None]:
    if not path:
        return {}, {}, None
    data = config_lib.load_file(path)
    unknown = set(data) - {"grid", "seeds", "config"}
    if unknown:
        raise ConfigError(f"grid file {path!r}: unknown section(s) {sorted(unknown)}; "
                          f"expected grid, seeds, config")
    grid = data.get("grid", {})
    fixed = data.get("config", {})
    if not isinstance(grid, dict) or not isinstance(fixed, dict):
        raise ConfigError(f"grid file {path!r}: grid and config must be tables")
    grid = {k: (list(v) if isinstance(v, list) else [v]) for k, v in grid.items()}
    seeds = data.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ConfigError(f"grid file {path!r}: seeds must be a list of integers")
    return grid, fixed, seeds


def _sweep(args: argparse.Namespace) -> int:
    from experiments.harness import console, report, runner

    experiment = registry.get(args.name)
    grid, fixed, file_seeds = _grid_file(args.grid_file)
    fixed = {**fixed, **_file_values(args.config)}
    grid.update(_grid_args(args.grid))
    seeds = runner.parse_seeds(args.seeds) if args.seeds else (file_seeds or [0])
    points = runner.expand(experiment, fixed, args.overrides, grid, seeds)
    out = pathlib.Path(args.out or pathlib.Path("results") / f"{experiment.name}.jsonl")
    with runner.writer_store(out, points, args.distributed) as (store, done):
        remaining = sum(p.id not in done for p in points)
        term = console.out()
        configs = len({p.id for p in points}) // max(len(seeds), 1)
        term.print(f"sweep {experiment.name}: {len(points)} points ({configs} configs x "
                   f"{len(seeds)} seeds) into {out}; {len(points) - remaining} already done, "
                   f"{remaining} to run", soft_wrap=True)
        keys = runner.varying_keys(points)
        start = time.perf_counter()
        with console.SweepProgress(remaining, experiment.name) as progress:
            outcome = runner.sweep(
                points, store, on_start=lambda p: progress.start(p.label(keys)),
                on_done=lambda p, r: progress.done(p.label(keys),
                                                   console.note(r, _note_metrics(experiment))),
                on_fail=lambda p, e: progress.fail(p.label(keys), e),
                use_mesh=not args.no_mesh, done=done, stop_on_failure=args.distributed)
        wanted = {p.id for p in points}
        records = [r for r in store.records() if r.get("id") in wanted] if store else []
    if records:
        console.print_table(report.table(records), f"{experiment.name} (mean ± std over seeds)",
                            term)
    term.print(f"{len(outcome.records)} run, {outcome.skipped} skipped (already in {out}), "
               f"{len(outcome.failures)} failed; {time.perf_counter() - start:.1f} s")
    if outcome.failures:
        term.print(("a distributed sweep stops at its first failure (its processes must run "
                    "the same points in step); " if args.distributed else "")
                   + "rerun the same command to retry the failed points")
    return 1 if outcome.failures else 0


def _report(args: argparse.Namespace) -> int:
    from experiments.harness import console, report

    written = report.write(args.results, args.out, x=args.x, metrics=args.metric)
    term = console.out()
    for note in written.notes:
        term.print(f"note: {args.results}: {note}", soft_wrap=True)
    for tab in written.tables:
        console.print_table(tab, f"{tab.experiment} (mean ± std over seeds)", term)
    term.print(f"report: {written.markdown_path}")
    for path in written.plots:
        term.print(f"plot: {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from experiments.harness import demo

    return demo.run(args.out, quick=args.quick, only=args.only, resume=args.resume,
                    use_mesh=not args.no_mesh)


def _bench(args: argparse.Namespace) -> int:
    from experiments.harness import bench_cli

    first, rest = (args.options[0], args.options[1:]) if args.options else ("", [])
    if first == "--all":
        bench_cli.run_all(rest)
        return 0
    if first and not first.startswith("-"):
        return bench_cli.main(registry.get_benchmark(first), rest)
    names = ", ".join(b.name for b in registry.all_benchmarks())
    text = (f"usage: python -m experiments bench NAME [its options] | --all [options]\n"
            f"benchmarks: {names}; `bench NAME -h` lists its options, `bench --all -h` those "
            f"of --all")
    if first in ("-h", "--help"):
        print(text)
        return 0
    raise ConfigError(text)


def _join_processes() -> bool:
    """`--distributed`: join the other processes before anything touches a JAX device (the
    experiments' modules included); True in the processes that stay silent (all but 0)."""
    import smc.multihost

    try:
        smc.multihost.initialize()
    except (ValueError, TypeError) as error:
        raise ConfigError(f"--distributed: {error}") from None
    return not smc.multihost.is_writer()


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """No output from this process (a process other than 0 of a distributed run): process 0
    prints the same progress and tables. Errors are still printed, by main(), and so are JAX's
    own messages on stderr (a peer that died). Standard output is closed at the descriptor too:
    the collectives library prints connection notes there."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            os.dup2(sink.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, options = parser.parse_known_args(argv)
    if options and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(options)}")
    args.options = options
    try:
        quiet = _join_processes() if getattr(args, "distributed", False) else False
        registry.load(args.imports)
        with _silenced() if quiet else contextlib.nullcontext():
            return args.handler(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except StoreError as error:
        print(f"error: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every finished point is saved; rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
