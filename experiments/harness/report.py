"""Reports from a results file: tables of metrics (mean ± std over seeds) and plots.

    python -m experiments report results.jsonl [--out DIR] [--x num_particles] [--metric abs_error]

For each experiment in the file, records are grouped by config (every seed of a config together);
the Markdown table shows the config keys that vary, the number of seeds, and each metric's mean ±
standard deviation over seeds. Plots show a metric against one config key (`--x`, else the
experiment's demo `x`, else the particle count): one labelled series per value of the other
varying keys, lines over a numeric key, grouped bars over a categorical one (a method, a bool);
and against compute (mean run time per seed) as a scatter, each config a point labelled by its
value of that key, never joined by lines (run times are noisy). Error bars are one standard
deviation over seeds; log Z plots also draw the exact value when known. Records lacking a field
(e.g. an older file without run times) show "-" there; lines that are not records are skipped
and said.
"""
from __future__ import annotations

import math
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from experiments.harness import config as config_lib
from experiments.harness import registry
from experiments.harness import store as store_lib

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


def varying_keys(records: Sequence[dict]) -> list[str]:
    """Config keys whose value differs between records (in order of first appearance)."""
    configs = [r.get("config", {}) for r in records]
    all_keys = dict.fromkeys(k for c in configs for k in c)
    return [k for k in all_keys if len({config_lib.canonical(c.get(k)) for c in configs}) > 1]


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
    name = records[0].get("experiment", "?")
    configs = [r.get("config", {}) for r in records]
    all_keys = list(dict.fromkeys(k for c in configs for k in c))
    keys = varying_keys(records)
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
        rows.append(Row({k: members[0].get("config", {}).get(k) for k in keys},
                        sorted(r.get("seed", 0) for r in members), stats))
    rows.sort(key=lambda row: [_sort_key(row.values[k]) for k in keys])
    return Table(name, keys, fixed, list(metrics), rows)


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if _is_number(value) else (1, 0, str(value))


def _metric(record: dict, name: str) -> Any:
    # records written before a time key existed lack it: "-" in tables, no point in plots
    return record.get(name) if name in TIME_KEYS else record.get("metrics", {}).get(name)


def _registered(name: str) -> registry.Experiment | None:
    """The experiment of that name, or None (a file may hold an unregistered plug-in's)."""
    try:
        return registry.get(name)
    except config_lib.ConfigError:
        return None


def _default_metrics(name: str, available: list[str]) -> list[str]:
    experiment = _registered(name)
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


def is_numeric_axis(values: Sequence[Any]) -> bool:
    """Values an axis can place by number (bools and strings are categories)."""
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                for v in values)


def series_label(values: dict[str, Any]) -> str:
    """'k1=v1, k2=v2': the legend label of the configs sharing these values."""
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _first_seen(records: Sequence[dict], key: str) -> dict[str, int]:
    """canonical value of config key -> rank of its first appearance (the grid's own order)."""
    ranks: dict[str, int] = {}
    for record in records:
        ranks.setdefault(config_lib.canonical(record.get("config", {}).get(key)), len(ranks))
    return ranks


def _series(tab: Table, records: Sequence[dict], x: str | None) -> dict[str, list[Row]]:
    """Rows grouped by every varying key other than x, one labelled series each, in the order
    the records first show them; a single series is labelled by the experiment."""
    others = [k for k in tab.keys if k != x]
    ranks = {k: _first_seen(records, k) for k in others}
    rows = sorted(tab.rows, key=lambda r: [ranks[k][config_lib.canonical(r.values[k])]
                                           for k in others])
    series: dict[str, list[Row]] = {}
    for row in rows:
        label = series_label({k: row.values[k] for k in others}) or tab.experiment
        series.setdefault(label, []).append(row)
    return series


def _has_value(row: Row, metric: str) -> bool:
    return bool(row.stats[metric].n) and math.isfinite(row.stats[metric].mean)


def _finite(rows: Sequence[Row], metric: str) -> list[Row]:
    return [r for r in rows if _has_value(r, metric)]


