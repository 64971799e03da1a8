"""The benchmarks: each module registers a `Benchmark` (`experiments.harness.registry`) when
imported. `resampling`, `tempering` (vs blackjax), `overhead` (SMC over bare propagation), `fkc`
(FKC over the bare reverse SDE), `power` (Power-SMC latency on SmolLM2), `decode` and
`decode-gemma3` (our transformer vs transformers on SmolLM2 and Gemma 3 270M).

    python -m experiments bench NAME [options]            # or python -m experiments.benchmarks.NAME
    python -m experiments bench --all --readme README.md  # every one; rewrites the README block
"""
