"""``univ sweep``: one ``univ run`` per point of a grid of config fields, and a table and figure over them.

A grid axis is a spec ``section.field=v1,v2,...`` (a tuple-valued field takes bracketed values:
``sae.resample_fractions=[0.2,0.4],[0.1]``). Every spec is parsed and coerced to its field's type,
and every grid point's config is built and validated, before any work starts. The points run one
after another through ``pipeline.run``, so they share the stage cache: points that differ only in
SAE settings reuse the same transformers. In MLflow the sweep is one parent run (``univ.kind`` =
``sweep``) with one normal ``univ run`` parent per point nested under it; the summary table
(one row per point) and figure are artifacts of the sweep's run.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from universality import cache, export, pipeline, reports, tracking  # noqa: E402
from universality.config import ExperimentConfig  # noqa: E402
from universality.errors import ConfigError  # noqa: E402
from universality.orchestration import Engine, resolve_device  # noqa: E402

DEFAULT_STATS = ("features.max_corr_median_mean", "neurons.max_corr_median_mean", "ceiling.features.max_corr_median_mean")
STAT_LABELS = {  # the default statistics' names in the figure
    "features.max_corr_median_mean": "SAE features, across models",
    "neurons.max_corr_median_mean": "neurons, across models",
    "ceiling.features.max_corr_median_mean": "SAE features, within a model (ceiling)",
}
SAE_METRICS = ("dead_fraction", "convergence_corr_median")  # per-SAE metrics averaged over the seeds (NaN: absent)
TIMES = ("wall_seconds", "stage_seconds")
TABLE_FILE = "sweep_summary"  # <folder>/sweep_summary.{parquet,csv}
FIGURE_FILE = "sweep.png"
SUMMARY_ARTIFACTS = "summary"  # the sweep run's artifact folder holding both
MAX_SEPARATE_LINES = 4  # a panel draws one line per combination of the other axes' values up to this; else their mean
LOG_X_RATIO = 8  # a positive numeric axis spanning this factor or more is drawn on a log scale
BOOLEANS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}


@dataclass(frozen=True)
class Axis:
    """One grid axis: a config field and the values it takes, coerced to the field's type."""

    section: str
    field: str
    values: tuple[Any, ...]

    @property
    def name(self) -> str:
        return f"{self.section}.{self.field}"

    @property
    def dtype(self) -> str:
        """The column's dtype in the summary table (tuples and strings are written as text)."""
        kind = type(self.values[0])
        return {bool: "bool", int: "int64", float: "float64"}.get(kind, "string")

    def column(self, value: Any) -> Any:
        """``value`` as it appears in the summary table's column."""
        return format_value(value) if self.dtype == "string" else value


@dataclass(frozen=True)
class Point:
    """One grid point: the axis values (in grid order) and the validated config they make."""

    values: dict[str, Any]
    cfg: ExperimentConfig

    @property
    def label(self) -> str:
        return " ".join(f"{name}={format_value(value)}" for name, value in self.values.items())


def format_value(value: Any) -> str:
    """A grid value as written in a spec: ``true``, ``819200``, ``[0.2,0.4]``."""
    if isinstance(value, tuple):
        return "[" + ",".join(map(format_value, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def config_fields() -> dict[str, dict[str, Any]]:
    """section -> field -> the field's type (``int``, ``float``, ``bool``, ``str``, ``tuple[float, ...]``)."""
    sections = typing.get_type_hints(ExperimentConfig)
    return {name: typing.get_type_hints(cls) for name, cls in sections.items() if dataclasses.is_dataclass(cls)}


def split_values(text: str) -> list[str]:
    """Split on the commas outside brackets: ``"[1,2],[3]"`` -> ``["[1,2]", "[3]"]``."""
    items, depth, current = [], 0, []
    for char in text:
        depth += (char == "[") - (char == "]")
        if depth < 0:
            raise ConfigError(f"unbalanced ']' in {text!r}")
        if char == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if depth:
        raise ConfigError(f"unbalanced '[' in {text!r}")
    return [*items, "".join(current).strip()]


def coerce(text: str, kind: Any) -> Any:
    """One value of a spec, as the field's type; ConfigError (one line) when it is not one."""
    if not text:
        raise ConfigError("empty value")
    if typing.get_origin(kind) is tuple:
        if not (text.startswith("[") and text.endswith("]")):
            raise ConfigError(f"expected a bracketed list like [0.2,0.4], not {text!r}")
        inner = text[1:-1].strip()
        return tuple(coerce(item, typing.get_args(kind)[0]) for item in (split_values(inner) if inner else []))
    if kind is bool:
        if text.lower() not in BOOLEANS:
            raise ConfigError(f"expected true or false, not {text!r}")
        return BOOLEANS[text.lower()]
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"expected an integer, not {text!r}") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"expected a number, not {text!r}") from None
        if not math.isfinite(value):
            raise ConfigError(f"expected a finite number, not {text!r}")
        return value
    return text


