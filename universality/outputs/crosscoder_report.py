"""A run's crosscoders where users look: the latents table (export and MLflow), the relative decoder-norm histogram
and the class table of the run report, and the terminal lines.

The latents table has a row per latent of a crosscoder over M models (m = 0 .. M-1, in its models' order):

=====================  =======  ===============================================================================
column                 dtype    meaning
=====================  =======  ===============================================================================
latent                 int64    latent index
norm_m                 float64  its decoder norm in model m (per-model normalized units)
share_m                float64  model m's share of its summed decoder norms
class                  string   shared | shared-kofM (k of the M models) | exclusive-m | dead
density                float64  fraction of comparison tokens it fires on
beta_recon_m           float64  Latent Scaling: its fitted scale in m's reconstruction by the other latents
beta_error_m           float64  Latent Scaling: the same in m's reconstruction error
explained_ratio        float64  an exclusive latent's best fitted norm in another model over its own (NaN: not exclusive)
explained_elsewhere    bool     an exclusive latent that another model's activations also explain (ratio >= 0.2)
sae_feature_m          int64    the SAE feature of model m most correlated with it (-1: none; main crosscoder only)
sae_corr_m             float64  that activation correlation (NaN: none)
top_tokens             string   its distinct top activating tokens, " | "-joined
=====================  =======  ===============================================================================
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import click

import numpy as np
import pandas as pd

from universality.core.run_names import crosscoder_name, crosscoder_role
from universality.outputs.feature_cards import Example, example_line, examples, top_tokens
from universality.outputs.formatting import number

if TYPE_CHECKING:
    from universality.outputs.reports import Figure

TABLE_FILE = "crosscoder"  # tables/crosscoder.<fmt> on the parent run; OUT.crosscoder.<fmt> in univ export
FIGURE_FILE = "relative_norms.png"


def latent_columns(n_models: int) -> dict[str, str]:
    """The latents table's columns and dtypes for a crosscoder over ``n_models`` models (see the module doc)."""
    per_model = lambda prefix, dtype: {f"{prefix}_{m}": dtype for m in range(n_models)}  # noqa: E731
    return {"latent": "int64", **per_model("norm", "float64"), **per_model("share", "float64"), "class": "string",
            "density": "float64", **per_model("beta_recon", "float64"), **per_model("beta_error", "float64"),
            "explained_ratio": "float64", "explained_elsewhere": "bool", **per_model("sae_feature", "int64"),
            **per_model("sae_corr", "float64"), "top_tokens": "string"}


