"""The Feynman-Kac model: initial law and potential, then T (kernel, potential) steps."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

InitFn = Callable[[Array, int], tuple[PyTree, Array]]
StepFn = Callable[..., tuple[PyTree, Array]]
MoveFn = Callable[[Array, PyTree, Array], PyTree]
DoneFn = Callable[[PyTree], Array]


class FeynmanKac(NamedTuple):
    """M0/G0 then (M_t, G_t) for t = 0..T-1; the particles after t steps target gamma_t.

    init(key, N) -> (particles, log_weights [N])            draws M0, returns G0.
    step(key, particles, t) -> (particles, log_increments)  draws M_t, returns G_t [N]; t int32.
    num_steps: static T (scan), or with `done` the static maximum number of steps (while loop).
    done(particles) -> bool or bool [N]: stop once true (for every particle).
    move(key, particles, t) -> particles: an MH kernel invariant for gamma_t, applied after each
        resampling that happens before step t (resample-move).
    resample_mask: optional static bool [num_steps]; False forbids resampling before step t
        (e.g. FKC's resampling window), whatever the ESS.
    weighted_step: static bool; True makes the engine call step(key, particles, t, log_weights)
        with the current un-normalised log-weights [N] (after any resampling before step t), for
        steps whose kernel or potential adapts to the weighted cloud (adaptive tempering). The
        step may use them to choose its kernel and potential but must not fold them into its
        increments: the engine adds G_t to them.
    groups: None, or a static int G: the model is G independent problems of N particles each
        (e.g. G prompts), run in one program with a resampling decision per group (`smc.run`,
        "Groups"). Its functions then see every group at once, one key per group:
        init(keys [G], N) -> (particles with leading axis G * N, group g's rows at g * N to
        (g + 1) * N - 1; log_weights [G * N]); step(keys [G], particles, t) -> (particles,
        log_increments [G * N]); move(keys [G], particles, t); done(particles) -> bool [G] or
        [G * N]. Group g should use keys[g] as its own one-group model would use its key: then
        the run equals G separate runs. With `done`, the step must leave a done particle as it
        is (the other groups go on stepping; `stack_groups` ensures it).
    """

    init: InitFn
    step: StepFn
    num_steps: int
    done: DoneFn | None = None
    move: MoveFn | None = None
    resample_mask: Any | None = None
    weighted_step: bool = False
    groups: int | None = None


def group_rows(tree: PyTree, groups: int) -> PyTree:
    """Every leaf's leading axis of G * N rows (group after group, `FeynmanKac.groups`) as
    [G, N]."""
    return jax.tree_util.tree_map(lambda leaf: leaf.reshape((groups, -1) + leaf.shape[1:]), tree)


def stack_groups(make_model: Callable[[PyTree], FeynmanKac], data: PyTree) -> FeynmanKac:
    """A model of G groups from a one-group model of each group's data (leading axis [G] on
    every leaf of `data`): its functions `vmap` make_model(data[g])'s over the groups.

    Every make_model(d) must share num_steps, resample_mask, weighted_step and whether it has
    `done` and `move` (taken from group 0's). For models whose step is better batched by hand
    (a language model decoding every group's rows in one call), build the grouped functions
    directly instead.
    """
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("stack_groups needs data with a leading group axis, got an empty pytree")
    groups = leaves[0].shape[0]
    template = make_model(jax.tree_util.tree_map(lambda leaf: leaf[0], data))

    def flat(tree: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda leaf: leaf.reshape((-1,) + leaf.shape[2:]), tree)

    def init(keys, n):
        particles, log_weights = jax.vmap(lambda k, d: make_model(d).init(k, n))(keys, data)
        return flat(particles), log_weights.reshape(-1)

    def step(keys, particles, t, *log_weights):
        def one(key, d, p, *w):
            model = make_model(d)
            new, increments = model.step(key, p, t, *w)
            if model.done is None:
                return new, increments
            # a group that is done stands still while the others go on (`FeynmanKac.groups`)
            finished = jnp.all(model.done(p))
            return jax.tree_util.tree_map(lambda a, b: jnp.where(finished, b, a), new, p), increments

        particles, increments = jax.vmap(one)(keys, data, group_rows(particles, groups),
                                              *group_rows(log_weights, groups))
        return flat(particles), increments.reshape(-1)

    def move(keys, particles, t):
        return flat(jax.vmap(lambda k, d, p: make_model(d).move(k, p, t))(
            keys, data, group_rows(particles, groups)))

    def done(particles):
        return jax.vmap(lambda d, p: jnp.all(make_model(d).done(p)))(
            data, group_rows(particles, groups))

    return FeynmanKac(init=init, step=step, num_steps=template.num_steps,
                      done=None if template.done is None else done,
                      move=None if template.move is None else move,
                      resample_mask=template.resample_mask, weighted_step=template.weighted_step,
                      groups=groups)
