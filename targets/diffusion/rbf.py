"""Rollover Budget Forcing (RBF; Kim et al. 2025): a search for high-reward samples of a score
model under a fixed number of evaluations.

docs/algorithms.md section 10. N particles walk the base reverse chain of `reward.reward_smc`
(Euler-Maruyama or ancestral, from N(0, sigma_{t_0}^2 I)) on the grid t_0 > ... > t_T. A
particle's value is the reward of its Tweedie estimate, v = r(x0_hat(x, t)). At step k each
particle draws candidates x' from the base kernel one at a time; each candidate costs one
evaluation (its score at t_{k+1}, which gives x0_hat and, if the candidate is kept, the next
step's drift) and is scored r(x0_hat(x', t_{k+1})). The particle moves on as soon as a candidate
beats its current value; if its allowance for the step runs out first, it moves to the best
candidate it drew (so it always moves: the chain never stalls). Allowances:

    quota    q = (max_evaluations - N) // (N T)            (per particle and step; q >= 1)
    allowed_k = min(q + carry_k, max_candidates),   carry_0 = 0,
    carry_{k+1} = q + carry_k - used_k                (what a particle did not use rolls over).

At the last step (to t_T) there is nothing to roll over to: the particle spends its whole
allowance and keeps the candidate of highest r(x'), the reward itself (t_T is the end of the
chain; no score is needed there, but each candidate is charged one evaluation like the others).

Accounting (exact): `candidates[k, i]` evaluations at step k by particle i, N more for the scores
at t_0; `total_evaluations` = N + sum(candidates) <= N + N T q <= max_evaluations, and
sum_k candidates[k, i] + unused[i] = T q for every particle. Score evaluations are
N + sum(candidates[:-1]). With q = 1 (max_evaluations = N (T + 1)) every step draws one
candidate: plain sampling of the base chain at the same count.

A search, not a sampler: the particles follow no known law (the acceptance rule tilts them
towards high reward by an amount that depends on the budget), so there is no exactness claim.

Differences from the published method: the threshold is the particle's current value (the
published code compares with the best value the particle ever reached); there is no
best-of-many choice of the initial noise, and no gradient-guided variant; every particle has
its own budget and all N are returned (the published code stops its whole batch when a shared
total runs out and returns the best particle). Static shapes: each step is a
loop over candidate slots that stops once no particle is drawing; a slot evaluates the score
for all N rows and keeps the active ones, so the wall time follows the busiest particle
while the count above is what the algorithm spends.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from proposals import sde as sde_proposals
from smc.validation import check_count
from targets.diffusion import reward as reward_lib
from targets.diffusion import sde

Array = jax.Array
KERNELS = reward_lib.KERNELS


class RBFResult(NamedTuple):
    """x [N, d]: the particles at t_T; rewards [N] = r(x); values [T + 1, N]: each particle's
    value at t_0, ..., t_T (r(x0_hat) then, last, r(x_T)); candidates [T, N] int32: evaluations
    per step and particle; unused [N] int32: allowance left at the end; quota []: q (module
    doc); score_evaluations [] and total_evaluations [] int32 (module doc)."""

    x: Array
    rewards: Array
    values: Array
    candidates: Array
    unused: Array
    quota: Array
    score_evaluations: Array
    total_evaluations: Array

    @property
    def evaluations(self) -> Array:
        """[T]: evaluations spent at each step, over all particles (N more at t_0)."""
        return jnp.sum(self.candidates, axis=1)


class Particles(NamedTuple):
    """x [N, d] at the current time, its score [N, d] and value r(x0_hat(x)) [N]."""

    x: Array
    score: Array
    value: Array


def quota(max_evaluations: int, num_particles: int, num_steps: int) -> int:
    """q = (max_evaluations - N) // (N T): each particle's allowance per step before roll-over."""
    return (max_evaluations - num_particles) // (num_particles * num_steps)


