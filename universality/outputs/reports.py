"""Correlation reports: the paper's universality figures and self-contained HTML pages.

Per pair of seeds: the histogram of each feature's max activation correlation with the other
seed (SAE features vs neurons vs randomly rotated neurons: the paper's universality figure),
density vs max correlation, activation vs logit-weight correlation of matched features, and
the correlation block of the best-matched features. Per run: the same histogram over all
pairs, the headline numbers beside the paper's, and cards of the most and least universal
features, ranked by contextual correlation (each feature's current-token mean removed, so the top is not a
list of token detectors), and the features' and neurons' token shares. Every figure is a PNG file and is embedded (base64) in the HTML, so one HTML file
stands alone and MLflow's artifact viewer shows both.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from universality.runtime.atomic import atomic_path, write_text  # noqa: E402
from universality.outputs import report_tables  # noqa: E402
from universality.outputs.formatting import COUNT, number  # noqa: E402
from universality.outputs.report_tables import PAPER_MEDIAN_MAX_CORR  # noqa: E402
from universality.core.errors import DataError  # noqa: E402
from universality.outputs.feature_cards import RunSources, render_html  # noqa: E402
from universality.analysis.own_neurons import NORM_SHARE, OwnNeurons  # noqa: E402
from universality.analysis.pairs import PairResult  # noqa: E402
from universality.analysis.token_share import HIGH_SHARE, TokenShares  # noqa: E402
from universality.core.run_names import control_kind, replicate_of  # noqa: E402

BASIS_LABELS = {"features": "SAE features", "neurons": "MLP neurons", "rotation": "rotated neurons (baseline)",
                "ceiling": "SAE features, same model (ceiling)"}
BASIS_COLORS = {"features": "tab:blue", "neurons": "tab:orange", "rotation": "tab:gray", "ceiling": "tab:green"}
FIGURES_VERSION = 1  # bump when a pair figure changes: cached figures of older versions are redrawn
FIGURE_INDEX = f"figures-v{FIGURES_VERSION}.json"  # names and captions of a pair's cached figures
N_CARDS = 5  # most and least universal features shown with cards
STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}
img{max-width:100%}.card{border:1px solid #aaa;border-radius:6px;padding:0 1em;margin:1em 0}
.ctx{font-family:monospace;white-space:pre}mark{background:#ffd54f;font-weight:bold}"""


@dataclass(frozen=True)
class Figure:
    """A rendered figure: its file name, caption and PNG bytes."""

    name: str
    caption: str
    png: bytes

    def html(self) -> str:
        data = base64.b64encode(self.png).decode()
        return (f"<figure><img alt='{html.escape(self.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(self.caption)}</figcaption></figure>")


def render(fig: plt.Figure, name: str, caption: str) -> Figure:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return Figure(name, caption, buffer.getvalue())


def universality_histogram(max_corr: Mapping[str, np.ndarray], title: str) -> Figure:
    """Per-feature max correlation with the other seed, one histogram per basis, medians marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 41)
    for basis, values in max_corr.items():
        x = np.asarray(values, np.float64)
        x = x[~np.isnan(x)]
        if x.size == 0:
            continue
        ax.hist(x, bins=bins, density=True, histtype="step", linewidth=2, color=BASIS_COLORS[basis],
                label=f"{BASIS_LABELS[basis]} (median {np.median(x):.2f}, n={x.size})")
        ax.axvline(np.median(x), color=BASIS_COLORS[basis], linewidth=1)
    for basis, value in PAPER_MEDIAN_MAX_CORR.items():
        ax.axvline(value, color=BASIS_COLORS[basis], linestyle="--", linewidth=1,
                   label=f"paper median, {BASIS_LABELS[basis]} ({value})")
    ax.set(xlabel="max activation correlation with the other seed", ylabel="density of features", title=title, xlim=(0, 1))
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    return render(fig, "universality.png", title)


def token_share_histogram(shares: Mapping[str, TokenShares], title: str) -> Figure:
    """How much of each SAE feature and each neuron is its current token (cross-fitted token share), pooled over
    the runs in ``shares``, medians marked: features near 1 are token detectors any model reading these tokens has."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 1, 41)
    for label, color, values in (("SAE features", BASIS_COLORS["features"], [s.features_token for s in shares.values()]),
                                 ("MLP neurons", BASIS_COLORS["neurons"], [s.neurons_token for s in shares.values()])):
        x = np.concatenate(values)
        x = x[np.isfinite(x)]
        if x.size:
            ax.hist(x, bins=bins, density=True, histtype="step", linewidth=2, color=color,
                    label=f"{label} (median {np.median(x):.2f}, >= {HIGH_SHARE:g}: {(x >= HIGH_SHARE).mean():.1%}, n={x.size})")
            ax.axvline(np.median(x), color=color, linewidth=1)
    ax.set(xlabel="token share: fraction of activation variance explained by the current token", ylabel="density",
           title=title, xlim=(0, 1))
    ax.legend(fontsize=7, loc="best", framealpha=0.8)
    return render(fig, "token_share.png", title)


