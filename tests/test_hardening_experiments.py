"""The experiments harness never gives a silent wrong answer and never loses a record.

The results store keeps every complete record (only a torn, unparseable tail is dropped, and it
says so), refuses a second writer, and `run --out` saves each record as it finishes; seed ranges
are bounded; `report` names a bad --x or --metric and reads old records; plots draw one labelled
series per configuration of the other keys, bars for a categorical axis and run time only as a
labelled scatter. Most tests use a plug-in experiment without SMC (no compilation).
"""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from experiments.__main__ import main
from experiments.harness import registry, report, runner, store
from experiments.harness.config import ConfigError
from experiments.harness.store import ResultStore, StoreError

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROBE = "hardening_probe"
PROBE_MODULE = "hardening_probe_module"

PLUGIN = """
import dataclasses
import os
import signal

import numpy as np

from experiments import Demo, Experiment, Plan, param, register


@dataclasses.dataclass(frozen=True)
class Config:
    num_particles: int = param(16, "particles", low=1)
    method: str = param("smc", "method", choices=("smc", "best_of_n"))
    kill_at_seed: int = param(-1, "SIGKILL the process when run with this seed (-1: never)")


def run(config, key, mesh=None):
    seed = int(np.asarray(key)[-1])  # PRNGKey(seed) holds [0, seed]
    if seed == config.kill_at_seed:
        os.kill(os.getpid(), signal.SIGKILL)
    bonus = 1.0 if config.method == "smc" else 0.0
    return {"value": config.num_particles / (1 + seed) + bonus, "label": "text"}


register(Experiment(name="hardening_probe", description="a plug-in without SMC",
                    config_type=Config, run=run,
                    demo=Demo(full=Plan(), quick=Plan(), columns=("value",), x="method",
                              plot_metrics=("value",))), replace=True)
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / f"{PROBE_MODULE}.py").write_text(PLUGIN)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))


def probe(*args: str) -> list[str]:
    """argv of the command line with the plug-in imported."""
    return ["--import", PROBE_MODULE, *args]


def seeds_in(path: pathlib.Path) -> list[int]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line)["seed"] for line in data.decode().splitlines()]


def record(rid: str, **extra) -> dict:
    return {"id": rid, "experiment": "x", "config": {}, "seed": 0, "metrics": {"v": 1.0},
            **extra}


def child_env(plugin_dir: pathlib.Path) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(plugin_dir)]),
                JAX_PLATFORMS="cpu")


# ---------------------------------------------------------------------------------------------
# 1. The results store never deletes a complete record; a second writer is refused
# ---------------------------------------------------------------------------------------------


def test_a_final_record_without_its_newline_survives_the_next_sweep(plugin_dir, tmp_path,
                                                                     capsys):
    out = tmp_path / "r.jsonl"
    assert main(probe("sweep", PROBE, "--seeds", "0-3", "--out", str(out))) == 0
    with open(out, "r+b") as f:  # `truncate -s -1`: the last record loses its newline
        f.truncate(out.stat().st_size - 1)
    capsys.readouterr()
    assert main(probe("sweep", PROBE, "--seeds", "4", "--out", str(out))) == 0
    assert seeds_in(out) == [0, 1, 2, 3, 4]
    assert "newline" in capsys.readouterr().err  # the repair is said, not silent


def test_only_a_torn_unparseable_tail_is_dropped_and_said_on_stderr(tmp_path, capfd):
    path = tmp_path / "r.jsonl"
    with ResultStore(path) as s:
        s.append(record("a"))
    line = json.dumps(record("b")).encode()
    with open(path, "ab") as f:
        f.write(line[:-3])  # a writer killed mid-record: not a complete record
    with ResultStore(path) as s:
        assert s.ids == {"a"}
        s.append(record("c"))
    err = capfd.readouterr().err
    assert f"dropped a torn final line ({len(line) - 3} bytes" in err and str(path) in err
    assert [r["id"] for r in store.read(path).records] == ["a", "c"]


HOLDER = """
import sys
from experiments.harness.store import ResultStore
store = ResultStore(sys.argv[1])
print("held", flush=True)
sys.stdin.read()  # hold the file until the test kills this process
"""


def test_a_second_writer_on_the_same_file_is_refused(plugin_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    # Linux flock(2) locks belong to an open file description: a second open() of the same file,
    # even in this process, gets its own description and so its own (refused) lock attempt.
    with ResultStore(out), pytest.raises(StoreError, match="in use by another writer"):
        ResultStore(out)
    with ResultStore(out):  # released on close
        pass
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT,
                              env=child_env(plugin_dir), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(probe("sweep", PROBE, "--seeds", "0-2", "--out", str(out))) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "in use by another writer" in err and str(out) in err
        assert out.read_bytes() == b""  # nothing was run into a file another process owns
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases the lock of a killed holder
        holder.wait()
    assert main(probe("sweep", PROBE, "--seeds", "0-2", "--out", str(out))) == 0
    assert seeds_in(out) == [0, 1, 2]


def test_run_out_keeps_each_record_as_it_finishes(plugin_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments", *probe("run", PROBE, "kill_at_seed=2",
                                                     "--seeds", "0-3", "--out", str(out))],
        cwd=ROOT, env=child_env(plugin_dir), capture_output=True, text=True, timeout=120,
        check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert seeds_in(out) == [0, 1]


def test_run_out_says_which_records_were_already_in_the_file(plugin_dir, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert main(probe("run", PROBE, "--seeds", "0,1", "--out", str(out))) == 0
    assert "appended 2 records to" in capsys.readouterr().out
    assert main(probe("run", PROBE, "--seeds", "1,2", "--out", str(out))) == 0
    assert "appended 1 record to" in capsys.readouterr().out.replace("\n", " ")
    assert seeds_in(out) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------
# 2. Seeds
# ---------------------------------------------------------------------------------------------


def test_seed_ranges_are_bounded_with_a_clear_message(capsys):
    assert len(runner.parse_seeds(f"0-{runner.MAX_SEEDS - 1}")) == runner.MAX_SEEDS
    with pytest.raises(ConfigError, match=r"--seeds '0-100000' names 100,001 seeds; at most "
                                          r"100,000"):
        runner.parse_seeds("0-100000")
    with pytest.raises(ConfigError, match="at most 100,000"):
        runner.parse_seeds("0-60000,70000-129999")
    with pytest.raises(ConfigError, match="--seeds '5-3': the range 5-3 is empty"):
        runner.parse_seeds("5-3")
    start = time.perf_counter()
    assert main(["run", "lgssm", "--seeds", "0-99999999"]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.startswith("error: --seeds '0-99999999' names 100,000,000 seeds"), err


# ---------------------------------------------------------------------------------------------
# 3. report: bad --x / --metric, old records, a failing --import
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def sweep_file(plugin_dir, tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(probe("sweep", PROBE, "--grid", "num_particles=32,128", "--grid",
                      "method=smc,best_of_n", "--seeds", "0,1", "--out", str(out))) == 0
    return out


def test_report_rejects_an_unknown_x_or_metric_naming_the_available_ones(sweep_file, capsys):
    capsys.readouterr()
    assert main(probe("report", str(sweep_file), "--x", "nosuch")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --x 'nosuch'") and "method, num_particles" in err, err
    assert main(probe("report", str(sweep_file), "--x", "kill_at_seed")) == 2
    assert "one value" in capsys.readouterr().err
    assert main(probe("report", str(sweep_file), "--metric", "valeu")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --metric 'valeu'") and "did you mean 'value'" in err, err
    assert "value, run_time_s" in err
    assert main(probe("report", str(sweep_file), "--x", "method", "--metric", "run_time_s")) == 0
    assert (sweep_file.with_suffix("") / f"{PROBE}_run_time_s_vs_method.png").exists()


def test_report_reads_records_without_run_time_s(tmp_path, capsys):
    path = tmp_path / "old.jsonl"
    lines = [{"id": f"{n}-{seed}", "experiment": "old", "config": {"num_particles": n},
              "seed": seed, "metrics": {"abs_error": 1.0 / n + seed}}
             for n in (32, 128) for seed in (0, 1)]
    lines.append({"id": "junk", "metrics": [1, 2]})  # a JSON object that is no record
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["report", str(path), "--out", str(tmp_path / "rep")]) == 0
    captured = capsys.readouterr()
    assert "1 line(s) that are not records" in captured.out, captured.out
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| num_particles | seeds | abs_error | run_time_s | compile_time_s |" in text
    assert "| 32 | 2 | 0.5312 ± 0.71 | - | - |" in text
    assert (tmp_path / "rep" / "old_abs_error_vs_num_particles.png").exists()


@pytest.mark.parametrize("body, message", [
    ("x = 1 / 0\n", "ZeroDivisionError: division by zero"),
    ("import no_such_dependency_xyz\n", "No module named 'no_such_dependency_xyz'"),
    ("def broken(:\n", "SyntaxError"),
])
def test_a_failing_import_module_is_a_one_line_error(tmp_path, monkeypatch, capsys, body,
                                                     message):
    name = f"failing_plugin_{abs(hash(body))}"
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--import", name, "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot import experiment module {name!r}: ") and \
        message in err and err.count("\n") == 1, err
    assert f"{name}.py" in err  # where it failed


# ---------------------------------------------------------------------------------------------
# 4. Plots
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
    """Every figure the report saves, by file name (the PNGs are written as usual)."""
    saved: dict[str, Figure] = {}
    real = Figure.savefig

    def spy(fig, path, *args, **kwargs):
        saved[pathlib.Path(path).name] = fig
        return real(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return saved


def legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def test_plots_draw_one_labelled_series_per_method_and_bars_for_categories(sweep_file, figures,
                                                                          tmp_path):
    written = report.write(sweep_file, tmp_path / "rep")
    names = {p.name for p in written.plots}
    # The plug-in's demo names `method` as its x: a categorical axis, drawn as bars, one
    # labelled bar series per particle count.
    (ax,) = figures[f"{PROBE}_value_vs_method.png"].axes
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bars) == 2 and all(len(b) == 2 for b in bars)
    assert legend_labels(ax) == ["num_particles=32", "num_particles=128"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["smc", "best_of_n"]
    # A numeric axis: one line per method, each labelled.
    written = report.write(sweep_file, tmp_path / "rep-n", x="num_particles")
    (ax,) = figures[f"{PROBE}_value_vs_num_particles.png"].axes
    assert legend_labels(ax) == ["method=smc", "method=best_of_n"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "128"]
    assert f"{PROBE}_value_vs_method.png" in names


def test_run_time_is_a_labelled_scatter_not_a_line_across_configs(sweep_file, figures,
                                                                  tmp_path):
    report.write(sweep_file, tmp_path / "rep", x="num_particles")
    (ax,) = figures[f"{PROBE}_value_vs_run_time_s.png"].axes
    joined = [line for line in ax.get_lines()
              if len(line.get_xdata()) > 1 and line.get_linestyle() not in ("None", "")]
    assert not joined, "run time points must not be joined by a line"
    assert legend_labels(ax) == ["method=smc", "method=best_of_n"]
    assert sorted(t.get_text() for t in ax.texts) == ["128", "128", "32", "32"]
    assert "num_particles" in ax.get_title() + ax.get_xlabel()
    # no overlapping minor tick labels (e.g. 3.2e-1, 3.3e-1, ...): the minor ticks are unlabeled
    assert not any(t.get_text() for t in ax.get_xticklabels(minor=True))


def test_demo_experiments_with_a_categorical_x_get_their_plot(tmp_path, figures):
    # das_ring's demo compares methods (x="method"): today that plot was silently dropped and
    # only a line over run time, joining the methods, was drawn.
    lines = [{"id": f"{m}-{s}", "experiment": "das_ring",
              "config": {"method": m, "num_particles": 64}, "seed": s, "run_time_s": 0.1 + s,
              "compile_time_s": 0.0, "metrics": {"mean_reward": -1.0 - s, "sw": 0.1 * (s + 1)}}
             for m in ("reward_smc", "best_of_n") for s in (0, 1)]
    path = tmp_path / "das.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    registry.get("das_ring")
    written = report.write(path, tmp_path / "rep")
    assert {p.name for p in written.plots} >= {"das_ring_mean_reward_vs_method.png",
                                               "das_ring_sw_vs_method.png"}
    (ax,) = figures["das_ring_mean_reward_vs_method.png"].axes
    assert [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["reward_smc", "best_of_n"]


def test_a_missing_third_party_package_names_the_experiments_extra(monkeypatch):
    import importlib

    from experiments.harness import registry
    from experiments.harness.config import ConfigError
    real = importlib.import_module

    def without_flax(name, *args, **kwargs):
        if name == registry.MODULES[0]:
            raise ModuleNotFoundError("No module named 'flax'", name="flax")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(importlib, "import_module", without_flax)
    with pytest.raises(ConfigError, match=r"smc-scaling\[experiments\]"):
        registry.load()
