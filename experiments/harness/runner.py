"""Running experiments: one point (config + seed) to a record; a grid of points into a store.

A record is what one line of a results file holds:

    {"id": "<16 hex>", "experiment": "lgssm", "config": {...}, "seed": 0, "metrics": {...},
     "wall_time_s": ..., "compile_time_s": ..., "run_time_s": ..., "mesh_devices": 1,
     "device": {"platform": "cpu", "kind": "cpu", "count": 1, "processes": 1}, "versions": {...},
     "git": "<commit or null>", "host": "...", "finished_at": "2025-...Z"}

When JAX sees several devices and the particle count divides, the runner hands the experiment a
`Mesh(jax.devices(), ("particles",))`, so particles are sharded with no change to its code.

Several processes (`--distributed`, `smc.multihost`): every process runs every point, on a mesh
over all their devices (`device.count` counts them all, `device.processes` the processes);
process 0 alone holds the results file, and its ids decide for all which points are done
(`writer_store`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import itertools
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any, NamedTuple

from experiments.harness import config as config_lib
from experiments.harness import timing
from experiments.harness.registry import Experiment, Plan
from experiments.harness.store import ResultStore, StoreError, point_id

MAX_SEED = 2**32 - 1
MAX_SEEDS = 100_000  # seeds one --seeds may name (each is a run)


class Point(NamedTuple):
    """One unit of work: a validated config and a seed; `id` identifies its record."""

    experiment: Experiment
    config: Any
    seed: int
    id: str

    def label(self, keys: Sequence[str] = ()) -> str:
        values = config_lib.as_dict(self.config)
        shown = " ".join(f"{k}={values[k]}" for k in keys)
        return f"{self.experiment.name} {shown} seed={self.seed}".replace("  ", " ")


def make_point(experiment: Experiment, config: Any, seed: int) -> Point:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise config_lib.ConfigError(f"seed={seed!r} is out of range: must be an int in "
                                     f"[0, {MAX_SEED}]")
    return Point(experiment, config, seed,
                 point_id(experiment.name, config_lib.as_dict(config), seed))


def expand(experiment: Experiment, base: Mapping[str, Any] | None = None,
           overrides: Sequence[str] = (), grid: Mapping[str, Sequence[Any]] | None = None,
           seeds: Sequence[int] = (0,)) -> list[Point]:
    """Every combination of `grid` values (seeds innermost), each validated before any runs.

    base: typed values (a config file's); overrides: 'key=value' strings; grid: key -> values,
    each a typed value or a string to parse. Duplicate points are dropped.
    """
    specs = config_lib.fields(experiment.config_type)
    grid = dict(grid or {})
    for key, values in grid.items():
        if key not in specs:
            raise config_lib.unknown_key(experiment.config_type, key, experiment.name)
        if not values:
            raise config_lib.ConfigError(f"grid key {key!r} has no values")
    for text in overrides:
        key, _ = config_lib.split_override(text)
        if key in grid:
            raise config_lib.ConfigError(f"{key!r} is given both as a fixed value ({text}) and as "
                                         f"a grid key; drop one of them")
    seeds = list(seeds)
    if not seeds:
        raise config_lib.ConfigError("no seeds given")
    points, seen = [], set()
    for combo in itertools.product(*grid.values()):
        values = dict(base or {})
        grid_overrides = []
        for key, value in zip(grid, combo):
            if isinstance(value, str):
                grid_overrides.append(f"{key}={value}")
            else:
                values[key] = value
        config = config_lib.build(experiment.config_type, values,
                                  list(overrides) + grid_overrides, experiment.name)
        for seed in seeds:
            point = make_point(experiment, config, seed)
            if point.id not in seen:
                seen.add(point.id)
                points.append(point)
    return points


def expand_plan(experiment: Experiment, plan: Plan) -> list[Point]:
    return expand(experiment, base=dict(plan.overrides), grid=dict(plan.grid), seeds=plan.seeds)


def varying_keys(points: Iterable[Point]) -> list[str]:
    """Config keys whose value differs between points (in declaration order)."""
    dicts = [config_lib.as_dict(p.config) for p in points]
    if not dicts:
        return []
    return [k for k in dicts[0] if len({config_lib.canonical(d[k]) for d in dicts}) > 1]


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Package versions, device, git commit and host: the same for every record of a process."""
    import jax

    devices = jax.devices()
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": {"python": platform.python_version(),
                     **{name: _version(name) for name in ("jax", "jaxlib", "numpy",
                                                         "smc-scaling")}},
        "device": {"platform": jax.default_backend(), "kind": devices[0].device_kind,
                   "count": len(devices), "processes": jax.process_count()},
        "git": commit,
        "host": platform.node(),
    }


