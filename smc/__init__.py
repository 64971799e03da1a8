"""The particle-system core: Feynman-Kac models, the SMC engine, resampling, tempering.

    import smc
    model = smc.FeynmanKac(init=init, step=step, num_steps=T)
    result = smc.run(key, model, num_particles=N)
"""
from smc import resampling, tempering, weights
from smc.engine import SMCResult, SMCState, run
from smc.feynman_kac import FeynmanKac

__all__ = ["FeynmanKac", "SMCResult", "SMCState", "resampling", "run", "tempering", "weights"]
