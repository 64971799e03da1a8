"""The README's Python examples run as written and give sensible answers."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    # The user-model example, tempering and FKC (the mesh example needs devices; the language-model
    # ones load SmolLM2 and are covered by tests/test_power_smollm2.py).
    for block in blocks[:2] + blocks[3:4]:
        exec(compile(block, "README.md", "exec"), namespace)
    result, out = namespace["result"], namespace["out"]
    assert np.isfinite(float(result.log_evidence)) and result.ess.shape == (51,)
    exact = namespace["gaussian"].log_evidence(namespace["problem"])
    assert abs(float(out.smc.log_evidence) - exact) < 0.3
    annealed = namespace["annealed"]
    assert annealed.particles.shape == (2048, 2) and np.isfinite(float(annealed.log_evidence))