def typed_latents(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with the latents table's columns, in order and with their dtypes (its model count read off it)."""
    columns = latent_columns(sum(1 for c in frame.columns if c.startswith("norm_")))
    return frame[list(columns)].astype(columns).reset_index(drop=True)


def latents_table(cc, beside: Mapping[str, np.ndarray], tokens: np.ndarray, vocab: list[str]) -> pd.DataFrame:
    """The latents table of a ``stages.crosscoder.RunCrosscoder``: its per-latent evaluation, the columns beside
    per-model matching (``beside``; -1 / NaN when not given) and each latent's top tokens among the flat comparison
    ``tokens``."""
    n_latents, n_models = len(cc.latents), len(cc.models)
    missing = {**{f"sae_feature_{m}": np.full(n_latents, -1) for m in range(n_models)},
               **{f"sae_corr_{m}": np.full(n_latents, np.nan) for m in range(n_models)}}
    _, positions = cc.top_examples()
    top = [" | ".join(top_tokens(row, tokens, vocab)) for row in positions]
    return typed_latents(cc.latents.assign(**{**missing, **beside}, top_tokens=top))


def relative_norm_histogram(cc) -> Figure:
    """The live latents' share of their decoder norm in the last model (two models: Lindsey et al.'s relative norm,
    0 exclusive to the first, 1 to the second, 0.5 shared), classes coloured; for more models each latent's largest
    share (1/M shared evenly, 1 exclusive)."""
    from universality.outputs.reports import plt, render  # here: the terminal's lines (a cached re-run) draw nothing

    latents = cc.latents[cc.latents["class"] != "dead"]
    n_models = len(cc.models)
    shares = latents[f"share_{n_models - 1}"] if n_models == 2 else latents[[f"share_{m}" for m in range(n_models)]].max(axis=1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(0 if n_models == 2 else 1 / n_models, 1, 41)
    classes = sorted(latents["class"].unique())
    ax.hist([shares[latents["class"] == c] for c in classes] or [[]], bins=bins, stacked=True, label=classes or None)
    what = f"share of the decoder norm in {cc.models[-1]}" if n_models == 2 else "largest per-model share of the decoder norm"
    ax.set(xlabel=what, ylabel="live latents", title=f"{cc.name} over {', '.join(cc.models)}")
    if classes:
        ax.legend(fontsize=8)
    return render(fig, FIGURE_FILE, f"{cc.name}: {what}, per live latent")


CLASS_ROWS = (("shared (all models)", "frac_shared"), ("shared by some, not all", "frac_shared_kofm"),
              ("exclusive to one model", "frac_exclusive"), ("of them explained elsewhere (Latent Scaling)",
                                                             "frac_exclusive_explained_elsewhere"),
              ("dead (fraction of all latents)", "frac_dead"), ("L0", "l0"))


def crosscoder_section(crosscoders: Mapping, summary: Mapping[str, float], figure: Figure) -> str:
    """The run report's crosscoder section: the class table of the crosscoder and each control, its FVU per model,
    seed stability and the comparison with per-model matching, and the relative-norm histogram."""
    main = crosscoder_name()
    roles = {name: crosscoder_role(name) for name in crosscoders}
    columns = {name: "crosscoder." if role == "main" else f"crosscoder.{role}."
               for name, role in roles.items() if role != "replicate"}
    head = "".join(f"<th>{html.escape(name)} ({html.escape(', '.join(crosscoders[name].models))})</th>" for name in columns)
    body = "".join(f"<tr><td>{label}</td>" + "".join(f"<td>{number(summary.get(prefix + key))}</td>" for prefix in columns.values())
                   + "</tr>" for label, key in CLASS_ROWS)
    fvu = ", ".join(f"{html.escape(name)} {number(value)}" for name, value in zip(crosscoders[main].models, crosscoders[main].metrics["fvu"]))
    rows = [("FVU per model", fvu),
            ("seed stability: median max activation correlation with another crosscoder seed",
             number(summary.get("crosscoder.seed_stability.max_corr_median"))),
            ("seed stability: median one-to-one decoder cosine", number(summary.get("crosscoder.seed_stability.decoder_cos_hungarian_median"))),
            ("shared latents: median best activation correlation with an SAE feature (over models; weakest model)",
             f"{number(summary.get('crosscoder.sae_corr_median_shared'))}; {number(summary.get('crosscoder.sae_corr_min_median_shared'))}"),
            ("mutual matches of per-model SAEs that one shared latent accounts for",
             number(summary.get("crosscoder.frac_mutual_matches_one_latent"))),
            ("wall time of the crosscoder stages (s)", number(summary.get("crosscoder.seconds"), ".1f"))]
    extra = "".join(f"<tr><td>{label}</td><td>{value}</td></tr>" for label, value in rows)
    return ("<h2>Crosscoder: one dictionary over every model</h2>"
            f"<table><tr><th>fraction of live latents</th>{head}</tr>{body}</table><table>{extra}</table>"
            "<p>A latent is shared when every model's decoder norm is at least 0.2 of its largest, exclusive when only "
            "one model's is. Controls: the first model with itself (identical inputs: exclusives should be ~0) and with "
            "its weight-shuffled copy. An exclusive latent is explained elsewhere when Latent Scaling fits it in another "
            f"model's activations at 0.2 of its own norm or more (Minder et al. 2025).</p>{figure.html()}")


def crosscoder_lines(result) -> list[str]:
    """The terminal lines of a run's crosscoder (none without one)."""
    main = crosscoder_name()
    if main not in result.crosscoders:
        return []
    s, cc = result.summary, result.crosscoders[main]
    fvu = ", ".join(f"{name} {value:.3f}" for name, value in zip(cc.models, cc.metrics["fvu"]))
    lines = [f"crosscoder over {', '.join(cc.models)}: live latents shared {number(s.get('crosscoder.frac_shared'), '.1%')} | "
             f"exclusive {number(s.get('crosscoder.frac_exclusive'), '.1%')} (explained elsewhere "
             f"{number(s.get('crosscoder.frac_exclusive_explained_elsewhere'), '.1%')}) | dead "
             f"{number(s.get('crosscoder.frac_dead'), '.1%')} | L0 {cc.metrics['l0']:.1f} | fvu {fvu} "
             f"({number(s.get('crosscoder.seconds'), '.0f')} s)",
             f"  shared latents vs per-model SAEs: median best correlation {number(s.get('crosscoder.sae_corr_median_shared'))}, "
             f"mutual matches one latent accounts for {number(s.get('crosscoder.frac_mutual_matches_one_latent'), '.1%')}"]
    if "crosscoder.seed_stability.max_corr_median" in s:
        lines.append(f"  seed stability (another crosscoder seed): median max corr {number(s['crosscoder.seed_stability.max_corr_median'])}"
                     f", decoder cosine {number(s['crosscoder.seed_stability.decoder_cos_hungarian_median'])}")
    for control in ("identity", "shuffled"):
        if f"crosscoder.{control}.frac_exclusive" in s:
            lines.append(f"  control {control}: exclusive {number(s[f'crosscoder.{control}.frac_exclusive'], '.1%')} of live latents")
    return lines


@dataclass(frozen=True)
class LatentCard:
    """One crosscoder latent as ``univ features RUN --crosscoder LATENT`` shows it: its row of the latents table, the
    models its decoders write into, and its top activating contexts in the comparison tokens."""

    latent: int
    row: Mapping  # its row of the latents table (``latent_columns``)
    models: tuple[str, ...]  # the crosscoder's models, in decoder order (m = 0 .. M-1)
    examples: list[Example]


def latent_card(latents: pd.DataFrame, models: Sequence[str], latent: int, top_values: np.ndarray,
                top_positions: np.ndarray, tokens: np.ndarray, vocab: list[str], context: int, ctx_len: int) -> LatentCard:
    """``latent``'s card from the latents table and the crosscoder evaluation's top examples [F, k] (values, positions
    in the flat comparison ``tokens``)."""
    return LatentCard(latent, latents.iloc[latent].to_dict(), tuple(models),
                      examples(top_values[latent], top_positions[latent], tokens, vocab, context, ctx_len))


def render_latent_terminal(card: LatentCard) -> str:
    """The card as terminal text: class and density, each model's decoder norm, share and Latent Scaling, the
    per-model SAE feature closest to it, and its top activating contexts."""
    row = card.row
    lines = [click.style(f"crosscoder latent {card.latent}", bold=True)
             + f"  {row['class']}  density {row['density']:.3g}  over {', '.join(card.models)}"]
    for m, model in enumerate(card.models):
        sae = (f"closest SAE feature {row[f'sae_feature_{m}']} (corr {number(row[f'sae_corr_{m}'])})"
               if row[f"sae_feature_{m}"] >= 0 else "no SAE feature compared")
        lines.append(f"  {model}: decoder norm {row[f'norm_{m}']:.3f} (share {number(row[f'share_{m}'], '.0%')}), "
                     f"Latent Scaling recon {number(row[f'beta_recon_{m}'], '.2f')} / error "
                     f"{number(row[f'beta_error_{m}'], '.2f')}; {sae}")
    if str(row["class"]).startswith("exclusive"):
        lines.append(f"  exclusive: another model's activations fit it at {number(row['explained_ratio'], '.2f')} of its own "
                     f"norm ({'explained elsewhere' if row['explained_elsewhere'] else 'not explained elsewhere'})")
    lines.append("top activating contexts:" if card.examples else "top activating contexts: none (it never fired)")
    lines.extend(example_line(ex) for ex in card.examples)
    return "\n".join(lines)
