"""The README's Python examples run as written and give sensible answers."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace: dict = {}
    for block in blocks[:2]:  # the user-model example, then tempering (the mesh one needs devices)
        exec(compile(block, "README.md", "exec"), namespace)
    result, out = namespace["result"], namespace["out"]
    assert np.isfinite(float(result.log_evidence)) and result.ess.shape == (51,)
    exact = namespace["gaussian"].log_evidence(namespace["problem"])
    assert abs(float(out.smc.log_evidence) - exact) < 0.3