def parse_axis(spec: str) -> Axis:
    """``section.field=v1,v2,...`` -> an Axis of distinct values of the field's type."""
    name, sep, text = spec.partition("=")
    section, dot, field = name.strip().partition(".")
    if not sep or not dot:
        raise ConfigError(f"{spec!r}: expected section.field=v1,v2,... (e.g. sae.dict_size=1024,2048)")
    fields = config_fields()
    if section not in fields:
        raise ConfigError(f"{spec!r}: unknown config section {section!r} (choose from {', '.join(fields)})")
    if field not in fields[section]:
        raise ConfigError(f"{spec!r}: unknown field {field!r} in [{section}] (choose from {', '.join(fields[section])})")
    if not text.strip():
        raise ConfigError(f"{spec!r}: empty list of values")
    try:
        values = tuple(coerce(item, fields[section][field]) for item in split_values(text))
    except ConfigError as exc:
        raise ConfigError(f"{spec!r}: {exc}") from None
    if len(set(values)) != len(values):
        raise ConfigError(f"{spec!r}: a value is repeated")
    return Axis(section, field, values)


def parse_grid(specs: Sequence[str]) -> list[Axis]:
    """Every ``--grid`` spec as an Axis; at least one, and no field twice."""
    if not specs:
        raise ConfigError("give at least one --grid section.field=v1,v2,...")
    axes = [parse_axis(spec) for spec in specs]
    names = [axis.name for axis in axes]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"grid axis {repeated[0]} is given more than once (list all its values in one --grid)")
    return axes


def grid_points(base: ExperimentConfig, axes: Sequence[Axis]) -> list[Point]:
    """The cartesian product of the axes (the first varies slowest), each point's config built and
    validated now, so a value the config rejects stops the sweep before any work."""
    points = []
    for combo in itertools.product(*(axis.values for axis in axes)):
        values = {axis.name: value for axis, value in zip(axes, combo)}
        sections: dict[str, dict[str, Any]] = {}
        for axis, value in zip(axes, combo):
            sections.setdefault(axis.section, {})[axis.field] = value
        try:
            cfg = base.replace(**sections)
        except ConfigError as exc:
            raise ConfigError(f"grid point {Point(values, base).label}: {exc}") from None
        points.append(Point(values, cfg))
    return points


def stage_seconds(result: pipeline.RunResult) -> float:
    """Build time, as recorded in the cache, of every stage a run used: what the point costs computed
    alone from scratch, one stage after another (a sweep's own wall time is less once stages are shared)."""
    folders = {result.dataset.directory, *(m.directory for m in result.models.values()),
               *(folder for s in result.saes.values() for folder in (s.directory, s.evaluation)),
               *(a.directory for a in result.activations.values()),
               *(p.directory for p in [*result.pairs, *result.replicate_pairs, result.randomized] if p is not None)}
    return sum(cache.build_seconds(folder) for folder in folders if folder is not None)


