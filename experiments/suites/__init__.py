"""The experiment suites: each module registers its experiments (`experiments.harness.registry`)
when imported. `toys` (LGSSM, tempering), `fkc` and `das` (2-D Gaussian mixtures with exact
answers), `lm` (SmolLM2: Power-SMC and twisted SMC; prompts in `data/`) and `digits` (8x8
digits with a shipped score network and classifier)."""
