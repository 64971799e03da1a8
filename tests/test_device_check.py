"""experiments/device_check.py: the quick set runs end to end as a script and gives every planned
row a figure; a row that raises, is skipped, or starts after the budget gives its note while the
others still run; the decode speed formula. Timings are never asserted (numbers on this CPU mean
nothing): only that they are positive finite numbers."""
import datetime
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from smollm2 import needs_model

from experiments import device_check as dc

ROOT = pathlib.Path(__file__).resolve().parents[1]


def table_rows(text: str) -> list[list[str]]:
    """The cells of each body row of the Markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| item | setting |"), lines[0]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[1:]]


def positive(cell: str) -> bool:
    value = float(cell.replace(",", ""))
    return math.isfinite(value) and value > 0


@needs_model
def test_quick_script_has_every_row(tmp_path):
    """`python experiments/device_check.py --quick` (run as a file, so that its own path setup
    is tested): exit 0, the table with every planned row in order, each with ours and its compile
    time, none failed or skipped; the header names the device, jax and the date."""
    out = tmp_path / "check.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "device_check.py"), "--quick", "--out",
         str(out)], check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout
    expected = [(c.item, c.setting) for c in dc.plan(dc.parse(["--quick"]))]
    assert {item for item, _ in expected} == set(dc.ITEMS)
    rows = table_rows(text)
    assert [(r[0], r[1]) for r in rows] == expected
    for row in rows:
        assert row[7] == "", row   # note: no failure, no skip
        assert positive(row[3]) and positive(row[6]), row   # ours, compile s
    by_item = {row[0]: row for row in rows}
    # the rows with a reference give it with its ratio
    for item in ("power", "fkc"):
        assert by_item[item][4].split(": ")[0] in ("plain sampling", "bare reverse SDE")
        assert positive(by_item[item][4].split(": ")[1]) and positive(by_item[item][5].split()[0])
    # no GPU here: the transformers column says why it is empty
    assert by_item["decode"][4].startswith("n/a: JAX runs on cpu")
    head = text.split("\n")[0]
    assert jax.devices()[0].device_kind in head and f"jax {jax.__version__}" in head
    assert datetime.date.today().isoformat() in head


def test_forced_failure_leaves_the_other_rows(tmp_path, capsys):
    """`--fail resampling`: that row reads "failed: ..." and the next item still runs; exit 1."""
    out = tmp_path / "check.md"
    status = dc.main(["--quick", "--items", "resampling", "fkc", "--fail", "resampling",
                      "--out", str(out)])
    assert status == 1
    rows = table_rows(out.read_text())
    assert [r[0] for r in rows] == ["resampling", "fkc"]
    assert rows[0][7] == "failed: RuntimeError: forced by --fail resampling"
    assert rows[0][3] == ""
    assert rows[1][7] == "" and positive(rows[1][3])
    assert "forced by --fail resampling" in capsys.readouterr().err   # the progress log


def check(item, run):
    return dc.Check(item, f"{item} setting", "ms", "peer", "ours / peer", run)


def test_guard_skip_and_budget():
    """Each kind of outcome, in one pass: a figure, an error (its first line, '|' kept out of
    the table), an expected skip, and rows not started once the budget is spent."""
    clock = iter(range(100))
    slow = lambda: dc.Measured(next(clock) + 1.0)

    def boom():
        raise ValueError("bad | value\nsecond line")

    def absent():
        raise dc.Skipped("gemma3-270m not installed")

    rows = dc.run_checks([check("a", slow), check("b", boom), check("c", absent)], budget_s=60)
    assert [r.note for r in rows] == ["", "failed: ValueError: bad | value",
                                      "skipped: gemma3-270m not installed"]
    assert rows[0].measured.ours == 1.0
    text = dc.to_markdown(rows, "n/a")
    assert "failed: ValueError: bad / value |" in text   # the cell cannot split the row
    assert len(table_rows(text)) == 3 and all(len(r) == len(dc.COLUMNS) for r in table_rows(text))

    def spend():   # makes the budget run out: the rows after it are not started
        import time
        time.sleep(0.05)
        return dc.Measured(1.0)

    never = lambda: pytest.fail("a row started after the budget was spent")
    rows = dc.run_checks([check("a", spend), check("b", never), check("c", never)],
                         budget_s=0.01)
    assert rows[0].note == ""
    assert [r.note for r in rows[1:]] == ["skipped: the 0.01 s budget (--budget-s) was spent"] * 2


def test_once_keeps_the_value_or_the_error():
    calls = []

    @dc.once
    def load():
        calls.append(1)
        raise OSError("no such file")

    for _ in range(3):
        with pytest.raises(OSError, match="no such file"):
            load()
    assert len(calls) == 1   # a failed model load is not retried by each of its rows


def test_decode_speed_uses_median_times(monkeypatch):
    """B x (n - 1) / (median t_n - median t_1), exactly, on made-up times; an error when t_n is
    not above t_1 (too few tokens to time), rather than a huge or negative speed."""
    times = iter([1.0, 2.0, 1.1, 2.1, 5.0, 2.2])   # (t_1, t_n) per repeat: an outlier t_1
    monkeypatch.setattr(dc, "seconds", lambda fn: next(times))
    assert dc.decode_speed(None, None, batch=4, new_tokens=11, repeats=3) == pytest.approx(
        4 * 10 / (2.1 - 1.1), rel=1e-12)
    times = iter([1.0, 0.9])
    with pytest.raises(ValueError, match="too few new tokens"):
        dc.decode_speed(None, None, batch=1, new_tokens=2, repeats=1)


def test_options(tmp_path):
    args = dc.parse(["--quick"])
    assert args.models == ["smollm2-135m"] and args.dtypes == ["float32"]
    args = dc.parse([])
    assert args.models == list(dc.MODELS) and args.dtypes == ["bfloat16"]
    assert args.budget_s == dc.DEFAULT_BUDGET_S
    # the full plan: decode at B = 1, 16, 64, 256 for both models, one row each of the rest
    full = dc.plan(args)
    assert [c.item for c in full].count("decode") == 8
    assert [c.setting for c in full if c.item == "fkc"] == [
        "FKC, digits score network, N=16384, 100 steps, beta 2, ESS < N/2"]
    assert [c.setting for c in full if c.item == "resampling"] == ["systematic, N=1e+07"]
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"")
    assert dc.parse(["--gguf", f"gemma3-270m={gguf}"]).gguf == {"gemma3-270m": str(gguf)}
    for bad in (["--gguf", "llama=x.gguf"], ["--gguf", f"gemma3-270m={tmp_path / 'none'}"],
                ["--budget-s", "0"], ["--items", "nothing"]):
        with pytest.raises(SystemExit):
            dc.parse(bad)
