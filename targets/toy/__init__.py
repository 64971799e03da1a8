"""Targets whose answer is known exactly, for tests and for checking new algorithms."""
from targets.toy import gaussian, lgssm

__all__ = ["gaussian", "lgssm"]
