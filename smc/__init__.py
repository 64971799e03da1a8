"""The particle-system core: Feynman-Kac models, the SMC engine, resampling, tempering.

    import smc
    model = smc.FeynmanKac(init=init, step=step, num_steps=T)
    result = smc.run(key, model, num_particles=N)
"""
from smc import memory, resampling, tempering, weights
from smc.engine import SMCResult, SMCState, run
from smc.feynman_kac import FeynmanKac, stack_groups

__all__ = ["FeynmanKac", "SMCResult", "SMCState", "memory", "resampling", "run", "stack_groups",
           "tempering", "weights"]
