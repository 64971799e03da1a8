"""Optional dependencies: import one, or fail with a message naming the extra that installs it.

The core (`smc`, `proposals`, `targets`) needs only jax and numpy; loading a real language model,
text rewards and the experiments need the extras of `pyproject.toml`, imported where they are
used so that the core stays light.
"""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`importlib.import_module(module)`; if it (not one of its own imports) is missing, an
    ImportError that says what needs it and how to install it: ``pip install 'smc-scaling[extra]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = getattr(error, "name", None)
        if missing is None or not (module == missing or module.startswith(f"{missing}.")):
            raise
        raise ImportError(f"{purpose} needs the '{missing}' package: "
                          f"pip install 'smc-scaling[{extra}]'") from error
