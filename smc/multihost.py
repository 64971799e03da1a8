"""Several processes (hosts) as one device pool: `jax.distributed` with bounded failure detection.

    import smc.multihost
    smc.multihost.initialize()               # before anything touches JAX devices
    mesh = smc.multihost.global_mesh()       # every process's devices along "particles"
    result = smc.run(key, model, N, mesh=mesh)
    if smc.multihost.is_writer(): save(result)

Every process runs the same program on the same key (SPMD); XLA moves particles between hosts
at resampling. Settings come from the arguments or from the environment variables
JAX_COORDINATOR_ADDRESS ("host:port" of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID; with
none of the three given anywhere, JAX's own cluster detection (Cloud TPU, Slurm, Open MPI,
Kubernetes) fills them in.

Failure detection (the reason for this module rather than a bare `jax.distributed.initialize`).
JAX's defaults leave a survivor waiting 100 s for a dead peer, and an alive but stuck peer (a
deadlock, a process far behind) blocks a CPU collective for XLA's own collective timeout. Here:
- `timeout_s` (default 60 s) is the heartbeat timeout of the coordination service: when a
  process dies, the others are terminated within about `timeout_s` (two local processes: 5.2-5.4 s
  at timeout_s=5, 7.6-10.2 s at 10) with JAX's message "Terminating process because the JAX
  distributed service detected fatal errors. This most likely indicates that another task died"
  (SIGABRT: a non-zero exit status). When process 0 (the coordinator) dies the others stop at
  once (0.2 s). Heartbeats come from a background thread, so a long compilation or step does not
  trip it; 60 s rides out a loaded machine or a network hiccup and still frees a crashed sweep's
  hosts within about a minute.
- `collective_timeout_s` (default 600 s; CPU backend only: XLA's gloo collectives) bounds how
  long a process waits inside one collective for a peer that is alive but does not arrive; it
  raises a JaxRuntimeError ("Timed out waiting ... for recv operation"). It must exceed the
  largest legitimate lag between processes, a difference in compile times (a language model on
  one host missing the compilation cache): hence ten minutes. An explicit
  --xla_cpu_collective_timeout_seconds in XLA_FLAGS wins.
- `startup_timeout_s` (default 300 s, JAX's) bounds the wait for every process to connect.
- At exit a process waits for its peers at most SHUTDOWN_TIMEOUT_S (300 s, JAX's default): long
  enough for process 0 to write its reports while the others have finished.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from smc.validation import static_int

TIMEOUT_S = 60
COLLECTIVE_TIMEOUT_S = 600
STARTUP_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 300
ENVIRONMENT = {"coordinator_address": "JAX_COORDINATOR_ADDRESS",
               "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"


class Settings(NamedTuple):
    """What `initialize` was asked for (None: left to JAX's cluster detection) and its timeouts."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    timeout_s: int
    collective_timeout_s: int
    startup_timeout_s: int


_initialized: list[Settings] = []  # the settings of this process's one initialisation


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = TIMEOUT_S,
               collective_timeout_s: int = COLLECTIVE_TIMEOUT_S,
               startup_timeout_s: int = STARTUP_TIMEOUT_S) -> Settings:
    """Join this process to the others (`jax.distributed.initialize`); returns the settings.

    Call it in every process before any JAX computation or device query. Each argument left None
    is read from its environment variable (module docstring). A second call with the same
    settings does nothing; with other settings it raises RuntimeError.
    """
    settings = resolve(coordinator_address, num_processes, process_id, timeout_s=timeout_s,
                       collective_timeout_s=collective_timeout_s,
                       startup_timeout_s=startup_timeout_s)
    if _initialized:
        if _initialized[0] != settings:
            raise RuntimeError(f"smc.multihost.initialize was already called with "
                               f"{_initialized[0]}; a process joins one cluster once, so it "
                               f"cannot be called again with {settings}")
        return settings
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed.initialize was already called (not through "
                           "smc.multihost.initialize), so these timeouts cannot be applied")
    _set_collective_timeout(settings.collective_timeout_s)
    try:
        jax.distributed.initialize(
            settings.coordinator_address, settings.num_processes, settings.process_id,
            initialization_timeout=settings.startup_timeout_s,
            heartbeat_timeout_seconds=settings.timeout_s,
            shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    except ValueError as error:  # JAX's cluster detection found nothing to fill them in
        raise ValueError(f"{error} Give coordinator_address, num_processes and process_id, or "
                         f"set {', '.join(ENVIRONMENT.values())}") from None
    _initialized.append(settings)
    return settings


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, *, timeout_s: int = TIMEOUT_S,
            collective_timeout_s: int = COLLECTIVE_TIMEOUT_S,
            startup_timeout_s: int = STARTUP_TIMEOUT_S) -> Settings:
    """The validated settings `initialize` would use (arguments, else environment variables)."""
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    for name, variable in ENVIRONMENT.items():
        if given[name] is None and os.environ.get(variable, "").strip():
            given[name] = _from_environment(name, variable)
    missing = [name for name, value in given.items() if value is None]
    if missing and len(missing) < len(given):
        raise ValueError(
            "multi-host settings are incomplete: " + ", ".join(
                f"{name} (argument or {ENVIRONMENT[name]})" for name in missing)
            + " missing; give all three, or none to let JAX detect the cluster")
    address, count, index = (given[name] for name in ENVIRONMENT)
    if address is not None:
        address = check_address(address)
        count = static_int("num_processes", count, 1)
        index = static_int("process_id", index, 0)
        if index >= count:
            raise ValueError(f"process_id must be < num_processes={count}, got {index}")
    return Settings(address, count, index, static_int("timeout_s", timeout_s, 1),
                    static_int("collective_timeout_s", collective_timeout_s, 1),
                    static_int("startup_timeout_s", startup_timeout_s, 1))