def own_neurons_figure(own: Mapping[str, OwnNeurons], cross_seed: np.ndarray, n_neurons: int) -> Figure:
    """The paper's "invisible in the neuron basis", pooled over seeds: each SAE feature's max activation
    correlation with a neuron of its own model beside its max correlation with the other seeds' features,
    and how many neurons carry 90% of its decoder vector's squared norm (included features only)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    own_corr = np.concatenate([o.max_corr for o in own.values()])
    included = ~np.isnan(own_corr)
    cross = np.asarray(cross_seed, np.float64)
    for values, color, label in ((own_corr[included], "tab:orange", "vs a neuron of its own model"),
                                 (cross[~np.isnan(cross)], "tab:blue", "vs the other seeds' features")):
        if values.size:
            left.hist(values, bins=np.linspace(-0.2, 1, 49), density=True, histtype="step", linewidth=2, color=color,
                      label=f"{label} (median {np.median(values):.2f}, n={values.size})")
            left.axvline(np.median(values), color=color, linewidth=1)
    left.set(xlabel="max activation correlation", ylabel="density of features", title="SAE features: max correlation")
    left.legend(fontsize=7, loc="best", framealpha=0.8)
    spread = np.concatenate([o.neurons_for_90pct for o in own.values()])[included]
    right.hist(spread, bins=np.unique(np.geomspace(1, n_neurons + 1, 30).astype(int)), color="tab:orange", edgecolor="k")
    if spread.size:
        right.axvline(np.median(spread), color="k", linewidth=1, label=f"median {np.median(spread):g}")
        right.legend(fontsize=8)
    right.set(xscale="log", xlabel=f"neurons carrying {NORM_SHARE:.0%} of the decoder vector's squared norm",
              ylabel="features", title=f"SAE features: spread over {n_neurons} neurons")
    return render(fig, "own_neurons.png", "SAE features vs the neurons of their own model")


def density_scatter(table: pd.DataFrame, title: str) -> Figure:
    """Does universality depend on how often a feature fires? Density vs max correlation."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = table[table.feature_b >= 0]
    ax.scatter(rows.density_a, rows["corr"], s=6, alpha=0.5, c=np.where(rows.mutual, "tab:red", "tab:blue"))
    ax.scatter([], [], s=12, c="tab:red", label="mutual match")
    ax.scatter([], [], s=12, c="tab:blue", label="max-correlation match only")
    ax.set(xscale="log", xlabel="feature density (fraction of tokens firing)", ylabel="max activation correlation",
           title=title, ylim=(0, 1))
    ax.legend(fontsize=8)
    return render(fig, "density_vs_corr.png", title)


def logit_scatter(table: pd.DataFrame, title: str) -> Figure:
    """Activation vs logit-weight correlation of matched features (the paper: often low logit corr)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = table[table.feature_b >= 0]
    for mutual, color, label in ((False, "tab:blue", "max-correlation match"), (True, "tab:red", "mutual match")):
        part = rows[rows.mutual == mutual]
        ax.scatter(part["corr"], part.logit_corr, s=6, alpha=0.5, color=color, label=f"{label} (n={len(part)})")
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set(xlabel="activation correlation", ylabel="logit-weight correlation", title=title, xlim=(0, 1), ylim=(-1, 1))
    ax.legend(fontsize=8)
    return render(fig, "logit_vs_activation.png", title)


def block_heatmap(top_block: np.ndarray, run_a: str, run_b: str, title: str) -> Figure:
    """Correlations of A's best-matched features (rows) with their partners in B (columns)."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(top_block, vmin=-1, vmax=1, cmap="RdBu_r")
    fig.colorbar(image, ax=ax, label="activation correlation")
    ax.set(xlabel=f"{run_b} partner (match order)", ylabel=f"{run_a} feature (by max correlation)", title=title)
    return render(fig, "top_block.png", title)


