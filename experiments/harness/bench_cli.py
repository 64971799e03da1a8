"""The benchmarks' command line: the options they share, one run, and every benchmark in one go.

    python -m experiments bench NAME [its options] [--repeats N] [--quick] [--out FILE]
    python -m experiments bench --all [--readme README.md] [--out FILE] [--only NAME ...] [--quick]

A benchmark (`registry.Benchmark`) declares only its own options and its work; this module adds
the shared options (--repeats where the benchmark has a default for it; --quick, which puts the
benchmark's tiny argv first: a smoke test, numbers meaningless; --out, which also writes the
Markdown to a file), puts the "Command: ..." line above the benchmark's caption, and ends a run
with the machine line. `--all` runs every registered benchmark and prints every table; `--out`
also writes them to FILE; `--readme` replaces the block between `<!-- benchmarks:start -->` and
`<!-- benchmarks:end -->` in that file with the tables and the machine line (with the date).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
from collections.abc import Sequence

from experiments.harness import markdown, registry
from experiments.harness.registry import Benchmark

START = "<!-- benchmarks:start -->"
END = "<!-- benchmarks:end -->"
COMMAND = "python -m experiments bench"


def parser(benchmark: Benchmark) -> argparse.ArgumentParser:
    """The benchmark's own options, then the shared ones."""
    parser = argparse.ArgumentParser(prog=f"{COMMAND} {benchmark.name}",
                                     description=benchmark.description)
    benchmark.options(parser)
    if benchmark.repeats is not None:
        parser.add_argument("--repeats", type=int, default=benchmark.repeats,
                            help="timed repeats (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, a smoke test (numbers meaningless): "
                             + (" ".join(benchmark.quick) or "the defaults"))
    parser.add_argument("--out", type=str, default=None, help="also write the Markdown here")
    return parser


def run(benchmark: Benchmark, argv: Sequence[str] = ()) -> str:
    """Runs `benchmark` with the options `argv`; prints and returns its Markdown (the command,
    then the benchmark's caption and table) and with --out also writes it to that file."""
    argv = list(argv)
    args = parser(benchmark).parse_args(argv)
    if args.quick:  # the options given override the quick ones
        args = parser(benchmark).parse_args([*benchmark.quick, *argv])
    command = " ".join([COMMAND, benchmark.name, *argv])
    return markdown.emit(f"Command: `{command}`.\n\n" + benchmark.run(args), args.out)


def main(benchmark: Benchmark, argv: Sequence[str] | None = None) -> int:
    """`python -m experiments bench NAME ...` (and `python -m experiments.benchmarks.NAME`)."""
    run(benchmark, sys.argv[1:] if argv is None else argv)
    print("\n" + machine_line())
    return 0


def machine_line(today: datetime.date | None = None) -> str:
    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    today = today or datetime.date.today()
    return (f"Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs; Python {platform.python_version()}, jax {version('jax')}, "
            f"blackjax {version('blackjax')}, particles {version('particles')}; "
            f"{today.isoformat()}.")


def replace_block(text: str, block: str) -> str:
    """`text` with everything between the START and END markers replaced by `block`."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"markers {START} ... {END} not found (in this order)")
    return text[:start + len(START)] + "\n" + block.strip("\n") + "\n" + text[end:]


def run_all(argv: Sequence[str] | None = None) -> str:
    """`bench --all [argv]`: every registered benchmark in turn; returns the Markdown block."""
    argv = sys.argv[1:] if argv is None else list(argv)
    names = [benchmark.name for benchmark in registry.all_benchmarks()]
    parser = argparse.ArgumentParser(prog=f"{COMMAND} --all",
                                     description="Every benchmark, one after the other.")
    parser.add_argument("--out", type=str, default=None, help="write all tables to this file")
    parser.add_argument("--readme", type=str, default=None,
                        help="replace the benchmarks block of this file")
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)

    sections = []
    for name in args.only:
        text = run(registry.get_benchmark(name), ["--quick"] if args.quick else [])
        print(flush=True)
        sections.append(text.strip("\n"))
    command = " ".join([COMMAND, "--all", *argv])
    block = "\n\n".join([f"Made by `{command}`.", *sections, machine_line()]) + "\n"
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(block)
    if args.readme:
        with open(args.readme) as handle:
            text = handle.read()
        with open(args.readme, "w") as handle:
            handle.write(replace_block(text, block))
    print(machine_line())
    return block
