import os

# The suite compiles hundreds of small XLA programs and runs most of them briefly, so compiling
# dominates its time: without LLVM's optimisation passes XLA:CPU compiles about twice as fast
# (tests/test_engine.py: 42 s -> 21 s of backend compile). Results may differ from the optimised
# build in the last float32 bits (other instruction selection), which no test may depend on.
# Set before JAX starts its backend; notebook kernels inherit it. SMC_TEST_XLA_OPT=1 keeps
# XLA's defaults.
FAST_COMPILE = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
if os.environ.get("SMC_TEST_XLA_OPT") != "1":
    _flags = os.environ.get("XLA_FLAGS", "").split()  # xdist workers inherit the parent's
    os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in FAST_COMPILE if f not in _flags])

import jax
import numpy as np
import pytest


def z_score(samples: np.ndarray, expected: float) -> float:
    """(mean - expected) / standard error of the mean."""
    samples = np.asarray(samples, dtype=np.float64)
    return float((samples.mean() - expected) / (samples.std(ddof=1) / np.sqrt(samples.size)))


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


# The longest files first (their durations in a CI run, 2026-12-06): with two workers and
# `--dist loadfile`, each worker takes the next file when it finishes one, so a long file that
# starts late becomes the suite's tail while the other worker idles.
LONGEST_FIRST = ("test_lm_mesh.py", "test_experiments.py", "test_experiments_notebooks.py",
                 "test_readme.py", "test_lm_prompt_cache.py", "test_lm_gemma3.py",
                 "test_device_check.py", "test_bench_power.py", "test_bench_decode.py",
                 "test_multihost.py", "test_driftlite.py", "test_experiments_das.py",
                 "test_reward.py", "test_fkc.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: order kept within
