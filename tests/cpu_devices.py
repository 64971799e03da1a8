"""The environment of a subprocess that runs JAX on `count` forced CPU devices.

The device count must be set before JAX starts, hence a subprocess. The flags conftest.py put in
XLA_FLAGS (the quick compile) are kept: a subprocess that replaced them would compile with XLA's
full optimisation, about twice as slowly.
"""
import os


def forced_cpu_env(count: int, base: dict[str, str] | None = None,
                   **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) with `extra`, on `count` CPU devices."""
    base = os.environ if base is None else base
    flags = [f for f in base.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    return dict(base, JAX_PLATFORMS="cpu",
                XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={count}"]),
                **extra)
