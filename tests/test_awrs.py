"""AWRS (proposals/awrs.py): exact draws from q c / Z, a properly weighted, unbiased Z estimate,
and the number of constraint evaluations, against exact enumeration of the sampling order."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from proposals.awrs import NO_CANDIDATE, awrs
from proposals.tokens import NO_TOKEN

ROWS = 40_000


def exact_walk(p, allowed):
    """By enumeration of every order of sampling without replacement (Plackett-Luce):
    (E[W 1{x = v}] for each v, E[checks]) for the walk the module docstring describes."""
    p = np.asarray(p, np.float64)
    support = [v for v in range(p.size) if p[v] > 0]
    weight_at, checks = np.zeros(p.size), 0.0
    for order in itertools.permutations(support):
        prob, left = 1.0, 1.0
        for v in order:
            prob *= p[v] / left
            left -= p[v]
        first = next((k for k, v in enumerate(order) if allowed[v]), None)
        if first is None:
            checks += prob * len(order)
            continue
        x = order[first]
        rest = order[first + 1:]
        checks += prob * (first + 1 + (1 if rest else 0))
        mass_left = 1.0 - sum(p[v] for v in order[:first])
        weight = mass_left if (not rest or allowed[rest[0]]) else p[x]
        weight_at[x] += prob * weight
    return weight_at, checks


def run(p, allowed, rows=ROWS, seed=0, **options):
    logq = jnp.log(jnp.broadcast_to(jnp.asarray(p, jnp.float32), (rows, len(p))))
    table = jnp.asarray(allowed)

    def accept(candidates):
        return jnp.where(candidates == NO_CANDIDATE, False, table[jnp.maximum(candidates, 0)])

    draw = jax.jit(lambda k: awrs(k, logq, accept, **options))(jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map(np.asarray, draw)


def z(samples, expected):
    """z-score of the mean; a constant sample (a deterministic estimate) is held to float32
    rounding instead (1e-6 relative)."""
    standard_error = samples.std(ddof=1) / np.sqrt(samples.size)
    return (samples.mean() - expected) / max(standard_error, 1e-6 * max(1.0, abs(expected)))


def test_hand_computed_case():
    """p = (0.5, 0.3, 0.2), c = (1, 1, 0): Z = 0.8; checks 2 when a or b comes first, 3 when c
    does (reject c, accept, verify the last): E = 0.5 * 2 + 0.3 * 2 + 0.2 * 3 = 2.2."""
    weight_at, checks = exact_walk([0.5, 0.3, 0.2], [True, True, False])
    np.testing.assert_allclose(weight_at, [0.5, 0.3, 0.0], atol=1e-12)
    assert checks == pytest.approx(2.2)


CASES = {
    "constraint binds": ([0.35, 0.25, 0.2, 0.12, 0.08], [False, True, False, True, True]),
    "heavy token refused": ([0.8, 0.1, 0.05, 0.04, 0.01], [False, False, True, False, True]),
    "everything allowed": ([0.4, 0.3, 0.2, 0.1], [True, True, True, True]),
    "one allowed token, light": ([0.7, 0.2, 0.06, 0.04, 0.0], [False, False, False, True, True]),
}


@pytest.mark.parametrize("name", CASES)
def test_exact_draws_proper_weights_and_checks(name):
    p, allowed = CASES[name]
    p, allowed = np.asarray(p), np.asarray(allowed)
    weight_at, expected_checks = exact_walk(p, allowed)
    # proper weighting, exactly (enumeration): E[W 1{x = v}] = p(v) c(v)
    np.testing.assert_allclose(weight_at, p * allowed, atol=1e-12)

    draw = run(p, allowed)
    assert np.all(draw.tokens != NO_TOKEN) and np.all(allowed[draw.tokens])
    w = np.exp(draw.log_weight.astype(np.float64))
    z_mass = p[allowed].sum()
    # each |z| < 4.5: 4 + 4 + 1 statistics per case, 4 cases; P(any false alarm) < 1e-3
    assert abs(z(w, z_mass)) < 4.5, (w.mean(), z_mass)
    for v in np.flatnonzero(allowed):
        assert abs(z(w * (draw.tokens == v), p[v])) < 4.5, v          # proper weighting
        frequency = (draw.tokens == v).astype(np.float64)
        assert abs(z(frequency, p[v] / z_mass)) < 4.5, v               # exact draw from q c / Z
    assert abs(z(draw.checks.astype(np.float64), expected_checks)) < 4.5


def test_the_z_test_sees_a_missing_verification():
    """Without the second evaluation (W = 1 - R always) the mean weight is biased upwards; the
    bias, by enumeration, is many standard errors at ROWS draws, so the test above would fail."""
    p, allowed = map(np.asarray, CASES["constraint binds"])
    biased = 0.0
    for order in itertools.permutations(range(len(p))):
        prob, left = 1.0, 1.0
        for v in order:
            prob *= p[v] / left
            left -= p[v]
        first = next(k for k, v in enumerate(order) if allowed[v])
        biased += prob * (1.0 - sum(p[v] for v in order[:first]))
    w = np.exp(run(p, allowed).log_weight.astype(np.float64))
    standard_error = w.std(ddof=1) / np.sqrt(w.size)
    assert (biased - p[allowed].sum()) / standard_error > 10


def test_nothing_allowed_gives_minus_inf_and_every_token_checked():
    draw = run([0.5, 0.3, 0.2, 0.0], [False, False, False, True], rows=8)
    assert np.all(draw.tokens == NO_TOKEN) and np.all(np.isneginf(draw.log_weight))
    assert np.all(draw.checks == 3)       # the zero-mass token is never drawn nor checked


def test_max_checks_cut_short_is_nan_and_undefined_logits_are_nan():
    draw = run([0.1, 0.1, 0.1, 0.7], [False, False, False, True], rows=64, max_checks=2)
    cut = draw.checks >= 2
    assert np.all(np.isnan(draw.log_weight[cut]) | (draw.tokens[cut] == 3))
    assert np.isnan(draw.log_weight).any()
    logq = jnp.array([[0.0, jnp.nan, 0.0], [0.0, jnp.inf, 0.0]])
    bad = awrs(jax.random.PRNGKey(0), logq, lambda c: c >= 0)
    assert np.all(np.isnan(np.asarray(bad.log_weight)))


def test_unnormalised_logits_estimate_the_unnormalised_mass():
    p = np.array([0.35, 0.25, 0.2, 0.12, 0.08])
    allowed = np.array([False, True, False, True, True])
    logq = jnp.broadcast_to(jnp.log(jnp.asarray(p * 5.0, jnp.float32)), (ROWS, 5))
    table = jnp.asarray(allowed)
    draw = awrs(jax.random.PRNGKey(1), logq, lambda c: table[jnp.maximum(c, 0)] & (c >= 0))
    w = np.exp(np.asarray(draw.log_weight, np.float64))
    assert abs(z(w, 5.0 * p[allowed].sum())) < 4.5


def test_bad_input():
    with pytest.raises(ValueError, match="logq"):
        awrs(jax.random.PRNGKey(0), jnp.zeros((3,)), lambda c: c >= 0)
    with pytest.raises(ValueError, match="max_checks"):
        awrs(jax.random.PRNGKey(0), jnp.zeros((2, 3)), lambda c: c >= 0, max_checks=1)
