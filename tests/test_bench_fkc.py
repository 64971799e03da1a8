"""The FKC overhead benchmark (experiments/benchmarks/fkc.py): its bare sampler is FKC's proposal,
and the quick run produces its table (no timing is asserted)."""
import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import fkc as bench_fkc
from experiments.harness import bench_cli
from targets.diffusion import fkc, sde
from targets.toy import gmm

QUICK = ["--score", "toy", "digits", "--sizes", "64", "--steps", "5", "--repeats", "1",
         "--thresholds", "1.0"]


def test_bare_sampler_is_the_fkc_proposal_without_weights():
    # Two steps of the bare sampler against FKC's own init and step with the same keys.
    times, beta, n = sde.time_grid(2), 2.0, 16
    score = gmm.noised_score(gmm.four_modes(), bench_fkc.VP)
    model = fkc.anneal(score, beta, schedule=bench_fkc.VP, times=times, dim=2)
    key = jax.random.PRNGKey(3)
    got = bench_fkc.bare_sampler(score, beta, times, n)(key)
    key_init, key_loop = jax.random.split(key)
    x = np.sqrt(bench_fkc.VP.sigma2(times[0]) / beta) * jax.random.normal(key_init, (n, 2))
    for t, step_key in enumerate(jax.random.split(key_loop, 2)):
        x, _ = model.step(step_key, x, jnp.int32(t))
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)


def test_quick_run_gives_the_table():
    text = bench_cli.run(bench_fkc.BENCHMARK, QUICK)
    assert "python -m experiments bench fkc --score toy digits --sizes 64" in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert [c.strip() for c in lines[0].strip("|").split("|")] == list(bench_fkc.COLUMNS)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in rows] == ["toy", "digits"]
    assert all(row[3] == "1.0" and row[4] == "5.0" for row in rows)   # resampled every step
    assert all(float(row[7]) > 0 for row in rows)
