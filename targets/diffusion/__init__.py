"""Score-model targets: SDE schedules and Feynman-Kac Correctors."""
from targets.diffusion import fkc, sde

__all__ = ["fkc", "sde"]
