"""Targets whose answer is known exactly, for tests and for checking new algorithms."""
from targets.toy import distance, gaussian, gmm, lgssm

__all__ = ["distance", "gaussian", "gmm", "lgssm"]
