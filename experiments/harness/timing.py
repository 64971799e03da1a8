"""Compile time apart from run time: `timing.jit(fn)` compiles ahead of time, and times both.

    program = timing.jit(lambda key: smc.run(key, model, n))
    with timing.measure() as clock:
        out = program(key)          # first call per input shape: lower + compile, then run
    clock.compile_s, clock.run_s

The first call for given argument shapes runs `jax.jit(fn).lower(*args).compile()` (timed as
compile time), every call runs the compiled executable and waits for its outputs (timed as run
time). Times add up into the innermost active `measure()`; with none active they are dropped. A
`jit` object kept across calls (e.g. cached per config) compiles once, so later seeds of the same
config report a compile time of zero.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax


@dataclasses.dataclass
class Clock:
    compile_s: float = 0.0
    run_s: float = 0.0
    compiles: int = 0


_active: contextvars.ContextVar[Clock | None] = contextvars.ContextVar("clock", default=None)


@contextlib.contextmanager
def measure() -> Iterator[Clock]:
    """Collect the compile and run times of every `timing.jit` call made inside."""
    clock = Clock()
    token = _active.set(clock)
    try:
        yield clock
    finally:
        _active.reset(token)


def _signature(args: Any) -> Any:
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((getattr(x, "shape", None), str(getattr(x, "dtype", type(x))))
                       for x in leaves)


class jit:
    """jax.jit(fn, **options), compiled ahead of time per argument signature and timed."""

    def __init__(self, fn: Callable, **options: Any):
        self._jitted = jax.jit(fn, **options)
        self._compiled: dict[Any, Any] = {}

    def __call__(self, *args: Any) -> Any:
        clock = _active.get()
        signature = _signature(args)
        compiled = self._compiled.get(signature)
        if compiled is None:
            start = time.perf_counter()
            compiled = self._jitted.lower(*args).compile()
            self._compiled[signature] = compiled
            if clock is not None:
                clock.compile_s += time.perf_counter() - start
                clock.compiles += 1
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if clock is not None:
            clock.run_s += time.perf_counter() - start
        return out
