"""All benchmarks in one run: resampling, adaptive tempering vs blackjax, SMC overhead.

    python -m experiments.benchmarks [--out FILE] [--readme README.md] [--only NAME ...] [--quick]

Prints every Markdown table; `--out` also writes them to FILE; `--readme` replaces the block
between `<!-- benchmarks:start -->` and `<!-- benchmarks:end -->` in that file with the tables
and a line giving the machine and the date. `--quick` runs tiny sizes (a smoke test; numbers
meaningless).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import io
import os
import platform
import sys

START = "<!-- benchmarks:start -->"
END = "<!-- benchmarks:end -->"

# name -> (module, default argv, quick argv)
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "resampling": ("experiments.bench_resampling", [],
                   ["--sizes", "1000", "--schemes", "systematic", "--repeats", "1"]),
    "tempering": ("experiments.bench_tempering", [],
                  ["--sizes", "64", "--replicates", "2", "--dim", "3", "--target-ess", "0.5"]),
    "overhead": ("experiments.bench_overhead", [],
                 ["--particles", "64", "--steps", "5", "--dim", "8", "--repeats", "1"]),
    "fkc": ("experiments.bench_fkc", [],
            ["--sizes", "64", "--steps", "5", "--repeats", "1", "--thresholds", "1.0"]),
    "power": ("experiments.bench_power", [],
              ["--prompts", "1", "--particles", "2", "--tokens", "2", "--mh-block", "1",
               "--mh-steps", "1", "--repeats", "1"]),
    "decode": ("experiments.bench_decode", [],
               ["--batches", "1", "2", "--new-tokens", "3", "--repeats", "1", "--threads", "1",
                "--scan-layers", "--in-process"]),
}


def run_bench(module_name: str, argv: list[str]) -> str:
    """Runs `module.main(argv)` and returns its Markdown (captions and table).

    A `main` that returns the text is used as is; one that returns something else (e.g. rows)
    has its printed output used instead. Printed output is echoed either way.
    """
    module = importlib.import_module(module_name)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = module.main(list(argv))
    printed = buffer.getvalue()
    text = result if isinstance(result, str) else printed
    command = " ".join(["python -m", module_name, *argv])
    if command not in text:  # every table names the command that made it
        text = f"Command: `{command}`.\n\n" + text
    return text


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


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default=None, help="write all tables to this file")
    parser.add_argument("--readme", type=str, default=None,
                        help="replace the benchmarks block of this file")
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    args = parser.parse_args(argv)

    sections = []
    for name in args.only:
        module_name, default_argv, quick_argv = BENCHES[name]
        text = run_bench(module_name, quick_argv if args.quick else default_argv)
        print(text, end="\n", flush=True)
        sections.append(text.strip("\n"))
    command = " ".join(["python -m experiments.benchmarks", *argv])
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


if __name__ == "__main__":
    main()