@functools.lru_cache(maxsize=1)
def _all_devices_mesh():
    import jax
    import numpy as np
    from jax.sharding import Mesh

    return Mesh(np.array(jax.devices()), ("particles",))


def auto_mesh(experiment: Experiment, config: Any, enabled: bool = True):
    """A mesh over every device along "particles" when there are several and N divides, or None."""
    import jax

    if not enabled or experiment.particles_key is None or jax.device_count() < 2:
        return None
    n = getattr(config, experiment.particles_key, None)
    if not isinstance(n, int) or n % jax.device_count():
        return None
    return _all_devices_mesh()


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Metrics as plain JSON values (numpy/JAX scalars and arrays become numbers and lists)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "tolist"):  # numpy or JAX arrays and scalars
        return _jsonable(value.tolist())
    raise TypeError(f"metric value {value!r} of type {type(value).__name__} is not JSON")


def run_point(point: Point, use_mesh: bool = True) -> dict[str, Any]:
    """Run one point and return its record (see the module docstring)."""
    import jax

    mesh = auto_mesh(point.experiment, point.config, use_mesh)
    start = time.perf_counter()
    with timing.measure() as clock:
        metrics = point.experiment.run(point.config, jax.random.PRNGKey(point.seed), mesh=mesh)
    wall = time.perf_counter() - start
    if not isinstance(metrics, Mapping):
        raise TypeError(f"{point.experiment.name}.run must return a dict of metrics, got "
                        f"{type(metrics).__name__}")
    timed = clock.compiles > 0 or clock.run_s > 0
    env = environment()
    return {
        "id": point.id,
        "experiment": point.experiment.name,
        "config": config_lib.as_dict(point.config),
        "seed": point.seed,
        "metrics": _jsonable(metrics),
        "wall_time_s": round(wall, 6),
        # Without timing.jit inside the experiment, compile time is unknown and run = wall time.
        "compile_time_s": round(clock.compile_s, 6) if timed else None,
        "run_time_s": round(clock.run_s if timed else wall, 6),
        "mesh_devices": 1 if mesh is None else int(math.prod(mesh.devices.shape)),
        **env,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds").replace("+00:00", "Z"),
    }


@dataclasses.dataclass
class SweepOutcome:
    records: list[dict]            # records finished by this call
    skipped: int                   # points already in the store
    failures: list[tuple[Point, BaseException]]


def sweep(points: Sequence[Point], store: ResultStore | None,
          on_start: Callable[[Point], None] = lambda p: None,
          on_done: Callable[[Point, dict], None] = lambda p, r: None,
          on_fail: Callable[[Point, BaseException], None] = lambda p, e: None,
          use_mesh: bool = True, done: Collection[str] | None = None,
          stop_on_failure: bool = False) -> SweepOutcome:
    """Run every point not yet in `store`, appending each record as soon as it finishes.

    A point that raises is reported through `on_fail` and the sweep goes on (with
    `stop_on_failure`, it stops there); KeyboardInterrupt stops it (every finished point is
    already saved). done: ids to skip (default: the store's; see `shared_done` for several
    processes, where only process 0 has a store).
    """
    done = (store.ids if store is not None else set()) if done is None else set(done)
    todo = [p for p in points if p.id not in done]
    outcome = SweepOutcome([], len(points) - len(todo), [])
    for point in todo:
        on_start(point)
        try:
            record = run_point(point, use_mesh)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # noqa: BLE001 - reported, the sweep goes on
            outcome.failures.append((point, error))
            on_fail(point, error)
            if stop_on_failure:
                break
            continue
        if store is not None and not store.append(record):
            outcome.skipped += 1  # already there: another record of this point was kept
            continue
        outcome.records.append(record)
        on_done(point, record)
    return outcome


