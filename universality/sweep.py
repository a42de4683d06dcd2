"""``univ sweep``: one ``univ run`` per point of a grid of config fields, and a table and figure over them.

The grid (``universality.grid``) is parsed, and every point's config built and validated, before any
work starts. The points run one after another through ``pipeline.run``, so they share the stage
cache: points that differ only in SAE settings reuse the same transformers. In MLflow the sweep is
one parent run (``univ.kind`` = ``sweep``) with one normal ``univ run`` parent per point nested
under it; the summary table (one row per point) and figure are artifacts of the sweep's run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from universality.outputs import by_size, reports  # noqa: E402
from universality.runtime import cache  # noqa: E402
from universality import pipeline  # noqa: E402
from universality.core.run_names import seed_name  # noqa: E402
from universality.outputs.run_files import write_table_and_figure  # noqa: E402
from universality.publish import publish  # noqa: E402
from universality.runtime.memory import check_memory  # noqa: E402
from universality.tracking.lookups import downloaded  # noqa: E402
from universality.tracking.names import metric_name  # noqa: E402
from universality.tracking.tracker import tracked_run, tracked_sweep  # noqa: E402
from universality.core.grid import Axis, Point, format_value  # noqa: E402
from universality.runtime.engine import Engine, resolve_device  # noqa: E402

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


def stage_seconds(result: pipeline.RunResult) -> float:
    """Build time, as recorded in the cache, of every stage a run used: what the point costs computed
    alone from scratch, one stage after another (a sweep's own wall time is less once stages are shared)."""
    return sum(cache.build_seconds(folder) for folder in result.stage_folders)


def summary_value(summary: Mapping[str, Any], stat: str) -> float:
    """A statistic of a run's summary by its internal key (``features.max_corr_median_mean``) or by its
    MLflow metric name (``Universality/features_median_max_corr``); NaN when the summary lacks it."""
    if stat not in summary:
        summary = {metric_name(key): value for key, value in summary.items()}
    return float(summary.get(stat, np.nan))


def summary_row(point: Point, result: pipeline.RunResult, seeds: Sequence[int], stats: Sequence[str],
                wall_seconds: float, run_id: str) -> dict[str, Any]:
    """One row of the summary table: the point's values, the statistics (NaN where its summary lacks
    one), the seeds' mean SAE metrics, its times and its MLflow run."""
    seed_metrics = [result.saes[seed_name(seed)].metrics for seed in seeds]
    return {
        **point.values,
        **{stat: summary_value(result.summary, stat) for stat in stats},
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


def write_summary(table: pd.DataFrame, figure: reports.Figure, folder: Path, name: str = TABLE_FILE) -> list[Path]:
    """A summary table ``name`` (Parquet and CSV) and its figure in ``folder``, each written atomically."""
    return write_table_and_figure(table, name, figure, folder, folder)


@dataclass(frozen=True)
class SweepResult:
    run_id: str  # the sweep's MLflow parent run
    tracking_uri: str
    experiment_id: str
    table: pd.DataFrame
    files: list[Path]  # the summary table and figure under <results>/reports/<run_id>/


def run_sweep(axes: Sequence[Axis], points: Sequence[Point], seeds: list[int], results_dir: Path, *,
              stats: Sequence[str] = DEFAULT_STATS, device: str = "auto", engine: Engine = Engine(),
              tracking_uri: str | None = None, experiment: str, progress: bool = True,
              echo: Callable[[str], None] = lambda line: None) -> SweepResult:
    """Run and track each point (from ``grid.grid_points``: validated) in turn under one sweep run. The
    summary table and figure are rewritten and logged after every point, so a sweep stopped part way
    keeps the points it finished. ``echo`` receives one line per finished point."""
    device = resolve_device(device)
    for point in points:
        check_memory(point.cfg, device)
    results_dir = Path(results_dir)
    grid = {f"grid.{axis.name}": ",".join(map(format_value, axis.values)) for axis in axes}
    with tracked_sweep(results_dir, tracking_uri, experiment, points[0].cfg, seeds,
                                {**grid, "stats": ",".join(stats)}) as sweep:
        folder = results_dir / "reports" / sweep.run_id
        rows, size_tables = [], []
        for i, point in enumerate(points, 1):
            tags = {"univ.grid_point": point.label, **{f"univ.grid.{k}": format_value(v) for k, v in point.values.items()}}
            with tracked_run(results_dir, tracking_uri, experiment, point.cfg, seeds, parent_run_id=sweep.run_id,
                             run_name=point.label, tags=tags) as tracker:
                start = time.perf_counter()
                result = pipeline.run(point.cfg, seeds, results_dir, device=device, progress=progress, engine=engine)
                wall = time.perf_counter() - start
                publish(tracker, result)
            rows.append(summary_row(point, result, seeds, stats, wall, tracker.run_id))
            table = summary_table(axes, rows, stats)
            files = write_summary(table, summary_figure(table, axes, stats), folder)
            if len(point.cfg.sae.sizes) > 1:  # a dictionary family: universality by size, a line per point
                size_tables.append(by_size.size_table(result, label=point.label))
                sizes = by_size.combined(size_tables)
                files += write_summary(sizes, by_size.size_figure(sizes, "universality by dictionary size, per grid point"),
                                       folder, by_size.TABLE_FILE)
            for path in files:
                sweep.client.log_artifact(sweep.run_id, str(path), SUMMARY_ARTIFACTS)
            shown = ", ".join(f"{stat.removesuffix('_mean')} {rows[-1][stat]:.3f}" for stat in stats)
            echo(f"[{i}/{len(points)}] {point.label}: {shown} ({wall:.1f} s, MLflow run {tracker.run_id})")
    return SweepResult(sweep.run_id, sweep.client.tracking_uri, sweep.experiment_id, table, files)


def load_summary(client, run_id: str) -> pd.DataFrame:
    """The summary table logged on a sweep's run, with its dtypes."""
    artifact = {"table": f"{SUMMARY_ARTIFACTS}/{TABLE_FILE}.parquet"}
    with downloaded(client, run_id, artifact, "sweep summary table") as paths:
        return pd.read_parquet(paths["table"])
