"""Score and flow-model targets: SDE schedules, Feynman-Kac Correctors, reward-guided SMC,
Psi-Sampler, DriftLite, Diffusion Tree Sampling (DTS, DTS*), Rollover Budget Forcing."""
from targets.diffusion import driftlite, dts, fkc, psi, rbf, reward, sde

__all__ = ["driftlite", "dts", "fkc", "psi", "rbf", "reward", "sde"]