def _errors(rows: Sequence[Row], metric: str) -> list[float]:
    return [r.stats[metric].std if math.isfinite(r.stats[metric].std) else 0.0 for r in rows]


def plot(tab: Table, records: Sequence[dict], metric: str, x: str, path: pathlib.Path,
         along: str | None = None) -> bool:
    """metric (mean ± std over seeds) against config key x, one labelled series per value of the
    other varying keys: lines over a numeric x, grouped bars over a categorical one (strings,
    bools). With x a time key ("run_time_s") it is a scatter instead, never lines: each config
    one point, annotated with its value of the config key `along`, one labelled series per value
    of the other keys. False (and no file) when there is nothing to draw."""
    if x in TIME_KEYS:
        fig = _time_figure(tab, records, metric, x, along)
    elif x in tab.keys:
        fig = _key_figure(tab, records, metric, x)
    else:
        return False
    if fig is None:
        return False
    plt = _pyplot()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _key_figure(tab: Table, records: Sequence[dict], metric: str, x: str):
    plt = _pyplot()
    stat_tab = table(records, [metric], times=False)
    series = _series(stat_tab, records, x)
    numeric = is_numeric_axis([r.values[x] for r in stat_tab.rows])
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = (_lines if numeric else _bars)(ax, stat_tab, records, series, metric, x)
    if not drawn:
        plt.close(fig)
        return None
    # the exact value, when the records carry one (exact_log_evidence, exact_mean_reward, ...)
    exact = {r.get("metrics", {}).get(f"exact_{metric}") for r in records}
    exact = [e for e in exact if _is_number(e) and math.isfinite(e)]
    if len(exact) == 1:
        ax.axhline(exact[0], color="k", ls="--", lw=1, label="exact")
    ax.set_xlabel(x)
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"{tab.experiment}: {metric}")
    ax.grid(alpha=0.3, which="major", axis="y" if not numeric else "both")
    _legend(ax)
    return fig


def _legend(ax) -> None:
    """A legend when it tells something: several series, or a series and a reference line."""
    if len(ax.get_legend_handles_labels()[1]) > 1:
        ax.legend(fontsize=7)


def _lines(ax, stat_tab: Table, records: Sequence[dict], series: dict[str, list[Row]],
           metric: str, x: str) -> bool:
    """One line per series over a numeric x, ticks at the grid's own values."""
    every = sorted({r.values[x] for r in stat_tab.rows})
    log_x = all(v > 0 for v in every) and len(every) > 1 and every[-1] / every[0] >= 4
    drawn = []
    for index, (label, rows) in enumerate(series.items()):
        rows = sorted(_finite(rows, metric), key=lambda r: r.values[x])
        if not rows:
            continue
        xs = [r.values[x] for r in rows]
        ys = [r.stats[metric].mean for r in rows]
        es = _errors(rows, metric)
        if log_x and len(series) > 1:
            # nudge the series apart (multiplicatively: the axis is logarithmic) so error bars
            # do not hide each other
            xs = [v * 1.04 ** (index - (len(series) - 1) / 2) for v in xs]
        lower = [min(e, 0.95 * y) if y > 0 else e for e, y in zip(es, ys)]
        ax.errorbar(xs, ys, yerr=[lower, es], marker="o", ms=4, capsize=3, label=label)
        drawn += ys
    if not drawn:
        return False
    positive = all(y > 0 for y in drawn)
    if log_x:
        ax.set_xscale("log")
        if positive and max(drawn) / min(drawn) >= 10:  # a decade at least: labelled ticks
            ax.set_yscale("log")
    if metric == "abs_error" and x == "num_particles" and log_x and positive:
        first = min(_finite(stat_tab.rows, metric), key=lambda r: r.values[x])
        n0, e0 = first.values[x], first.stats[metric].mean
        ns = np.geomspace(every[0], every[-1], 50)
        ax.plot(ns, e0 * np.sqrt(n0 / ns), color="gray", ls=":", lw=1, label="$\\propto N^{-1/2}$")
    # the grid's own values and no others; integers (particle counts) written out in full
    ax.set_xticks(every, [str(v) if isinstance(v, int) else _num(float(v)) for v in every])
    ax.minorticks_off()
    if len(every) > 6:
        ax.tick_params(axis="x", labelrotation=45)
    return True


