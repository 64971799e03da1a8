"""The experiments command line, its typed configs and its crash-safe results store.

End-to-end tests run `python -m experiments` in subprocesses at tiny sizes; they share one
persistent JAX compilation cache so that the same tiny program is compiled once.
"""
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from experiments.__main__ import main
from experiments.harness import config as config_lib
from experiments.harness import registry, runner, store
from experiments.harness.store import ResultStore, StoreError
from tests.cpu_devices import forced_cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ["num_steps=10"]  # the lgssm size every subprocess test shares (with the quick demo)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax-cache")
    # one device (a forced count would put the demo's particles on a mesh); quick compile kept
    return forced_cpu_env(1, JAX_COMPILATION_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT),
                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def cli(args, env, cwd=None, timeout=120, check=None):
    proc = subprocess.run([sys.executable, "-m", "experiments", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if check is not None:
        assert proc.returncode == check, proc.stdout + proc.stderr
    return proc


def lines_of(path):
    data = pathlib.Path(path).read_bytes()
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode().splitlines()]


def record(rid, **extra):
    return {"id": rid, "experiment": "x", "config": {}, "seed": 0, "metrics": {"v": 1.0}, **extra}


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


def test_store_ignores_and_repairs_a_torn_final_line(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultStore(path) as s:
        assert s.append(record("a")) and s.append(record("b"))
        assert not s.append(record("a"))  # a finished id is never written twice
    # A writer killed mid-record leaves its first bytes, without the newline.
    full = (json.dumps(record("c")) + "\n").encode()
    with open(path, "ab") as f:
        f.write(full[: len(full) // 2])
    contents = store.read(path)
    assert [r["id"] for r in contents.records] == ["a", "b"] and contents.torn_tail
    with ResultStore(path) as s:
        assert s.ids == {"a", "b"}
        assert s.append(record("c"))  # truncates the torn tail first
    assert [r["id"] for r in lines_of(path)] == ["a", "b", "c"]
    # A complete line that does not parse is skipped and counted, never fatal.
    with open(path, "ab") as f:
        f.write(b"\x00\x00not json\n")
    contents = store.read(path)
    assert [r["id"] for r in contents.records] == ["a", "b", "c"] and contents.bad_lines == 1
    # A torn tail that happens to parse is still ignored: only newline-ended lines count.
    with open(path, "ab") as f:
        f.write(json.dumps(record("d")).encode())
    assert "d" not in {r["id"] for r in store.read(path).records}


def test_store_survives_a_kill_during_the_write(tmp_path):
    # The child writes half of the record's bytes, then dies by SIGKILL before the rest.
    path = tmp_path / "r.jsonl"
    with ResultStore(path) as s:
        s.append(record("a"))
    child = f"""
import os, signal
from experiments.harness.store import ResultStore
s = ResultStore({str(path)!r})
real = os.write
def torn(fd, data):
    real(fd, bytes(data)[: len(data) // 2])
    os.kill(os.getpid(), signal.SIGKILL)
os.write = torn
s.append({record("big", metrics={"trace": list(range(5000))})!r})
"""
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True,
                          check=False)
    assert proc.returncode == -signal.SIGKILL
    data = path.read_bytes()
    assert not data.endswith(b"\n")  # the torn line is there
    assert [r["id"] for r in store.read(path).records] == ["a"]
    with ResultStore(path) as s:
        assert s.ids == {"a"}
        s.append(record("big"))
    assert [r["id"] for r in lines_of(path)] == ["a", "big"]


def test_store_refuses_an_unwritable_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot write results"):
        ResultStore(blocker / "r.jsonl")
    with pytest.raises(StoreError, match="is a directory"):
        ResultStore(tmp_path)


# ---------------------------------------------------------------------------------------------
# Configs and the command line, in process (no SMC runs)
# ---------------------------------------------------------------------------------------------


def test_typed_overrides_and_files(tmp_path):
    lgssm = registry.get("lgssm")
    cfg = config_lib.build(lgssm.config_type, {"num_steps": 20},
                           ["num_particles=64", "ess_threshold=1", "resampling=multinomial"])
    assert (cfg.num_particles, cfg.num_steps, cfg.ess_threshold, cfg.resampling) == (
        64, 20, 1.0, "multinomial")
    assert isinstance(cfg.ess_threshold, float)
    toml = tmp_path / "c.toml"
    toml.write_text("num_particles = 128\nresampling = 'stratified'\n")
    cfg = config_lib.build(lgssm.config_type, config_lib.load_file(toml), ["num_particles=32"])
    assert (cfg.num_particles, cfg.resampling) == (32, "stratified")
    with pytest.raises(config_lib.ConfigError, match="num_particles=1.5 is not an int"):
        config_lib.build(lgssm.config_type, {"num_particles": 1.5})
    assert runner.parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    points = runner.expand(lgssm, grid={"num_particles": ["32", 64]}, seeds=[0, 1])
    assert len(points) == 4 and len({p.id for p in points}) == 4
    assert runner.varying_keys(points) == ["num_particles"]


PLUGIN = """
import dataclasses
from experiments import Experiment, param, register


@dataclasses.dataclass(frozen=True)
class Config:
    num_particles: int = param(10, "particles", low=1)
    scale: float = param(1.0, "a scale", low=0.0, low_open=True)

    def check(self):
        if self.num_particles > 100 and self.scale > 10:
            raise ValueError("scale > 10 needs num_particles <= 100")


def run(config, key, mesh=None):
    return {"value": config.scale * config.num_particles, "trace": [1, 2, 3]}


register(Experiment(name="plugin_probe", description="a plug-in registered from outside",
                    config_type=Config, run=run))
"""


def test_an_experiment_plugs_in_by_registering(tmp_path, monkeypatch, capsys):
    (tmp_path / "plugin_probe_module.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["--import", "plugin_probe_module", "list"]) == 0
        listing = capsys.readouterr().out
        assert re.search(r"^plugin_probe +a plug-in registered from outside", listing, re.MULTILINE)
        grid_file = tmp_path / "grid.toml"
        grid_file.write_text("seeds = [3, 4]\n[config]\nscale = 2\n[grid]\n"
                             "num_particles = [1, 5]\n")
        out = tmp_path / "r.jsonl"
        assert main(["sweep", "plugin_probe", "--grid-file", str(grid_file), "--out",
                     str(out)]) == 0
        records = lines_of(out)
        assert sorted((r["config"]["num_particles"], r["seed"], r["metrics"]["value"])
                      for r in records) == [(1, 3, 2.0), (1, 4, 2.0), (5, 3, 10.0), (5, 4, 10.0)]
        capsys.readouterr()
        assert main(["run", "plugin_probe", "num_particles=200", "scale=20"]) == 2
        assert "scale > 10 needs num_particles <= 100" in capsys.readouterr().err
    finally:
        registry._REGISTRY.pop("plugin_probe", None)


@pytest.mark.parametrize("args, message", [
    (["run", "lgssm", "num_particle=5"],
     "unknown config key 'num_particle' (did you mean 'num_particles'?)"),
    (["run", "lgssm", "num_particles=abc"], "num_particles='abc' is not an int"),
    (["run", "lgssm", "num_particles=0"], "num_particles=0 is out of range: must be >= 1"),
    (["run", "lgssm", "ess_threshold=2"],
     "ess_threshold=2.0 is out of range: must be >= 0.0, <= 1.0"),
    (["run", "lgssm", "resampling=systemic"], "resampling='systemic' is not a valid choice"),
    (["run", "lgssm", "num_particles"], "expected key=value"),
    (["run", "tempering", "target_ess=0"], "target_ess=0.0 is out of range: must be > 0.0"),
    (["run", "lgssm", "--seeds", "a,b"], "seeds='a,b'"),
    (["run", "lgssm", "--config", "/nonexistent.toml"], "cannot read config file"),
    (["sweep", "lgssm", "--grid", "num_particles=8,0"], "num_particles=0 is out of range"),
    (["sweep", "lgssm", "--grid", "bogus=1,2"], "unknown config key 'bogus'"),
    (["sweep", "lgssm", "--grid", "num_particles="], "no empty value"),
    (["sweep", "lgssm", "num_particles=4", "--grid", "num_particles=8,16"],
     "'num_particles' is given both as a fixed value"),
    (["run", "lgsm"], "unknown experiment 'lgsm' (did you mean 'lgssm'?); registered: "),
    (["demo", "--only", "nope"], "unknown experiment 'nope'"),
])
def test_bad_arguments_give_a_clear_message_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_unwritable_or_missing_paths_exit_1(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["sweep", "lgssm", "num_particles=8", "--out", str(blocker / "r.jsonl")]) == 1
    assert f"cannot write results to '{blocker / 'r.jsonl'}'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 1
    assert "no results file" in capsys.readouterr().err
    good = tmp_path / "good.jsonl"
    with ResultStore(good) as s:
        s.append(record("a"))
    assert main(["report", str(good), "--out", str(blocker / "report")]) == 1
    assert "cannot write the report" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The command line end to end, in subprocesses
# ---------------------------------------------------------------------------------------------


def test_list_names_every_experiment_and_its_keys(env, capsys):
    listed = cli(["list"], env, check=0).stdout.splitlines()
    names = [line.split()[0] for line in listed]
    assert names[:2] == ["lgssm", "tempering"] and all(len(line.split()) > 3 for line in listed)
    assert main(["list", "lgssm"]) == 0
    shown = capsys.readouterr().out
    assert "ess_threshold" in shown and "one of killing, multinomial" in shown


def test_cli_run_sweep_report(tmp_path, env):

    run = cli(["run", "lgssm", *TINY, "num_particles=32", "--seeds", "0,1",
               "--out", str(tmp_path / "run.jsonl")], env, check=0)
    assert "abs_error" in run.stdout and "log_evidence" in run.stdout
    (first, second) = lines_of(tmp_path / "run.jsonl")
    assert first["compile_time_s"] > 0 and second["compile_time_s"] == 0  # compiled once
    for key in ("config", "seed", "metrics", "versions", "device", "wall_time_s", "run_time_s"):
        assert key in first
    assert first["versions"]["jax"] and first["device"]["platform"] == "cpu"

    out = tmp_path / "sweep.jsonl"
    sweep = ["sweep", "lgssm", *TINY, "--grid", "num_particles=32,128", "--seeds", "0,1",
             "--out", str(out)]
    proc = cli(sweep, env, check=0)
    assert "4 to run" in proc.stdout and "num_particles" in proc.stdout
    records = lines_of(out)
    assert sorted((r["config"]["num_particles"], r["seed"]) for r in records) == [
        (32, 0), (32, 1), (128, 0), (128, 1)]
    exact = {r["metrics"]["exact_log_evidence"] for r in records}
    assert len(exact) == 1 and all(r["metrics"]["abs_error"] < 5 for r in records)

    report_dir = tmp_path / "report"
    proc = cli(["report", str(out), "--out", str(report_dir)], env, check=0)
    text = (report_dir / "report.md").read_text()
    assert "| num_particles | seeds |" in text and "![lgssm: abs_error vs num_particles]" in text
    pngs = {p.name for p in report_dir.glob("*.png")}
    assert {"lgssm_abs_error_vs_num_particles.png", "lgssm_log_evidence_vs_num_particles.png",
            "lgssm_abs_error_vs_run_time_s.png"} <= pngs
    assert all((report_dir / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_sweep_resumes_after_kill_9(tmp_path, env):
    out = tmp_path / "sweep.jsonl"
    seeds = "0-24"
    args = ["sweep", "lgssm", *TINY, "--grid", "num_particles=32,128", "--seeds", seeds,
            "--out", str(out)]
    expected = {p.id for p in runner.expand(registry.get("lgssm"), overrides=TINY,
                                            grid={"num_particles": ["32", "128"]},
                                            seeds=runner.parse_seeds(seeds))}
    assert len(expected) == 50
    for delay in (0.0, 0.05):  # kill as soon as a point is written, then a little later
        before = out.read_bytes().count(b"\n") if out.exists() else 0
        with open(tmp_path / "log.txt", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "experiments", *args], cwd=ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if out.exists() and out.read_bytes().count(b"\n") > before:
                    break
                time.sleep(0.01)
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the sweep finished before it was killed"
        written = store.read(out)
        assert written.bad_lines == 0 and written.duplicates == 0
        assert 0 < len(written.records) < 50
    done = len(store.read(out).records)
    proc = cli(args, env, check=0)
    assert f"{done} already done, {50 - done} to run" in proc.stdout
    records = lines_of(out)  # every line parses, and the file ends with a newline
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 50 and set(ids) == expected


def test_particles_are_sharded_over_several_devices(tmp_path, env):
    env = forced_cpu_env(2, base=env)
    out = tmp_path / "mesh.jsonl"
    cli(["run", "lgssm", *TINY, "num_particles=32", "--out", str(out)], env, check=0)
    (record,) = lines_of(out)
    assert record["mesh_devices"] == 2 and record["device"]["count"] == 2
    assert abs(record["metrics"]["error"]) < 5


def test_no_mesh_when_the_particles_do_not_split(monkeypatch):
    import jax

    lgssm = registry.get("lgssm")
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    assert runner.auto_mesh(lgssm, lgssm.config_type(num_particles=33)) is None
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    assert runner.auto_mesh(lgssm, lgssm.config_type(num_particles=32)) is None


def test_demo_quick(tmp_path, env):
    out = tmp_path / "demo"
    proc = cli(["demo", "--quick", "--out", str(out)], env, check=0, timeout=400)
    demos = [e.name for e in registry.all_experiments() if e.demo is not None]
    for name in demos:
        assert name in proc.stdout
    assert "demo finished" in proc.stdout and "exact_log_evidence" in proc.stdout
    records = lines_of(out / "results.jsonl")
    assert {r["experiment"] for r in records} == set(demos)
    assert all(r["metrics"]["abs_error"] < 5 for r in records
               if r["experiment"] in ("lgssm", "tempering"))
    for r in records:  # Power-SMC on SmolLM2 (skipped by its module when the model is absent)
        if r["experiment"] == "power_smollm2":
            m = r["metrics"]
            assert 0.0 <= m["accuracy"] <= 1.0 and m["logp_per_token"] < 0.0
            assert m["tokens_generated"] >= 1 and m["lm_evals"] >= m["tokens_generated"]
    assert (out / "report.md").exists() and (out / "tempering_schedule.png").exists()
    assert (out / "lgssm_abs_error_vs_num_particles.png").exists()
