"""Targets whose answer is known exactly, for tests and for checking new algorithms."""
from targets.toy import das, distance, gaussian, gmm, lgssm

__all__ = ["das", "distance", "gaussian", "gmm", "lgssm"]
