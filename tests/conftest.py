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
