"""Models of G groups (`FeynmanKac.groups`): G problems in one program, each weighted, resampled and
estimated on its own, equal to G separate runs with the same keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smc

T = 6
N = 64


def tracking(data):
    """A random walk observed with noise: data = (observations [T + 1], scale): a group's own
    problem. Increments depend on the data, so groups mixed up would show."""
    obs, scale = data

    def init(key, n):
        x = jax.random.normal(key, (n, 2))
        return x, -0.5 * jnp.sum((x - obs[0]) ** 2, axis=-1) / scale

    def step(key, x, t):
        x = 0.9 * x + 0.5 * jax.random.normal(key, x.shape)
        return x, -0.5 * jnp.sum((x - obs[t + 1]) ** 2, axis=-1) / scale

    def move(key, x, t):      # any kernel will do for the equality tests (not invariant)
        return x + 0.01 * jax.random.normal(key, x.shape)

    return smc.FeynmanKac(init=init, step=step, num_steps=T, move=move,
                          resample_mask=np.arange(T) != 3)


def stopping(data):
    """Rows count their steps and stop at the group's `stop`; a group with `kill` at step k
    gets -inf increments there (its cloud dies): a while-loop model whose groups end apart."""
    stop, kill = data

    def init(key, n):
        x = jax.random.normal(key, (n,))
        return (x, jnp.zeros((n,), jnp.int32)), -0.5 * x ** 2

    def step(key, particles, t):
        x, count = particles
        x = x + jax.random.normal(key, x.shape)
        increment = jnp.where(t == kill, -jnp.inf, -0.3 * x ** 2)
        return (x, count + 1), increment

    def done(particles):
        return particles[1] >= stop

    return smc.FeynmanKac(init=init, step=step, num_steps=2 * T, done=done)


def tracking_data(groups):
    obs = jax.random.normal(jax.random.PRNGKey(7), (groups, T + 1, 2)) * jnp.arange(
        1, groups + 1)[:, None, None]
    return obs, jnp.linspace(0.3, 2.0, groups)


def separate_runs(make_model, data, keys, **options):
    runs = []
    for g, key in enumerate(keys):
        group_data = jax.tree_util.tree_map(lambda leaf, g=g: leaf[g], data)
        runs.append(smc.run(key, make_model(group_data), N, **options))
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *runs)


def assert_same(grouped, separate):
    for name in smc.SMCResult._fields:
        a, b = getattr(grouped, name), getattr(separate, name)
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            assert x.shape == y.shape, (name, x.shape, y.shape)
            if jnp.issubdtype(x.dtype, jnp.floating):
                np.testing.assert_allclose(x, y, rtol=2e-6, atol=2e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(x, y, err_msg=name)


@pytest.mark.parametrize("ess_threshold", [0.5, 1.0])
def test_groups_equal_separate_runs(ess_threshold):
    groups = 4
    data = tracking_data(groups)
    keys = jax.random.split(jax.random.PRNGKey(1), groups)
    options = {"ess_threshold": ess_threshold, "record_ancestors": True,
                   "summary": lambda x, logw: jnp.sum(smc.weights.normalize(logw)[:, None] * x, 0)}
    grouped = jax.jit(lambda k: smc.run(k, smc.stack_groups(tracking, data), N, **options))(keys)
    separate = separate_runs(tracking, data, keys, **options)
    assert_same(grouped, separate)
    # the groups are different problems, and some resampled while others did not
    assert len(set(np.round(np.asarray(grouped.log_evidence), 3))) == groups
    if ess_threshold < 1.0:
        flags = np.asarray(grouped.resampled)
        assert (flags.any(axis=0) & ~flags.all(axis=0)).any(), flags


def test_groups_that_stop_apart_and_a_group_that_dies():
    stops = jnp.array([3, 9, 5, 12])
    kills = jnp.array([-1, -1, 2, -1])         # group 2's cloud dies at step 2
    data = (stops, kills)
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    options = {"ess_threshold": 0.7, "record_ancestors": True}
    grouped = smc.run(keys, smc.stack_groups(stopping, data), N, **options)
    separate = separate_runs(stopping, data, keys, **options)
    # a dead group's particles, which carry no weight, go on being stepped (its own run stopped)
    alive = np.array([0, 1, 3])
    assert_same(*(r._replace(particles=jax.tree_util.tree_map(lambda x: x[alive], r.particles))
                  for r in (grouped, separate)))
    np.testing.assert_array_equal(grouped.num_steps, [3, 9, 3, 12])
    np.testing.assert_array_equal(grouped.degenerate, [False, False, True, False])
    np.testing.assert_array_equal(grouped.particles[1][alive],
                                  np.repeat(np.array(data[0])[alive, None], N, axis=1))


def test_one_key_is_split_into_the_groups():
    data = tracking_data(3)
    model = smc.stack_groups(tracking, data)
    key = jax.random.PRNGKey(5)
    a = smc.run(key, model, N)
    b = smc.run(jax.random.split(key, 3), model, N)
    np.testing.assert_array_equal(a.log_evidence, b.log_evidence)
    with pytest.raises(ValueError, match="key must be one PRNG key or 3 keys"):
        smc.run(jax.random.split(key, 2), model, N)
    with pytest.raises(ValueError, match="islands=True runs a model of one group"):
        smc.run(key, model, N, islands=True, mesh=jax.sharding.Mesh(jax.devices(), ("particles",)))


def test_group_evidence_is_unbiased():
    """Z_hat of each group against the Kalman filter's exact likelihood (z-test over replicate
    runs): a group's evidence must be its own, not another's."""
    groups, replicates = 3, 200
    obs, scale = tracking_data(groups)
    scale = scale + 1.0                       # a flatter likelihood: Z_hat's spread stays small
    exact = np.array([kalman_log_likelihood(np.asarray(obs[g]), float(scale[g]))
                      for g in range(groups)])
    model = smc.stack_groups(tracking, (obs, scale))
    run = jax.jit(jax.vmap(lambda k: smc.run(k, model, 256).log_evidence))
    log_z = np.asarray(run(jax.random.split(jax.random.PRNGKey(11), replicates)))  # [R, G]
    ratio = np.exp(log_z - exact)             # Z_hat / Z, mean 1 when unbiased
    mean, se = ratio.mean(axis=0), ratio.std(axis=0, ddof=1) / np.sqrt(replicates)
    assert np.all(np.abs(mean - 1.0) < 4 * se + 1e-3), (mean, se)
    assert np.all(se < 0.05), se              # the test has the power to see a wrong group


def kalman_log_likelihood(obs, scale):
    """log of the integral of N(x0; 0, I) prod_t exp(-|x_t - y_t|^2 / (2 scale)) over the path,
    x_t = 0.9 x_{t-1} + 0.5 eps (unnormalised Gaussian potentials, per coordinate)."""
    total = 0.0
    for coordinate in range(obs.shape[1]):
        mean, var = 0.0, 1.0
        for t in range(obs.shape[0]):
            if t > 0:
                mean, var = 0.9 * mean, 0.81 * var + 0.25
            y = obs[t, coordinate]
            # integral of N(x; mean, var) exp(-(x - y)^2 / (2 scale))
            total += 0.5 * np.log(scale / (var + scale)) - 0.5 * (y - mean) ** 2 / (var + scale)
            gain = var / (var + scale)
            mean, var = mean + gain * (y - mean), var * (1 - gain)
    return total


def test_no_gather_unless_some_group_resamples():
    """The particles are gathered only inside the `lax.cond` taken when some group resamples."""
    model = smc.stack_groups(tracking, tracking_data(4))
    jaxpr = jax.make_jaxpr(lambda k: smc.run(k, model, N))(jax.random.PRNGKey(0))
    outside, inside = gathers(jaxpr.jaxpr, in_cond=False)
    assert inside >= 1 and outside == 0, (outside, inside)


def gathers(jaxpr, in_cond):
    """(gathers of a [4 N, 2] particle array outside any cond, inside one) in a jaxpr."""
    outside = inside = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "gather" and eqn.invars[0].aval.shape == (4 * N, 2):
            inside, outside = (inside + 1, outside) if in_cond else (inside, outside + 1)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    o, i = gathers(inner, in_cond or eqn.primitive.name == "cond")
                    outside, inside = outside + o, inside + i
    return outside, inside
