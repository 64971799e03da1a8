"""Resampling speed: ours (`smc.resampling`) vs `particles.resampling` vs `blackjax.smc.resampling`.

    python -m experiments bench resampling [--sizes 10000 100000 1000000] [--repeats 7] [--out f.md]

Same log-weights for everyone (standard normal, so lognormal weights); `particles` and blackjax get
the normalised weights they expect, computed outside the timing, while ours starts from the
log-weights. JAX functions are jitted and warmed up once; each time is the median over repeats
taken round-robin across the three libraries, so that load from other processes hits all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import bench_cli, markdown
from experiments.harness.registry import Benchmark, register
from smc import resampling as ours

SCHEMES = ("systematic", "stratified", "multinomial", "residual", "ssp", "killing")


def _particles_impl(name: str) -> Callable[[np.ndarray], np.ndarray] | None:
    try:
        from particles import resampling as rs
    except ImportError:
        return None
    fn = getattr(rs, name, None)
    return None if fn is None else (lambda weights: fn(weights))


def _blackjax_impl(name: str, n: int) -> Callable[[jax.Array, jax.Array], jax.Array] | None:
    try:
        from blackjax.smc import resampling as bj
    except ImportError:
        return None
    fn = getattr(bj, name, None)
    if fn is None:
        return None
    return jax.jit(lambda key, weights: fn(key, weights, n))


def _time(call: Callable[[int], object], repeat: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call(repeat))
    return 1e3 * (time.perf_counter() - start)


def bench(scheme: str, n: int, repeats: int, seed: int = 0) -> dict:
    log_weights = jax.random.normal(jax.random.key(seed), (n,), dtype=jnp.float32)
    weights_np = np.exp(np.asarray(log_weights, dtype=np.float64))
    weights_np /= weights_np.sum()
    weights_jax = jnp.asarray(weights_np, dtype=jnp.float32)
    keys = jax.random.split(jax.random.key(seed + 1), repeats + 1)

    our_fn = ours.get(scheme)
    part_fn = _particles_impl(scheme)
    bj_fn = _blackjax_impl(scheme, n)
    calls: dict[str, Callable[[int], object]] = {"ours": lambda r: our_fn(keys[r], log_weights)}
    if part_fn is not None:
        calls["particles"] = lambda r: part_fn(weights_np)
    if bj_fn is not None:
        calls["blackjax"] = lambda r: bj_fn(keys[r], weights_jax)

    for call in calls.values():  # warm-up: jit compilation, numba compilation
        jax.block_until_ready(call(0))
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(1, repeats + 1):
        for name, call in calls.items():
            times[name].append(_time(call, r))
    row = {"scheme": scheme, "N": n}
    for lib in ("ours", "particles", "blackjax"):
        row[f"{lib}_ms"] = statistics.median(times[lib]) if lib in times else None
    return row


def to_markdown(rows: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    cells = ([row["scheme"], f"{row['N']:.0e}", fmt(row["ours_ms"]), fmt(row["particles_ms"]),
              fmt(row["blackjax_ms"])] for row in rows)
    return markdown.table(("scheme", "N", "ours ms", "particles ms", "blackjax ms"), cells,
                          [False] + [True] * 4)


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)


def run(args: argparse.Namespace) -> str:
    rows = [bench(s, n, args.repeats) for s in args.schemes for n in args.sizes]
    header = f"Resampling, median ms over {args.repeats} repeats ({jax.devices()[0].platform}).\n\n"
    return header + to_markdown(rows)


BENCHMARK = register(Benchmark(
    "resampling", "resampling speed: ours vs particles vs blackjax, every scheme",
    add_options, run, quick=["--sizes", "1000", "--schemes", "systematic", "--repeats", "1"],
    repeats=7))

if __name__ == "__main__":
    sys.exit(bench_cli.main(BENCHMARK))
