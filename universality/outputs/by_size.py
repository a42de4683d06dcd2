"""Universality by dictionary size and architecture: for each SAE size of a dictionary family
(``sae.dict_sizes``), the median max activation correlation of SAE features across models beside the
within-model ceiling (two SAE seeds on one model), as one table and one figure with a line per
architecture. A run gives one line; a sweep over ``sae.arch`` (or ``sae.k``, ``sae.l1_coeff``) one per point.
The paper's A/1 point (4,096 features, 0.72 across models) is marked.
"""

from __future__ import annotations

import html
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from universality.outputs.formatting import number  # noqa: E402
from universality.outputs.report_tables import PAPER_MEDIAN_MAX_CORR  # noqa: E402
from universality.outputs.reports import Figure, render  # noqa: E402
from universality.core.run_names import is_control, sae_run_name, seed_name, summary_prefix  # noqa: E402

PAPER_A1_SIZE = 4096  # Towards Monosemanticity's A/1, whose cross-seed median is PAPER_MEDIAN_MAX_CORR["features"]
FIGURE_FILE = "universality_by_size.png"
TABLE_FILE = "universality_by_size"  # .parquet / .csv
STATISTICS = {  # column -> summary key (under the size's prefix)
    "across_models": "features.max_corr_median_mean",
    "across_ci_low": "features.max_corr_median_ci_low",
    "across_ci_high": "features.max_corr_median_ci_high",
    "ceiling": "ceiling.features.max_corr_median_mean",
    "across_over_ceiling": "ceiling_ratio.features.max_corr_median",
    "n_pairs": "features.max_corr_median_n",
    "n_ceiling_pairs": "ceiling.features.max_corr_median_n",
}
SAE_METRICS = ("l0", "fvu", "dead_fraction")  # the seeds' own SAEs of each size, averaged
COLUMNS = {"label": "string", "arch": "string", "dict_size": "int64", "primary": "bool",
           **{column: "float64" for column in (*STATISTICS, *SAE_METRICS)}}


def architecture_label(sae_cfg) -> str:
    """A line's name: the architecture with its sparsity setting ("relu l1_coeff=0.004", "topk k=32")."""
    return f"topk k={sae_cfg.k}" if sae_cfg.arch == "topk" else f"relu l1_coeff={sae_cfg.l1_coeff:g}"


def size_table(result, label: str | None = None) -> pd.DataFrame:
    """One row per dictionary size of a finished ``pipeline.RunResult``: its universality statistics
    (NaN where the summary lacks one, e.g. no ceiling) and the mean L0, FVU and dead fraction of the seeds'
    own SAEs of that size. ``label`` names the line (default: ``architecture_label``)."""
    cfg = result.cfg
    seeds = sorted({m.seed for name, m in result.models.items() if not is_control(name)})
    rows = []
    for size in cfg.sae.sizes:
        prefix = summary_prefix(None if size == cfg.sae.dict_size else size)
        own = [result.saes[name].metrics for seed in seeds if (name := sae_run_name(cfg, seed_name(seed), size)) in result.saes]
        rows.append({"label": label or architecture_label(cfg.sae), "arch": cfg.sae.arch, "dict_size": size,
                     "primary": size == cfg.sae.dict_size,
                     **{column: result.summary.get(prefix + key, np.nan) for column, key in STATISTICS.items()},
                     **{key: float(np.mean([m.get(key, np.nan) for m in own])) if own else np.nan for key in SAE_METRICS}})
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype(COLUMNS)


def size_figure(table: pd.DataFrame, title: str = "universality by dictionary size") -> Figure:
    """Median max activation correlation against dictionary size (log scale): across models (solid, with its
    seed-bootstrap interval where there is one) and the within-model ceiling (dashed), a colour per line
    label; the paper's A/1 point marked."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, rows) in enumerate(table.sort_values("dict_size").groupby("label", sort=False)):
        color = f"C{i}"
        x = rows.dict_size.to_numpy()
        ax.plot(x, rows.across_models, "-o", color=color, label=f"{label}: across models")
        if rows.across_ci_low.notna().any():
            ax.fill_between(x, rows.across_ci_low, rows.across_ci_high, color=color, alpha=0.15, linewidth=0)
        if rows.ceiling.notna().any():
            ax.plot(x, rows.ceiling, "--s", color=color, label=f"{label}: same model (ceiling)")
    paper = PAPER_MEDIAN_MAX_CORR["features"]
    ax.plot([PAPER_A1_SIZE], [paper], "*", color="black", markersize=14,
            label=f"paper A/1 vs B/1 ({PAPER_A1_SIZE:,} features): {paper}")
    sizes = sorted({*table.dict_size.tolist(), PAPER_A1_SIZE})
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.minorticks_off()
    ax.set(xlabel="dictionary size (features)", ylabel="median max activation correlation", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    return render(fig, FIGURE_FILE, title)


def size_rows(table: pd.DataFrame) -> list[dict[str, str]]:
    """The table as a reader sees it: one formatted row per line and size, the interval beside its value."""
    return [{"SAE": row.label,
             "features": f"{row.dict_size:,}" + (" (primary)" if row.primary else ""),
             "across models": number(row.across_models) + (
                 "" if np.isnan(row.across_ci_low) else f" [{number(row.across_ci_low)}, {number(row.across_ci_high)}]"),
             "same model (ceiling)": number(row.ceiling),
             "across / ceiling": number(row.across_over_ceiling),
             "pairs (across, same)": f"{number(row.n_pairs, '.0f')}, {number(row.n_ceiling_pairs, '.0f')}",
             "L0": number(row.l0, ".1f"), "FVU": number(row.fvu), "dead": number(row.dead_fraction, ".1%")}
            for row in table.itertuples()]


def size_section(table: pd.DataFrame, figure: Figure) -> str:
    """The table and figure as an HTML section of a report."""
    rows = size_rows(table)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (rows[0] if rows else {}))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row.values()) + "</tr>" for row in rows)
    return ("<h2>Universality by dictionary size</h2>"
            f"<table><tr>{head}</tr>{body}</table><p>Across models: median max activation correlation of SAE features "
            "between seeds' SAEs of the same size (mean over pairs; interval: bootstrap over seeds). Ceiling: the same "
            "between two SAEs of one model differing only in their seed. L0, FVU and dead fraction: the seeds' own SAEs. "
            f"Every size was trained on the same activations with the same SAE seed.</p>{figure.html()}")


def combined(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Several runs' tables as one (a sweep's: a line per grid point)."""
    return pd.concat(tables, ignore_index=True).astype(COLUMNS) if tables else pd.DataFrame(columns=list(COLUMNS)).astype(COLUMNS)