def density_histogram(hist: Mapping[str, list], run: str) -> Figure:
    """An SAE's log10 feature-density histogram (the paper's is bimodal: ultralow and main mode)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", edgecolor="k", label="features that fired")
    ax.axvline(-6, color="tab:red", linestyle="--", label="ultralow threshold (1e-6)")
    ax.set(xlabel="log10 feature density", ylabel="features", title=f"{run}: SAE feature density")
    ax.legend(fontsize=8)
    return render(fig, "density_histogram.png", f"{run}: SAE feature density")


def drawn_once(stage_dir: Path | None, draw: Callable[[], list[Figure]]) -> list[Figure]:
    """Figures that depend only on one cached stage's output, drawn once and kept in its folder,
    so re-running a cached experiment does not draw them again."""
    folder = None if stage_dir is None else stage_dir / "figures"
    if folder is not None and (folder / FIGURE_INDEX).exists():
        captions = figure_index(folder / FIGURE_INDEX)
        return [Figure(name, caption, (folder / name).read_bytes()) for name, caption in captions.items()]
    figures = draw()
    if folder is not None:
        folder.mkdir(exist_ok=True)
        for figure in figures:
            write_figure(figure, folder)
        write_text(folder / FIGURE_INDEX, json.dumps({f.name: f.caption for f in figures}))  # written last
    return figures


def figure_index(path: Path) -> dict[str, str]:
    """File name -> caption of cached figures. The names must be plain file names in the index's folder:
    a damaged or tampered cache (results on a shared filesystem) must not make univ read files elsewhere."""
    captions = json.loads(path.read_text())
    bad = [name for name, caption in captions.items() if not (is_plain_file_name(name) and isinstance(caption, str))
           ] if isinstance(captions, dict) else [captions]
    if bad:
        raise DataError(f"{path}: {bad[0]!r} is not a plain figure file name (a damaged cache? delete "
                        f"{path.parent} to redraw its figures)")
    return captions


def is_plain_file_name(name: str) -> bool:
    """A name that stays in its folder when joined to it: no separator, not '.' or '..', not absolute."""
    return name not in ("", ".", "..") and Path(name).name == name and "\0" not in name


def pair_figures(pair: PairResult) -> list[Figure]:
    """The pair's figures (kept beside its cached comparison): four, and its ablation effects where computed."""
    name = f"{pair.run_a} vs {pair.run_b}"
    return drawn_once(pair.directory, lambda: [
        universality_histogram(pair.max_corr, f"{name}: max activation correlation per feature"),
        density_scatter(pair.table, f"{name}: density vs max correlation"),
        logit_scatter(pair.table, f"{name}: activation vs logit-weight correlation"),
        block_heatmap(pair.top_block, pair.run_a, pair.run_b, f"{name}: top matched features"),
        *([effect_histogram(pair.table.effect_corr.to_numpy(), pair.random_effect_corr,
                            f"{name}: ablation effects of matched features")] if pair.random_effect_corr.size else []),
    ])