def search(key: Array, score: sde.ScoreFn, reward: reward_lib.RewardFn, *,
           schedule: sde.Schedule, times, dim: int, num_particles: int, max_evaluations: int,
           max_candidates: int | None = None, kernel: str = "euler_maruyama") -> RBFResult:
    """RBF with N = num_particles particles and at most max_evaluations evaluations in all.

    score(x [N, d], t) -> [N, d]; reward(x [N, d]) -> [N] (higher is better); schedule, times
    (decreasing grid), dim and kernel ("euler_maruyama" or "ancestral") as in
    `reward.reward_smc`. max_evaluations >= N (T + 1) (one candidate per step and particle);
    max_candidates: most candidates a particle draws at one step (default T q: no cap), the
    rest of its allowance rolls over. Pure and jit-able in `key` (the other arguments are
    static); input errors raise before anything is traced.
    """
    times = sde.check_time_grid(times, schedule)
    num_steps = len(times) - 1
    dim = check_count("dim", dim, 1)
    n = check_count("num_particles", num_particles, 1)
    max_evaluations = check_count("max_evaluations", max_evaluations, 0)
    if max_evaluations < n * (num_steps + 1):
        raise ValueError(f"max_evaluations must be >= num_particles * (number of steps + 1) = "
                         f"{n * (num_steps + 1)} (one score at t_0 and one candidate per step "
                         f"for each particle), got {max_evaluations}")
    q = quota(max_evaluations, n, num_steps)
    max_candidates = num_steps * q if max_candidates is None else check_count(
        "max_candidates", max_candidates, 1)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    reward_lib.check_callables(score, reward, dim)

    ts = jnp.asarray(times, jnp.float32)
    key_init, key_steps = jax.random.split(key)

    def tweedie_reward(x: Array, t: Array) -> tuple[Array, Array]:
        s = score(x, t)
        return s, reward(sde.x0_hat(schedule, x, t, s))

    def step(k: Array, particles: Particles, carry: Array, last: bool
             ) -> tuple[Particles, Array]:
        """One step of every particle; returns the new particles and the candidates used."""
        base = sde.reverse_kernel(schedule, kernel, particles.x, particles.score, ts[k],
                                  ts[k + 1])
        allowed = jnp.minimum(q + carry, max_candidates)

        class Slot(NamedTuple):
            j: Array
            best: Particles
            used: Array
            done: Array

        def draw(slot: Slot) -> Slot:
            active = (slot.j < allowed) & ~slot.done
            x, _ = sde_proposals.sample(jax.random.fold_in(jax.random.fold_in(key_steps, k),
                                                           slot.j), base)
            if last:
                s, r = jnp.zeros_like(x), reward(x)
            else:
                s, r = tweedie_reward(x, ts[k + 1])
            # The first candidate is kept whatever its reward (a NaN then shows in the result).
            better = active & ((r > slot.best.value) | (slot.j == 0))
            best = jax.tree_util.tree_map(
                lambda new, old: jnp.where(better.reshape(-1, *([1] * (new.ndim - 1))), new,
                                           old), Particles(x, s, r), slot.best)
            done = slot.done if last else slot.done | (active & (r > particles.value))
            return Slot(slot.j + 1, best, slot.used + active.astype(jnp.int32), done)

        def drawing(slot: Slot) -> Array:
            return (slot.j < max_candidates) & jnp.any((slot.j < allowed) & ~slot.done)

        start = Slot(jnp.int32(0), particles, jnp.zeros(n, jnp.int32), jnp.zeros(n, bool))
        slot = jax.lax.while_loop(drawing, draw, start)
        return slot.best, slot.used

    def scored_step(k, carry):
        particles, rolled, used, values = carry
        particles, spent = step(k, particles, rolled, last=False)
        return (particles, q + rolled - spent, used.at[k].set(spent),
                values.at[k + 1].set(particles.value))

    x0 = sde.sigma(schedule, ts[0]) * jax.random.normal(key_init, (n, dim), jnp.float32)
    particles = Particles(x0, *tweedie_reward(x0, ts[0]))
    values = jnp.zeros((num_steps + 1, n), jnp.float32).at[0].set(particles.value)
    particles, rolled, used, values = jax.lax.fori_loop(
        0, num_steps - 1, scored_step,
        (particles, jnp.zeros(n, jnp.int32), jnp.zeros((num_steps, n), jnp.int32), values))
    particles, spent = step(jnp.int32(num_steps - 1), particles, rolled, last=True)
    used = used.at[num_steps - 1].set(spent)
    total = n + jnp.sum(used)
    return RBFResult(x=particles.x, rewards=particles.value,
                     values=values.at[num_steps].set(particles.value), candidates=used,
                     unused=q + rolled - spent, quota=jnp.int32(q),
                     score_evaluations=total - jnp.sum(spent), total_evaluations=total)