def check_address(address: Any) -> str:
    """'host:port' with a port in 1..65535 ('[v6]:port' for an IPv6 host)."""
    if not isinstance(address, str):
        raise TypeError(f"coordinator_address must be a 'host:port' string, got "
                        f"{type(address).__name__} {address!r}")
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"coordinator_address must be 'host:port' with a port in 1..65535 "
                         f"(process 0's address), got {address!r}")
    return address.strip()


def _from_environment(name: str, variable: str) -> str | int:
    text = os.environ[variable].strip()
    if name == "coordinator_address":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: environment variable {variable}={text!r} is not an "
                         f"integer") from None


def _set_collective_timeout(seconds: int) -> None:
    """Add the CPU collective timeout to XLA_FLAGS, which XLA reads when the backend starts
    (after this); a value the user set there already is kept."""
    flags = os.environ.get("XLA_FLAGS", "")
    if COLLECTIVE_TIMEOUT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {COLLECTIVE_TIMEOUT_FLAG}={seconds}".strip()


def is_initialized() -> bool:
    """Whether this process joined a cluster through `initialize`."""
    return bool(_initialized)


def is_writer() -> bool:
    """True in process 0 (and in a single process): the one that writes files and prints."""
    return jax.process_index() == 0


def global_mesh(axis_names: Sequence[str] = ("particles",),
                shape: Sequence[int] | None = None) -> Mesh:
    """A Mesh over every process's devices (`jax.devices()`), in process-major order.

    shape: devices along each axis (product = all devices); default: all of them along the
    first axis, 1 along the others. In process-major order the last axis stays within a process
    when it divides the devices per process, so a "model" axis there communicates locally.
    """
    if isinstance(axis_names, str) or not axis_names or not all(
            isinstance(name, str) and name for name in axis_names):
        raise ValueError(f"axis_names must be a sequence of non-empty strings, got {axis_names!r}")
    if len(set(axis_names)) != len(axis_names):
        raise ValueError(f"axis_names must be distinct, got {tuple(axis_names)}")
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if shape is None:
        shape = (len(devices),) + (1,) * (len(axis_names) - 1)
    shape = tuple(static_int("shape", size, 1) for size in shape)
    if len(shape) != len(axis_names):
        raise ValueError(f"shape {shape} must have one size per axis of {tuple(axis_names)}")
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"shape {shape} holds {int(np.prod(shape))} devices but the processes "
                         f"have {len(devices)}")
    return Mesh(np.array(devices, dtype=object).reshape(shape), tuple(axis_names))
