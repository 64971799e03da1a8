"""The Feynman-Kac model: initial law and potential, then T (kernel, potential) steps."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

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
    """

    init: InitFn
    step: StepFn
    num_steps: int
    done: DoneFn | None = None
    move: MoveFn | None = None
    resample_mask: Any | None = None
    weighted_step: bool = False