# ---------------------------------------------------------------------------------------------
# Several processes (`--distributed`): every process computes, process 0 alone writes
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def writer_store(path: str | os.PathLike | None, points: Sequence[Point],
                 distributed: bool = False) -> Iterator[tuple[ResultStore | None, set[str]]]:
    """(store, ids of `points` already done) for a results file at `path` (None: no file).

    With several processes only process 0 opens the file (others may not even see it), and
    `shared_done` hands its ids to all, so every process skips the same points and they run the
    rest in the same order. A file process 0 cannot open fails every process, not just it.
    """
    if not distributed:
        with ResultStore(path) if path else contextlib.nullcontext() as store:
            yield store, (store.ids if store is not None else set())
        return
    import jax

    store, failure = None, None
    if path and jax.process_index() == 0:
        try:
            store = ResultStore(path)
        except StoreError as error:
            failure = error
    try:
        done = shared_done(points, store, failed=failure is not None)
        if failure is not None:
            raise failure
        yield store, done
    finally:
        if store is not None:
            store.close()


def shared_done(points: Sequence[Point], store: ResultStore | None,
                failed: bool = False) -> set[str]:
    """Ids of `points` in process 0's `store`, the same set in every process.

    Process 0 broadcasts (`jax.experimental.multihost_utils`) whether it has its store, then
    which points are done; in between every process checks that all hold the same points, so
    processes started with other command lines all stop with a ConfigError instead of running
    out of step. `failed`: process 0 could not open its store (every process raises StoreError).
    """
    import numpy as np
    from jax.experimental import multihost_utils

    if not multihost_utils.broadcast_one_to_all(np.array([0 if failed else 1], np.int32))[0]:
        raise StoreError(errno.EIO, "process 0 cannot open the results file (see its error)")
    ids = [p.id for p in points]
    # 28 bits of a hash of the ids: an int32, the widest integer JAX keeps without x64.
    fingerprint = int(hashlib.sha256(",".join(ids).encode()).hexdigest()[:7], 16)
    try:
        multihost_utils.assert_equal(np.array([len(ids), fingerprint], np.int32))
    except AssertionError:
        raise config_lib.ConfigError(
            "the processes of this distributed run hold different points (configs or seeds): "
            "every process must run the same command") from None
    in_store = store.ids if store is not None else set()
    mask = multihost_utils.broadcast_one_to_all(np.array([i in in_store for i in ids], np.int32))
    return {i for i, flag in zip(ids, mask) if flag}


def parse_seeds(text: str) -> list[int]:
    """--seeds '0,1,2' or '0-9' or '0-4,10' -> seeds (ConfigError on anything else).

    At most MAX_SEEDS per command, counted before any list is built: '0-99999999' is refused
    at once instead of filling memory.
    """
    parts: list[tuple[int, int]] = []  # inclusive ranges
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                low, high = (int(v) for v in part.split("-", 1))
            else:
                low = high = int(part)
        except ValueError:
            raise config_lib.ConfigError(f"seeds={text!r}: expected integers like 0,1,2 or a "
                                         f"range like 0-9") from None
        for seed in (low, high):
            if not 0 <= seed <= MAX_SEED:
                raise config_lib.ConfigError(f"seed={seed} is out of range: must be in "
                                             f"[0, {MAX_SEED}]")
        if high < low:
            raise config_lib.ConfigError(f"--seeds {text!r}: the range {part} is empty (write "
                                         f"the lower seed first)")
        parts.append((low, high))
    count = sum(high - low + 1 for low, high in parts)
    if count > MAX_SEEDS:
        raise config_lib.ConfigError(
            f"--seeds {text!r} names {count:,} seeds; at most {MAX_SEEDS:,} per command: split "
            f"them over several commands (a sweep into the same --out file adds to it)")
    seeds = (seed for low, high in parts for seed in range(low, high + 1))
    return list(dict.fromkeys(seeds))
