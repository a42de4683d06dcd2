"""Feature splitting in a run report: the persist / split / shift / vanish fractions between consecutive
dictionary sizes, and the split trees of the largest families of one model (parent -> children ->
grandchildren), drawn from ``universality.measures.splitting``'s levels."""

from __future__ import annotations

import html
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from universality.outputs.formatting import number
from universality.outputs.reports import Figure, render
from universality.measures.splitting import (CHILD_MIN_CORR, CLASSES, PERSIST_MIN_CORR, SplitLevel, descendants, forest,
                                    top_families)

FIGURE_FILE = "split_trees.png"
TABLE_FILE = "splits"  # .parquet / .csv: splitting.splits_table
N_FAMILIES = 4  # trees drawn in the report
MAX_NODES = 16  # nodes drawn per generation of one tree (the strongest edges first)
CROWDED = 8  # a generation with more nodes than this gets upright labels
STATISTICS = (("features", "n_parents", ".0f"), *((c, f"frac_{c}", ".2f") for c in CLASSES),
              ("children per split", "children_per_split_mean", ".2f"),
              ("child density / parent's", "child_density_ratio_median", ".2f"),
              ("children's densities summed / parent's", "children_density_sum_ratio_median", ".2f"),
              ("decoder cosine, persisting", "persist_decoder_cos_median", ".3f"))
CLASS_COLORS = {"persist": "tab:green", "split": "tab:blue", "shift": "tab:orange", "vanish": "tab:gray"}


def _tree_layout(levels: Sequence[SplitLevel], root: int) -> tuple[list[list[int]], list[tuple[int, int, int, float]]]:
    """Nodes per generation (root first) and edges (generation, parent index, child index, corr), at most
    ``MAX_NODES`` children per generation, keeping the strongest edges."""
    nodes, edges = [[root]], []
    for depth, tree_edges in enumerate(descendants(levels, root)):
        kept = tree_edges[tree_edges.feature_a.isin(nodes[-1])].sort_values("corr", ascending=False, kind="stable")
        children = list(dict.fromkeys(kept.feature_b.tolist()))[:MAX_NODES]
        order = {f: i for i, f in enumerate(nodes[-1])}
        children.sort(key=lambda f: min(order[a] for a in kept[kept.feature_b == f].feature_a))  # under their parent
        index = {f: i for i, f in enumerate(children)}
        edges += [(depth, order[r.feature_a], index[r.feature_b], r.corr) for r in kept.itertuples() if r.feature_b in index]
        nodes.append(children)
        if not children:
            break
    return nodes, edges


def tree_figure(model: str, levels: Sequence[SplitLevel], n: int = N_FAMILIES) -> Figure:
    """The split trees of ``model``'s ``n`` largest families: a panel per family, a row per dictionary size
    (smallest on top), a node per feature (coloured by its class against the next size), an edge from each
    child's most correlated parent (line width by correlation)."""
    classes = [level.classes() for level in levels]  # of every edge; the trees keep each child's strongest parent
    levels = forest(levels)
    roots = top_families(levels, n)
    title = f"{model}: split trees of the largest families (each child under its most correlated parent)"
    fig, axes = plt.subplots(1, max(1, len(roots)), figsize=(3.4 * max(1, len(roots)), 1.3 + 1.1 * len(levels)), squeeze=False)
    sizes = [levels[0].size_a, *(level.size_b for level in levels)]
    for ax, root in zip(axes[0], roots):
        nodes, edges = _tree_layout(levels, root)
        xs = [np.linspace(0, 1, len(gen) + 2)[1:-1] for gen in nodes]
        for depth, parent, child, corr in edges:
            ax.plot([xs[depth][parent], xs[depth + 1][child]], [-depth, -depth - 1], color="k", alpha=0.6,
                    linewidth=0.5 + 3 * corr)
        for depth, generation in enumerate(nodes):
            colors = [CLASS_COLORS.get(classes[depth][f], "white") if depth < len(classes) else "white" for f in generation]
            ax.scatter(xs[depth], [-depth] * len(generation), s=160, c=colors, edgecolors="k", zorder=3)
            crowded = len(generation) > CROWDED  # labels turned upright so they do not run into each other
            for x, feature in zip(xs[depth], generation):
                ax.annotate(str(feature), (x, -depth), xytext=(0, 9), textcoords="offset points", ha="center",
                            va="bottom", fontsize=7, rotation=90 if crowded else 0)
        ax.set(title=f"feature {root} of {sizes[0]:,}", xlim=(0, 1), ylim=(-len(levels) - 0.5, 0.75), xticks=[])
        ax.set_yticks([-d for d in range(len(sizes))], [f"{s:,}" for s in sizes])
    axes[0, 0].set_ylabel("dictionary size")
    if not roots:
        axes[0, 0].text(0.5, 0.5, "no feature splits", ha="center", va="center")
        axes[0, 0].set_axis_off()
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, markeredgecolor="k", label=k)
               for k, c in CLASS_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return render(fig, FIGURE_FILE, title)


def split_section(summary: Mapping[str, float], size_pairs: Sequence[tuple[int, int]], figure: Figure) -> str:
    """The fractions and densities per consecutive size pair (mean over models) and the trees, as HTML."""
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _, _ in STATISTICS)
    body = "".join(f"<tr><td>{a:,} → {b:,}</td>" + "".join(
        f"<td>{number(summary.get(f'splits.{a}_to_{b}.{key}_mean'), spec)}</td>" for _, key, spec in STATISTICS) + "</tr>"
        for a, b in size_pairs)
    return ("<h2>Feature splitting between dictionary sizes</h2>"
            f"<table><tr><th>sizes</th>{head}</tr>{body}</table><p>Each included feature of the smaller dictionary (mean "
            f"over models) and its children in the next size: the features whose activations correlate with it above "
            f"{CHILD_MIN_CORR} on the comparison tokens. Persist: one child, above {PERSIST_MIN_CORR}; split: two or more; "
            f"shift: one, below {PERSIST_MIN_CORR}; vanish: none. Densities: each split child's firing density over its "
            "parent's (median), and all of a parent's children's summed (near 1 when the parent's firings are shared out "
            f"among them). Every edge is in the table <code>tables/{TABLE_FILE}</code>.</p>{figure.html()}")