def effect_histogram(top_corr: np.ndarray, random_corr: np.ndarray, title: str) -> Figure:
    """Causal universality: how alike the ablation effects of the top mutual matches are (correlation of the
    per-token change in next-token log-probability), beside random feature pairs."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(-1, 1, 41)
    for values, color, label in ((top_corr, "tab:blue", "top mutual matches"), (random_corr, "tab:gray", "random pairs")):
        x = values[np.isfinite(values)]
        if x.size:
            ax.hist(x, bins=bins, histtype="step", linewidth=2, color=color, label=f"{label} (median {np.median(x):.2f}, n={x.size})")
    ax.set(xlabel="correlation of ablation effects across the two runs", ylabel="feature pairs", title=title)
    ax.legend(fontsize=8)
    return render(fig, "ablation_effects.png", title)


def ranked_features(matched: pd.DataFrame, seed_a: int, seed_b: int | None = None, sae_a: int = 0,
                    sae_b: int = 0) -> pd.DataFrame:
    """The features of ``seed_a``'s SAE ``sae_a`` that have partners, ranked by contextual max correlation
    (``corr_context``: the current token's part removed), raw ``corr`` beside it: with SAE ``sae_b`` of ``seed_b``
    (another model, or a replicate of the same one), or averaged over every other model when ``seed_b`` is None.
    A feature with no contextual partner (a function of the current token alone) ranks last."""
    rows = matched[(matched.seed_a == seed_a) & (matched.sae_a == sae_a) & (matched.feature_b >= 0)]
    rows = rows[~rows.same_model] if seed_b is None else rows[(rows.seed_b == seed_b) & (rows.sae_b == sae_b)]
    ranked = rows.assign(corr_context=rows.corr_context.fillna(0.0)).groupby("feature_a")[["corr_context", "corr"]].mean()
    return ranked.sort_values(["corr_context", "corr"], ascending=False).reset_index()


def _cards_section(ranked: pd.DataFrame, source: RunSources, matched: pd.DataFrame) -> str:
    top = ranked.head(N_CARDS).feature_a
    bottom = ranked.tail(N_CARDS).feature_a[::-1]
    section = lambda title, feats: f"<h3>{title}</h3>" + "".join(  # noqa: E731
        render_html(source.card(int(f), matched)) for f in feats)
    return (section(f"Most universal features of seed{source.seed} (by contextual correlation, the current token's "
                    "part removed; raw beside it on each card)", top)
            + section(f"Least universal features of seed{source.seed} (that have a partner)", bottom))


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")


def pair_report(pair: PairResult, figures: Sequence[Figure], matched: pd.DataFrame,
                sources: Mapping[str, RunSources]) -> str:
    """Headline numbers, figures and feature cards of one pair; the weight-shuffled control's features
    are in no matched table (``sources`` has no entry for its runs), so its page has no cards."""
    body = report_tables.headline_table(pair.stats) + "".join(f.html() for f in figures)
    if pair.run_a in sources:
        source_a, source_b = sources[pair.run_a], sources[pair.run_b]
        ranked = ranked_features(matched, source_a.seed, source_b.seed, replicate_of(pair.run_a), replicate_of(pair.run_b))
        body += _cards_section(ranked, source_a, matched)
    else:
        what = "Untrained control (models at their random initialization)" if control_kind(pair.run_a) == "untrained" else \
            "Randomized-transformer control (weight-shuffled models)"
        body += f"<p>{what}: no feature cards.</p>"
    return page(f"univ: {pair.run_a} vs {pair.run_b}", body)


def run_report(pairs: Sequence[PairResult], replicate_pairs: Sequence[PairResult], randomized: PairResult | None,
               summary: Mapping[str, float], matched: pd.DataFrame, sources: Mapping[str, RunSources],
               sae_metrics: Mapping[str, Mapping], figure: Figure, own_section: str, by_size: str = "",
               untrained: PairResult | None = None, token_section: str = "") -> str:
    """The whole run: universality (raw and contextual) beside its ceiling, baselines, both controls and the
    token-lookup null, pooled histogram, per-pair rows, the randomized control, the token shares
    (``token_section``), features vs their own neurons (``own_section``), feature cards; a dictionary family's
    universality by size (``by_size``, HTML) after the ceiling."""
    both = lambda p, basis: (f"<td>{number(p.stats.get(f'{basis}.max_corr_median'))}</td>"  # noqa: E731
                             f"<td>{number(p.stats.get(f'contextual.{basis}.max_corr_median'))}</td>")
    per_pair = "".join(
        f"<tr><td>{p.run_a} vs {p.run_b}</td>{both(p, 'features')}{both(p, 'neurons')}{both(p, 'rotation')}"
        f"<td>{number(p.stats['features.n_mutual'], COUNT)}</td></tr>" for p in pairs)
    per_pair += "".join(
        f"<tr><td>{p.run_a} vs {p.run_b} (same model)</td>{both(p, 'features')}"
        f"<td>–</td><td>–</td><td>–</td><td>–</td><td>{number(p.stats['features.n_mutual'], COUNT)}</td></tr>" for p in replicate_pairs)
    control = ("" if randomized is None else
               f"<p>Randomized-transformer control (weight-shuffled models): median max corr of SAE features "
               f"{number(randomized.stats['features.max_corr_median'])}.</p>")
    pooled = {k: summary.get(f"{k}_mean") for k in ("features.max_corr_median", "neurons.max_corr_median",
                                                     "rotation.max_corr_median", "features.max_corr_mean",
                                                     "features.frac_above_0.5", "features.n_mutual",
                                                     "features.logit_corr_median_mutual", "cka",
                                                     "causal.effect_corr_median_top", "causal.effect_corr_median_random")}
    first = sources[pairs[0].run_a]
    body = ("<h2>Universality against its ceiling</h2>"
            + report_tables.ceiling_table(summary, len(pairs), len(replicate_pairs), randomized, untrained)
            + by_size
            + "<h2>SAEs: quality and convergence</h2>" + report_tables.sae_table(sae_metrics)
            + "<h2>Headline (mean over pairs)</h2>" + report_tables.headline_table(pooled)
            + f"<p>Feature families spanning every seed: {number(summary.get('families.n_all_runs'), COUNT)}.</p>" + control
            + "<h2>Pairs</h2><p>Median max correlation, raw and contextual (each feature's current-token mean "
            "removed).</p><table><tr><th>pair</th><th>features</th><th>contextual</th><th>neurons</th><th>contextual</th>"
            "<th>rotated neurons</th><th>contextual</th>"
            + f"<th>mutual matches</th></tr>{per_pair}</table>" + figure.html()
            + ("<h2>Token share</h2>" + token_section if token_section else "")
            + "<h2>Features vs the neurons of their own model</h2>" + own_section
            + _cards_section(ranked_features(matched, first.seed), first, matched))
    return page("univ: feature universality across seeds", body)


def pooled_max_corr(pairs: Sequence[PairResult], replicate_pairs: Sequence[PairResult] = ()) -> dict[str, np.ndarray]:
    """Each basis's max correlations over all pairs; the replicate pairs' features as the "ceiling" basis."""
    pooled = {basis: np.concatenate([p.max_corr[basis] for p in pairs]) for basis in pairs[0].max_corr}
    if replicate_pairs:
        pooled["ceiling"] = np.concatenate([p.max_corr["features"] for p in replicate_pairs])
    return pooled


def write_figure(figure: Figure, folder: Path) -> Path:
    with atomic_path(folder / figure.name) as tmp:
        tmp.write_bytes(figure.png)
    return folder / figure.name


def write_pair_report(pair: PairResult, matched: pd.DataFrame, sources: Mapping[str, RunSources], folder: Path) -> Path:
    """The pair's figures (PNG) and its HTML report in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    figures = pair_figures(pair)
    for figure in figures:
        write_figure(figure, folder)
    write_text(folder / "report.html", pair_report(pair, figures, matched, sources))
    return folder


def write_run_report(pairs: Sequence[PairResult], replicate_pairs: Sequence[PairResult], randomized: PairResult | None,
                     summary: Mapping[str, float], matched: pd.DataFrame, sources: Mapping[str, RunSources],
                     sae_metrics: Mapping[str, Mapping], folder: Path, *, own_neurons: Mapping[str, OwnNeurons],
                     n_neurons: int, by_size: str = "", untrained: PairResult | None = None,
                     token_shares: Mapping[str, TokenShares] | None = None) -> Path:
    """The run report and its figures in ``folder``; ``own_neurons`` and ``token_shares`` (by run name) of the pairs'
    seeds are shown."""
    folder.mkdir(parents=True, exist_ok=True)
    pooled = pooled_max_corr(pairs, replicate_pairs)
    figure = universality_histogram(pooled, "all pairs: max activation correlation per feature")
    own = {name: own_neurons[name] for p in pairs for name in (p.run_a, p.run_b)}
    own_figure = own_neurons_figure(own, pooled["features"], n_neurons)
    shares = {name: token_shares[name] for p in pairs for name in (p.run_a, p.run_b)} if token_shares else {}
    share_figure = token_share_histogram(shares, "seeds' SAE features and neurons: token share") if shares else None
    for drawn in (figure, own_figure, share_figure):
        if drawn is not None:
            write_figure(drawn, folder)
    token_section = "" if share_figure is None else (
        f"<p>Token share: the fraction of a feature's activation variance explained by the current token alone, "
        f"cross-fitted over two halves of the comparison tokens (a token seen once cannot score 1). Median over "
        f"features, mean over seeds: SAE features {number(summary.get('token_share.features_median_mean'))}, neurons "
        f"{number(summary.get('token_share.neurons_median_mean'))}; position share (the same for the position in "
        f"context): SAE features {number(summary.get('position_share.features_median_mean'))}.</p>" + share_figure.html())
    write_text(folder / "report.html", run_report(pairs, replicate_pairs, randomized, summary, matched, sources,
                                                  sae_metrics, figure, report_tables.own_neurons_table(own) + own_figure.html(), by_size,
                                                  untrained, token_section))
    return folder