def summary_row(point: Point, result: pipeline.RunResult, seeds: Sequence[int], stats: Sequence[str],
                wall_seconds: float, run_id: str) -> dict[str, Any]:
    """One row of the summary table: the point's values, the statistics (NaN where its summary lacks
    one), the seeds' mean SAE metrics, its times and its MLflow run."""
    seed_metrics = [result.saes[f"seed{seed}"].metrics for seed in seeds]
    return {
        **point.values,
        **{stat: float(result.summary.get(stat, np.nan)) for stat in stats},
        **{key: float(np.mean([m.get(key, np.nan) for m in seed_metrics])) for key in SAE_METRICS},
        "wall_seconds": wall_seconds,
        "stage_seconds": stage_seconds(result),
        "run_id": run_id,
    }


def summary_table(axes: Sequence[Axis], rows: Sequence[Mapping[str, Any]], stats: Sequence[str]) -> pd.DataFrame:
    """Rows as a typed table: axis columns (their field's dtype), then float statistics, metrics and times, then run_id."""
    columns = {axis.name: axis.dtype for axis in axes}
    columns.update({name: "float64" for name in (*stats, *SAE_METRICS, *TIMES)})
    columns["run_id"] = "string"
    frame = pd.DataFrame([{**row, **{a.name: a.column(row[a.name]) for a in axes}} for row in rows],
                         columns=list(columns))
    return frame.astype(columns)


def format_table(table: pd.DataFrame) -> str:
    """The summary table for the terminal: statistics without their ``_mean`` suffix, 3 decimals."""
    shown = table.rename(columns=lambda c: c.removesuffix("_mean"))
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def _x_positions(axis: Axis) -> tuple[dict[Any, float], bool]:
    """Where each of the axis's values sits on the x axis, and whether the scale is logarithmic."""
    values = [axis.column(v) for v in axis.values]
    if axis.dtype in ("int64", "float64"):
        positive = min(values) > 0
        return {v: float(v) for v in values}, positive and max(values) / min(values) >= LOG_X_RATIO
    return {v: float(i) for i, v in enumerate(values)}, False


def _panel_lines(table: pd.DataFrame, axis: Axis, others: list[str], stat: str) -> list[tuple[str, pd.Series]]:
    """(label, the statistic by this axis's value) per line of a panel: one per combination of the
    other axes' values when there are few, else their mean."""
    if not others:
        return [("", table.groupby(axis.name, sort=False)[stat].mean())]
    groups = table.groupby(others, sort=False)
    if groups.ngroups > MAX_SEPARATE_LINES:
        return [(f"mean over {', '.join(others)}", table.groupby(axis.name, sort=False)[stat].mean())]
    return [(" ".join(f"{o}={format_value(v)}" for o, v in zip(others, combo if isinstance(combo, tuple) else (combo,))),
             group.set_index(axis.name)[stat]) for combo, group in groups]


def _stat_label(stat: str, table: pd.DataFrame) -> str:
    missing = " (in no point's summary)" if table[stat].isna().all() else ""
    return f"{STAT_LABELS.get(stat, stat)}{missing}"


def summary_figure(table: pd.DataFrame, axes: Sequence[Axis], stats: Sequence[str]) -> reports.Figure:
    """One panel per grid axis: each statistic (a colour) against the axis's values, one line style per
    combination of the other axes' values (or their mean, when there are many)."""
    fig, panels = plt.subplots(1, len(axes), figsize=(5 * len(axes), 3.8), squeeze=False)
    colors = {stat: f"C{i}" for i, stat in enumerate(stats)}
    styles = ("-", "--", ":", "-.")
    for ax, axis in zip(panels[0], axes):
        positions, log_x = _x_positions(axis)
        others = [a.name for a in axes if a.name != axis.name]
        labels = []
        for stat in stats:
            for (label, line), style in zip(_panel_lines(table, axis, others, stat), styles):
                ax.plot([positions[v] for v in line.index], line.to_numpy(), style, marker="o", color=colors[stat])
                labels.append((label, style))
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(list(positions.values()), [format_value(v) for v in positions], rotation=30 if len(positions) > 4 else 0)
        ax.minorticks_off()
        ax.set(xlabel=axis.name, ylabel="statistic (mean over pairs)", title=f"against {axis.name}")
        ax.grid(alpha=0.3)
        named = dict(labels)  # label -> line style, in order of first use
        if any(named):
            ax.legend(handles=[Line2D([], [], color="black", linestyle=s, label=lab) for lab, s in named.items()],
                      fontsize=7, loc="best", framealpha=0.8)
    fig.legend(handles=[Line2D([], [], color=colors[s], marker="o", label=_stat_label(s, table)) for s in stats],
               loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(stats)), fontsize=8)
    fig.tight_layout()
    return reports.render(fig, FIGURE_FILE, f"sweep over {', '.join(a.name for a in axes)}: {len(table)} points")


