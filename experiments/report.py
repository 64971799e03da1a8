"""Reports from a results file: tables of metrics (mean ± std over seeds) and plots.

    python -m experiments report results.jsonl [--out DIR] [--x num_particles] [--metric abs_error]

For each experiment in the file, records are grouped by config (every seed of a config together);
the Markdown table shows the config keys that vary, the number of seeds, and each metric's mean ±
standard deviation over seeds. Plots show a metric against the particle count (or another config
key, `--x`) and against compute (mean run time), one line per value of the other varying keys,
error bars one standard deviation over seeds; log Z plots also draw the exact value when known.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from experiments import config as config_lib
from experiments import registry
from experiments import store as store_lib

TIME_KEYS = ("run_time_s", "compile_time_s", "wall_time_s")


class Stat(NamedTuple):
    mean: float
    std: float
    n: int

    def text(self) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1 or not math.isfinite(self.std) or self.std == 0:
            return _num(self.mean)
        return f"{_num(self.mean)} ± {_num(self.std, 2)}"


class Row(NamedTuple):
    """One config: its values of the varying keys, its seeds, and a Stat per metric."""

    values: dict[str, Any]
    seeds: list[int]
    stats: dict[str, Stat]


class Table(NamedTuple):
    experiment: str
    keys: list[str]          # varying config keys
    fixed: dict[str, Any]    # config keys with one value throughout
    metrics: list[str]
    rows: list[Row]

    def header(self) -> list[str]:
        return [*self.keys, "seeds", *self.metrics]

    def cells(self) -> list[list[str]]:
        return [[*(str(r.values[k]) for k in self.keys), str(len(r.seeds)),
                 *(r.stats[m].text() if m in r.stats else "-" for m in self.metrics)]
                for r in self.rows]


def _num(x: float, digits: int = 4) -> str:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, str)


def scalar_metrics(records: Sequence[dict]) -> list[str]:
    """Names of numeric (or bool) metrics, in order of first appearance."""
    names: dict[str, None] = {}
    for record in records:
        for name, value in record.get("metrics", {}).items():
            if _is_number(value):
                names.setdefault(name)
    return list(names)


def _stat(values: list[float]) -> Stat:
    values = [float(v) for v in values]
    if not values:
        return Stat(float("nan"), float("nan"), 0)
    array = np.asarray(values, np.float64)
    same = bool(np.all(array == array[0]))  # e.g. an exact value: no spread from rounding
    std = float(array.std(ddof=1)) if array.size > 1 and not same else 0.0
    return Stat(float(array.mean()), std, int(array.size))


def table(records: Sequence[dict], metrics: Sequence[str] | None = None,
          times: bool = True) -> Table:
    """Aggregate the records of one experiment over seeds (see the module docstring)."""
    if not records:
        raise ValueError("no records")
    name = records[0]["experiment"]
    configs = [r.get("config", {}) for r in records]
    all_keys = list(dict.fromkeys(k for c in configs for k in c))
    keys = [k for k in all_keys
            if len({config_lib.canonical(c.get(k)) for c in configs}) > 1]
    fixed = {k: configs[0].get(k) for k in all_keys if k not in keys}
    available = scalar_metrics(records)
    if metrics is None:
        metrics = _default_metrics(name, available)
    else:
        metrics = [m for m in metrics if m in available or m in TIME_KEYS]
    if times:
        metrics = [*metrics, *(t for t in ("run_time_s", "compile_time_s") if t not in metrics)]
    groups: dict[str, list[dict]] = {}
    for record in records:
        groups.setdefault(config_lib.canonical(record.get("config", {})), []).append(record)
    rows = []
    for members in groups.values():
        stats = {}
        for metric in metrics:
            values = [v for v in (_metric(r, metric) for r in members) if _is_number(v)]
            if metric == "compile_time_s":  # paid once per config: show the total
                stats[metric] = Stat(float(sum(values)), float("nan"), len(values))
            else:
                stats[metric] = _stat(values)
        rows.append(Row({k: members[0]["config"].get(k) for k in keys},
                        sorted(r.get("seed", 0) for r in members), stats))
    rows.sort(key=lambda row: [_sort_key(row.values[k]) for k in keys])
    return Table(name, keys, fixed, list(metrics), rows)


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if _is_number(value) else (1, 0, str(value))


def _metric(record: dict, name: str) -> Any:
    return record[name] if name in TIME_KEYS else record.get("metrics", {}).get(name)


def _default_metrics(name: str, available: list[str]) -> list[str]:
    try:
        experiment = registry.get(name)
    except config_lib.ConfigError:
        experiment = None
    wanted = list(experiment.summary_metrics) if experiment is not None else []
    chosen = [m for m in wanted if m in available]
    return chosen or available[:8]


def markdown(tab: Table) -> str:
    header = tab.header()
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < len(tab.keys) else "--:" for i in range(len(header)))
             + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in tab.cells()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(tab: Table, x: str) -> dict[str, list[Row]]:
    """Rows split into lines by the varying keys other than x."""
    others = [k for k in tab.keys if k != x]
    lines: dict[str, list[Row]] = {}
    for row in tab.rows:
        label = ", ".join(f"{k}={row.values[k]}" for k in others) or tab.experiment
        lines.setdefault(label, []).append(row)
    return lines


def plot(tab: Table, records: Sequence[dict], metric: str, x: str, path: pathlib.Path,
         along: str | None = None) -> bool:
    """metric (mean ± std over seeds) against config key x, or against compute if x is a time
    key ("run_time_s"; then the config key `along` varies along each line). False (and no file)
    when there is nothing to draw."""
    plt = _pyplot()
    against_time = x in TIME_KEYS
    if not against_time and x not in tab.keys:
        return False
    stat_tab = table(records, [metric] + ([x] if against_time else []), times=against_time)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    positive = True
    series = _series(stat_tab, along if against_time else x)
    for index, (label, rows) in enumerate(series.items()):
        if against_time and rows:
            # each config is one point at its mean run time; join them in order of that time
            rows = sorted(rows, key=lambda r: r.stats[x].mean)
        xs = [r.stats[x].mean if against_time else r.values[x] for r in rows]
        ys = [r.stats[metric].mean for r in rows]
        es = [r.stats[metric].std for r in rows]
        good = [i for i, (a, b) in enumerate(zip(xs, ys))
                if _is_number(a) and _is_number(b) and math.isfinite(b)]
        if not good:
            continue
        xs, ys, es = ([v[i] for i in good] for v in (xs, ys, es))
        positive = positive and all(v > 0 for v in ys) and all(v > 0 for v in xs)
        lower = [min(e, 0.95 * y) if y > 0 else e for e, y in zip(es, ys)]
        if not against_time and len(series) > 1 and all(v > 0 for v in xs):
            # nudge the lines apart (multiplicatively: the axis is logarithmic) so bars don't hide
            xs = [v * 1.04 ** (index - (len(series) - 1) / 2) for v in xs]
        ax.errorbar(xs, ys, yerr=[lower, es], marker="o", ms=4, capsize=3, label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return False
    if all(_is_number(r.values.get(x, 1)) for r in stat_tab.rows) or against_time:
        xs_all = [r.stats[x].mean if against_time else r.values[x] for r in stat_tab.rows]
        if all(_is_number(v) and v > 0 for v in xs_all):
            ax.set_xscale("log")
            if not against_time:  # label the grid's own values
                ticks = sorted(set(xs_all))
                ax.set_xticks(ticks, [_num(float(t)) for t in ticks])
                ax.minorticks_off()
            if positive and metric != "log_evidence":
                ax.set_yscale("log")
    if metric == "log_evidence":
        exact = {r["metrics"].get("exact_log_evidence") for r in records}
        exact = [e for e in exact if _is_number(e)]
        if len(exact) == 1:
            ax.axhline(exact[0], color="k", ls="--", lw=1, label="exact")
    if metric == "abs_error" and x == "num_particles" and positive:
        first = stat_tab.rows[0]
        n0, e0 = first.values[x], first.stats[metric].mean
        ns = np.array(sorted({r.values[x] for r in stat_tab.rows}), float)
        ax.plot(ns, e0 * np.sqrt(n0 / ns), color="gray", ls=":", lw=1, label="$\\propto N^{-1/2}$")
    ax.set_xlabel("mean run time per seed (s)" if against_time else x)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"{tab.experiment}: {metric}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# The whole report
# ---------------------------------------------------------------------------------------------


class Report(NamedTuple):
    markdown_path: pathlib.Path
    plots: list[pathlib.Path]
    tables: list[Table]
    contents: store_lib.Contents


def _plot_metrics(name: str, records: Sequence[dict], requested: Sequence[str] | None) -> list:
    available = scalar_metrics(records)
    if requested:
        return [m for m in requested if m in available]
    try:
        experiment = registry.get(name)
        demo_metrics = list(experiment.demo.plot_metrics) if experiment.demo else []
    except config_lib.ConfigError:
        demo_metrics = []
    chosen = [m for m in dict.fromkeys(["log_evidence", *demo_metrics]) if m in available]
    if "log_evidence" in chosen and "exact_log_evidence" not in available:
        chosen.remove("log_evidence")
    if not any(m != "log_evidence" for m in chosen):
        chosen += [m for m in ("abs_error",) if m in available] or available[:1]
    return list(dict.fromkeys(chosen))


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def write(results: str | os.PathLike, out_dir: str | os.PathLike | None = None,
          x: str | None = None, metrics: Sequence[str] | None = None,
          title: str | None = None) -> Report:
    """Write report.md and PNG plots for every experiment in the results file into out_dir
    (default: a folder named after the results file, next to it)."""
    results = pathlib.Path(results)
    contents = store_lib.read(results)
    if not contents.records:
        raise store_lib.StoreError(0, f"no finished records in {str(results)!r}")
    out = pathlib.Path(out_dir) if out_dir is not None else results.with_suffix("")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise store_lib.StoreError(error.errno, f"cannot write the report to {str(out)!r}: "
                                                f"{error.strerror or error}") from None
    by_experiment: dict[str, list[dict]] = {}
    for record in contents.records:
        by_experiment.setdefault(record.get("experiment", "?"), []).append(record)

    lines = [f"# {title or 'Results'}", "",
             (f"From `{results}`: {len(contents.records)} records, "
              f"{len(by_experiment)} experiment(s).")]
    if contents.torn_tail or contents.bad_lines or contents.duplicates:
        lines.append(f"Skipped: {int(contents.torn_tail)} torn final line, "
                     f"{contents.bad_lines} unparseable line(s), "
                     f"{contents.duplicates} duplicate(s).")
    env = contents.records[-1]
    if "device" in env:
        device, versions = env["device"], env.get("versions", {})
        lines.append(f"Device: {device.get('platform')} ({device.get('kind')}) x"
                     f"{device.get('count')}; " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                                            if v) + ".")
    plots: list[pathlib.Path] = []
    tables = []
    for name, records in by_experiment.items():
        tab = table(records)
        tables.append(tab)
        lines += ["", f"## {name}", ""]
        try:
            lines += [registry.get(name).description, ""]
        except config_lib.ConfigError:
            pass
        if tab.fixed:
            lines += ["Fixed: " + ", ".join(f"`{k}={v}`" for k, v in tab.fixed.items()), ""]
        lines += [markdown(tab), ""]
        key = x or ("num_particles" if "num_particles" in tab.keys else
                    (tab.keys[0] if tab.keys else None))
        for metric in _plot_metrics(name, records, metrics):
            for against in ([key] if key else []) + ["run_time_s"]:
                if against == "run_time_s" and (metric == "log_evidence" or not tab.keys):
                    continue
                path = out / f"{_safe(name)}_{_safe(metric)}_vs_{_safe(against)}.png"
                if plot(tab, records, metric, against, path, along=key):
                    plots.append(path)
                    lines.append(f"![{name}: {metric} vs {against}]({path.name})")
        try:
            extra = registry.get(name).plots
        except config_lib.ConfigError:
            extra = None
        if extra is not None:
            _pyplot()
            for path in extra(records, out):
                path = pathlib.Path(path)
                plots.append(path)
                lines.append(f"![{name}: {path.stem}]({path.name})")
    markdown_path = out / "report.md"
    markdown_path.write_text("\n".join(lines) + "\n")
    return Report(markdown_path, plots, tables, contents)