def _bars(ax, stat_tab: Table, records: Sequence[dict], series: dict[str, list[Row]],
          metric: str, x: str) -> bool:
    """Grouped bars: one group per category of x (in the grid's order), one bar per series."""
    ranks = _first_seen(records, x)
    categories = sorted({config_lib.canonical(r.values[x]): r.values[x]
                         for r in stat_tab.rows}.items(), key=lambda item: ranks[item[0]])
    position = {canonical: i for i, (canonical, _) in enumerate(categories)}
    width = 0.8 / len(series)
    drawn, missing = False, []
    for index, (label, rows) in enumerate(series.items()):
        shift = (index - (len(series) - 1) / 2) * width
        missing += [position[config_lib.canonical(r.values[x])] + shift
                    for r in rows if not _has_value(r, metric)]
        rows = _finite(rows, metric)
        if not rows:
            continue
        xs = [position[config_lib.canonical(r.values[x])] + shift for r in rows]
        ax.bar(xs, [r.stats[metric].mean for r in rows], width * 0.95,
               yerr=_errors(rows, metric), capsize=3, label=label, color=f"C{index % 10}")
        drawn = True
    if not drawn:
        return False
    for at in missing:  # a config without this metric: said, not left as a silent gap
        ax.text(at, 0.04, "n/a", ha="center", va="bottom", fontsize=7, color="gray",
                transform=ax.get_xaxis_transform(),
                bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.set_xlim(-0.5, len(categories) - 0.5)
    names = [str(value) for _, value in categories]
    rotate = max(len(n) for n in names) * len(names) > 50  # would collide written flat
    ax.set_xticks(range(len(names)), names, rotation=25 if rotate else 0,
                  ha="right" if rotate else "center")
    ax.axhline(0, color="k", lw=0.6)
    return True


def _time_figure(tab: Table, records: Sequence[dict], metric: str, x: str, along: str | None):
    """metric against mean time per seed: a scatter (times are noisy and belong to configs, not
    to an ordered axis), error bars one std over seeds both ways, each point labelled."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    stat_tab = table(records, [metric, x], times=False)
    along = along if along in stat_tab.keys else None
    series = _series(stat_tab, records, along)
    fig, ax = plt.subplots(figsize=(6, 4))
    times, names = [], []
    for index, (label, rows) in enumerate(series.items()):
        rows = [r for r in _finite(_finite(rows, metric), x) if r.stats[x].mean > 0]
        if not rows:
            continue
        xs = [r.stats[x].mean for r in rows]
        ys = [r.stats[metric].mean for r in rows]
        xes = _errors(rows, x)
        left = [min(e, 0.95 * t) for e, t in zip(xes, xs)]  # a time is positive
        ax.errorbar(xs, ys, xerr=[left, xes], yerr=_errors(rows, metric), fmt="o", ms=5,
                    capsize=3, color=f"C{index % 10}", label=label)
        if along is not None:
            names += [(str(r.values[along]), xy, f"C{index % 10}")
                      for r, xy in zip(rows, zip(xs, ys))]
        times += xs
    if len(times) < 2:
        plt.close(fig)
        return None
    log_x = max(times) / min(times) >= 8
    if log_x:
        ax.set_xscale("log")
    middle = math.sqrt(max(times) * min(times)) if log_x else (max(times) + min(times)) / 2
    for text, xy, color in names:  # written inwards, so the outermost stay inside the axes
        right = xy[0] > middle
        ax.annotate(text, xy, xytext=(-4 if right else 4, 4), textcoords="offset points",
                    ha="right" if right else "left", fontsize=7, color=color)
    ax.margins(x=0.08, y=0.08)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _num(float(v), 2)))
    ax.xaxis.set_minor_formatter(NullFormatter())  # decade-less minor labels collide
    ax.set_xlabel(f"mean {x.removesuffix('_s').replace('_', ' ')} per seed (s)")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"{tab.experiment}: {metric} against {x}"
                 + (f"\n(points labelled by {along})" if along else ""), fontsize=10)
    ax.grid(alpha=0.3, which="major")
    _legend(ax)
    return fig


# ---------------------------------------------------------------------------------------------
# The whole report
# ---------------------------------------------------------------------------------------------


class Report(NamedTuple):
    markdown_path: pathlib.Path
    plots: list[pathlib.Path]
    tables: list[Table]
    contents: store_lib.Contents
    notes: list[str]              # what was skipped or repaired in reading (also in report.md)


def is_record(value: dict) -> bool:
    """Whether a JSON object from a results file has a record's shape (see runner)."""
    return (isinstance(value.get("experiment"), str) and isinstance(value.get("config"), dict)
            and isinstance(value.get("metrics"), dict))


def _available_metrics(records: Sequence[dict]) -> list[str]:
    """Numeric metrics, then the time keys the records have: what --metric may name."""
    times = [t for t in TIME_KEYS if any(_is_number(r.get(t)) for r in records)]
    return [*scalar_metrics(records), *times]


def _plot_metrics(name: str, records: Sequence[dict], requested: Sequence[str] | None) -> list:
    if requested:
        available = _available_metrics(records)
        return [m for m in dict.fromkeys(requested) if m in available]
    available = scalar_metrics(records)
    experiment = _registered(name)
    demo = experiment.demo if experiment is not None else None
    demo_metrics = list(demo.plot_metrics) if demo is not None else []
    chosen = [m for m in dict.fromkeys(["log_evidence", *demo_metrics]) if m in available]
    if "log_evidence" in chosen and "exact_log_evidence" not in available:
        chosen.remove("log_evidence")
    if not any(m != "log_evidence" for m in chosen):
        chosen += [m for m in ("abs_error",) if m in available] or available[:1]
    return list(dict.fromkeys(chosen))


def _particles_key(name: str) -> str | None:
    experiment = _registered(name)
    return experiment.particles_key if experiment is not None else "num_particles"


def _axis_key(name: str, tab: Table, x: str | None) -> str | None:
    """The config key the plots put on the horizontal axis: --x, else the experiment's demo x,
    else its particle count, else the first key that varies (None when none varies)."""
    experiment = _registered(name)
    demo_x = experiment.demo.x if experiment is not None and experiment.demo else None
    for key in (x, demo_x, _particles_key(name)):
        if key in tab.keys:
            return key
    return tab.keys[0] if tab.keys else None


def _check_request(results: pathlib.Path, tables: Sequence[Table],
                   by_experiment: dict[str, list[dict]], x: str | None,
                   metrics: Sequence[str] | None) -> None:
    """ConfigError naming a --x or --metric that nothing in the file has, and what it has."""
    if x is not None and not any(x in tab.keys for tab in tables):
        varying = "; ".join(f"{tab.experiment}: {', '.join(tab.keys) or '(none)'}"
                            for tab in tables)
        every = [k for tab in tables for k in tab.keys]
        why = ("has one value in every experiment of" if any(x in tab.fixed for tab in tables)
               else "is no config key in")
        hint = config_lib.suggest(x, every)
        raise config_lib.ConfigError(f"--x {x!r} {why} {str(results)!r}{hint}; config keys that "
                                     f"vary: {varying}")
    available = list(dict.fromkeys(m for records in by_experiment.values()
                                   for m in _available_metrics(records)))
    for metric in metrics or ():
        if metric not in available:
            raise config_lib.ConfigError(
                f"--metric {metric!r}: no numeric metric of that name in {str(results)!r}"
                f"{config_lib.suggest(metric, available)}; available: {', '.join(available)}")


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _reading_notes(contents: store_lib.Contents, not_records: int, unterminated: bool) -> list:
    notes = []
    if contents.torn_tail:
        notes.append("skipped a torn final line (an interrupted write)")
    if contents.bad_lines:
        notes.append(f"skipped {contents.bad_lines} unparseable line(s)")
    if not_records:
        notes.append(f"skipped {not_records} line(s) that are not records (no experiment, "
                     f"config and metrics)")
    if contents.duplicates:
        notes.append(f"skipped {contents.duplicates} duplicate record(s) (kept the first)")
    if unterminated:
        notes.append("counted the final record, which lacks its newline (the next writer to "
                     "the file adds it)")
    return notes


def write(results: str | os.PathLike, out_dir: str | os.PathLike | None = None,
          x: str | None = None, metrics: Sequence[str] | None = None,
          title: str | None = None) -> Report:
    """Write report.md and PNG plots for every experiment in the results file into out_dir
    (default: a folder named after the results file, next to it).

    ConfigError, before anything is written, if `x` is no config key that varies in the file or
    a metric in `metrics` is no numeric metric (or time) of its records.
    """
    results = pathlib.Path(results)
    contents = store_lib.read(results)
    found = list(contents.records)
    tail = contents.unterminated
    ids = {r.get("id") for r in found}
    unterminated = tail is not None and is_record(tail) and tail.get("id") not in ids
    found += [tail] if unterminated else []
    records = [r for r in found if is_record(r)]
    notes = _reading_notes(contents, len(found) - len(records), unterminated)
    if not records:
        raise store_lib.StoreError(0, f"no finished records in {str(results)!r}"
                                      + (f" ({'; '.join(notes)})" if notes else ""))
    by_experiment: dict[str, list[dict]] = {}
    for record in records:
        by_experiment.setdefault(record["experiment"], []).append(record)
    tables = [table(members) for members in by_experiment.values()]
    _check_request(results, tables, by_experiment, x, metrics)

    out = pathlib.Path(out_dir) if out_dir is not None else results.with_suffix("")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise store_lib.StoreError(error.errno, f"cannot write the report to {str(out)!r}: "
                                                f"{error.strerror or error}") from None
    lines = [f"# {title or 'Results'}", "",
             (f"From `{results}`: {len(records)} records, "
              f"{len(by_experiment)} experiment(s).")]
    if notes:
        lines.append("Reading the file: " + "; ".join(notes) + ".")
    env = records[-1]
    if isinstance(env.get("device"), dict):
        device, versions = env["device"], env.get("versions", {})
        lines.append(f"Device: {device.get('platform')} ({device.get('kind')}) x"
                     f"{device.get('count')}; " + ", ".join(f"{k} {v}" for k, v in versions.items()
                                                            if v) + ".")
    plots: list[pathlib.Path] = []
    for tab, (name, members) in zip(tables, by_experiment.items()):
        lines += ["", f"## {name}", ""]
        experiment = _registered(name)
        if experiment is not None:
            lines += [experiment.description, ""]
        if tab.fixed:
            lines += ["Fixed: " + ", ".join(f"`{k}={v}`" for k, v in tab.fixed.items()), ""]
        lines += [markdown(tab), ""]
        key = _axis_key(name, tab, x)
        # compute points are labelled by the particle count when it varies (the cost knob)
        along = _particles_key(name) if _particles_key(name) in tab.keys else key
        for metric in _plot_metrics(name, members, metrics):
            against = [key] if key else []
            if key and metric not in TIME_KEYS and metric != "log_evidence":
                against.append("run_time_s")  # compute: a labelled scatter
            for axis in against:
                path = out / f"{_safe(name)}_{_safe(metric)}_vs_{_safe(axis)}.png"
                if plot(tab, members, metric, axis, path, along=along):
                    plots.append(path)
                    lines.append(f"![{name}: {metric} vs {axis}]({path.name})")
        if experiment is not None and experiment.plots is not None:
            _pyplot()
            for path in experiment.plots(members, out):
                path = pathlib.Path(path)
                plots.append(path)
                lines.append(f"![{name}: {path.stem}]({path.name})")
    markdown_path = out / "report.md"
    markdown_path.write_text("\n".join(lines) + "\n")
    return Report(markdown_path, plots, tables, contents, notes)