def write_summary(table: pd.DataFrame, figure: reports.Figure, folder: Path) -> list[Path]:
    """The summary table (Parquet and CSV) and the figure in ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    for fmt in ("parquet", "csv"):
        export.write_table(table, folder / f"{TABLE_FILE}.{fmt}", fmt)
    return [folder / f"{TABLE_FILE}.parquet", folder / f"{TABLE_FILE}.csv", reports.write_figure(figure, folder)]


@dataclass(frozen=True)
class SweepResult:
    run_id: str  # the sweep's MLflow parent run
    tracking_uri: str
    table: pd.DataFrame
    files: list[Path]  # the summary table and figure under <results>/reports/<run_id>/


def run_sweep(base: ExperimentConfig, axes: Sequence[Axis], seeds: list[int], results_dir: Path, *,
              stats: Sequence[str] = DEFAULT_STATS, device: str = "auto", engine: Engine = Engine(),
              tracking_uri: str | None = None, experiment: str, progress: bool = True,
              echo: Callable[[str], None] = lambda line: None) -> SweepResult:
    """Validate every point, then run and track each in turn under one sweep run; log the summary.
    ``echo`` receives one line per finished point."""
    points = grid_points(base, axes)
    device = resolve_device(device)
    results_dir = Path(results_dir)
    grid = {f"grid.{axis.name}": ",".join(map(format_value, axis.values)) for axis in axes}
    with tracking.tracked_sweep(results_dir, tracking_uri, experiment, base, seeds,
                                {**grid, "stats": ",".join(stats)}) as sweep:
        rows = []
        for i, point in enumerate(points, 1):
            tags = {"univ.grid_point": point.label, **{f"univ.grid.{k}": format_value(v) for k, v in point.values.items()}}
            with tracking.tracked_run(results_dir, tracking_uri, experiment, point.cfg, seeds, parent_run_id=sweep.run_id,
                                      run_name=point.label, tags=tags) as tracker:
                start = time.perf_counter()
                result = pipeline.run(point.cfg, seeds, results_dir, device=device, progress=progress, engine=engine)
                wall = time.perf_counter() - start
                tracker.log_result(result)
            rows.append(summary_row(point, result, seeds, stats, wall, tracker.run_id))
            shown = ", ".join(f"{stat.removesuffix('_mean')} {rows[-1][stat]:.3f}" for stat in stats)
            echo(f"[{i}/{len(points)}] {point.label}: {shown} ({wall:.1f} s, MLflow run {tracker.run_id})")
        table = summary_table(axes, rows, stats)
        files = write_summary(table, summary_figure(table, axes, stats), results_dir / "reports" / sweep.run_id)
        for path in files:
            sweep.client.log_artifact(sweep.run_id, str(path), SUMMARY_ARTIFACTS)
    return SweepResult(sweep.run_id, sweep.client.tracking_uri, table, files)


def load_summary(client, run_id: str) -> pd.DataFrame:
    """The summary table logged on a sweep's run, with its dtypes."""
    artifact = {"table": f"{SUMMARY_ARTIFACTS}/{TABLE_FILE}.parquet"}
    with tracking.downloaded(client, run_id, artifact, "sweep summary table") as paths:
        return pd.read_parquet(paths["table"])
