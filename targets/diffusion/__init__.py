"""Score-model targets: SDE schedules, Feynman-Kac Correctors, reward-guided SMC, Psi-Sampler."""
from targets.diffusion import fkc, psi, reward, sde

__all__ = ["fkc", "psi", "reward", "sde"]
