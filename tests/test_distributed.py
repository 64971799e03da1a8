"""Sharded particles on 8 forced CPU devices: global and island resampling give the exact log Z."""
import os
import subprocess
import sys
import textwrap

from tests.cpu_devices import forced_cpu_env

SCRIPT = textwrap.dedent("""
    import os
    import jax
    import numpy as np
    import smc
    from jax.sharding import Mesh
    from targets.toy import lgssm

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("particles",))
    model = lgssm.default()
    _, y = lgssm.simulate(jax.random.PRNGKey(42), model, 25)
    exact = lgssm.kalman_log_likelihood(model, np.asarray(y))
    fk = lgssm.bootstrap(model, y)
    keys = jax.random.split(jax.random.PRNGKey(5), 100)
    out = {}
    for name, kwargs in [("single", {}), ("global", dict(mesh=mesh)),
                         ("island", dict(mesh=mesh, islands=True))]:
        run = jax.jit(lambda k: smc.run(k, fk, 1024, **kwargs))
        # Block on each run: the CPU backend can deadlock when several multi-device programs
        # with collectives are in flight at once.
        results = [jax.block_until_ready(run(k)) for k in keys]
        log_z = np.array([float(r.log_evidence) for r in results])
        ratio = np.exp(log_z - exact)
        z = (ratio.mean() - 1) / (ratio.std(ddof=1) / np.sqrt(ratio.size))
        assert abs(z) < 4, (name, z)
        out[name] = (log_z.mean(), log_z.std(ddof=1))
        print(name, out[name], flush=True)
        last = results[-1]
        assert last.particles.shape == (1024, 2) and last.log_weights.shape == (1024,)
        assert np.all(np.isfinite(last.log_weights))
        if name != "single":
            assert len(last.particles.sharding.device_set) == 8, last.particles.sharding
        if name == "island":
            assert last.ess.shape == (8, 25) and last.resampled.shape == (8, 24)
    # Global resampling is the single-device algorithm: the same law of log Z_hat.
    for name in ("global", "island"):
        mean, sd = out[name]
        assert abs(mean - out["single"][0]) < 4 * np.hypot(sd, out["single"][1]) / np.sqrt(100), out
    # Groups on the mesh: 4 observation sets as 4 groups of 256 particles over the 8 devices
    # (the engine's branchless path: per-group decisions, gathers and selects across devices),
    # each group's Z_hat unbiased for its own Kalman likelihood.
    ys = np.stack([np.asarray(lgssm.simulate(jax.random.PRNGKey(s), model, 25)[1])
                   for s in (1, 2, 3, 4)])
    exact_groups = np.array([lgssm.kalman_log_likelihood(model, y) for y in ys])
    grouped = smc.stack_groups(lambda y: lgssm.bootstrap(model, y), jax.numpy.asarray(ys))
    run = jax.jit(lambda k: smc.run(k, grouped, 256, mesh=mesh))
    results = [jax.block_until_ready(run(k)) for k in keys]
    assert len(results[-1].particles.sharding.device_set) == 8
    assert np.asarray(results[-1].resampled).any()
    ratio = np.exp(np.array([np.asarray(r.log_evidence) for r in results]) - exact_groups)
    z = (ratio.mean(0) - 1) / (ratio.std(0, ddof=1) / np.sqrt(len(keys)))
    assert np.all(np.abs(z) < 4), ("groups", z)
    print("OK", exact, out, "groups z", z)
""")


def test_global_and_island_resampling_on_eight_devices():
    env = forced_cpu_env(8)
    done = subprocess.run([sys.executable, "-c", SCRIPT], check=False, env=env, capture_output=True,
                          text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OK" in done.stdout


def test_mesh_errors():
    import jax
    import numpy as np
    import pytest
    from jax.sharding import Mesh

    import smc
    from targets.toy import lgssm

    mesh = Mesh(np.array(jax.devices()[:1]), ("particles",))
    model = lgssm.default()
    fk = lgssm.bootstrap(model, np.zeros((3, 1)))
    with pytest.raises(ValueError, match="no axis"):
        smc.run(jax.random.PRNGKey(0), fk, 8, mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match="islands=True needs a mesh"):
        smc.run(jax.random.PRNGKey(0), fk, 8, islands=True)
    result = smc.run(jax.random.PRNGKey(0), fk, 8, mesh=mesh, islands=True)
    assert result.particles.shape == (8, 2) and result.ess.shape == (1, 3)
