"""The README's Python examples run as written and give sensible answers.

Every ```python block runs, in order, in one namespace, except those right after a
`<!-- readme-test: skip (...) -->` line (they need several devices or load a real model; the
comment names the test that covers them).
"""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- readme-test: skip[^\n]*-->\n)?```python\n(.*?)```", re.DOTALL)


def test_readme_examples_run():
    blocks = [(skip is not None, code) for skip, code in
              ((m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text()))]
    assert sum(not skip for skip, _ in blocks) >= 4
    namespace: dict = {}
    reward_result = None
    for skip, code in blocks:
        if not skip:
            exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 (our README)
            if "das." in code:  # the reward-guided SMC example
                reward_result = namespace["result"]
    out = namespace["out"]
    assert np.isfinite(float(namespace["annealed"].log_evidence))
    exact = namespace["gaussian"].log_evidence(namespace["problem"])
    assert abs(float(out.smc.log_evidence) - exact) < 0.3
    annealed = namespace["annealed"]
    assert annealed.particles.shape == (2048, 2)
    # The reward-SMC example (Psi-Sampler on the ring): weighted mean reward near the exact one.
    toy = namespace["toy"]
    mean_reward = float(reward_result.weights @ toy.reward(reward_result.particles.x))
    assert abs(mean_reward - toy.mean_reward) < 0.3
