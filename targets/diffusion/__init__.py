"""Score and flow-model targets: SDE schedules, Feynman-Kac Correctors, reward-guided SMC,
Psi-Sampler, Diffusion Tree Sampling (DTS, DTS*), Rollover Budget Forcing."""
from targets.diffusion import dts, fkc, psi, rbf, reward, sde

__all__ = ["dts", "fkc", "psi", "rbf", "reward", "sde"]
