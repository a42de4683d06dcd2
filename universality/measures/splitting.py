"""Feature splitting within one model: how the features of one dictionary size relate to the next.

The paper trained dictionaries of growing size on one model (A/0 ... A/5) and found that a feature
of a small dictionary *splits* into several more specific features of a larger one. Here two SAEs of
the same model and consecutive sizes are compared on the same held-out tokens: the Pearson
correlation of every pair of their features' activations, and the cosine of their decoder vectors
(both dictionaries live in the same neuron space, so cosines mean something).

Similarity. A feature's *children* are the features of the larger dictionary whose activations
correlate with it above ``CHILD_MIN_CORR`` (0.4, the paper's threshold). The paper used a masked
cosine similarity of activations; Pearson correlation is used here, the statistic cross-seed matching
uses (so one streaming accumulator serves both, and the numbers read alike). For sparse, non-negative
features the two are close: the means that Pearson subtracts are a feature's density times its
typical value, small beside its spread, and the cosine over all tokens equals the cosine over the
tokens where either feature fires, since tokens where both are zero add nothing. If a parent's
activation is the sum of k children that never fire together and share it equally, each child
correlates with the parent at about 1/sqrt(k): 0.71 for two, so 0.4 admits up to six equal children.
A child above ``PERSIST_MIN_CORR`` (0.9) carries more than 81% of its parent's activation energy.

Classes of a parent (features excluded from correlation, dead or too rare, are not classified):

- ``persist``: exactly one child, correlated above ``PERSIST_MIN_CORR``: the same feature;
- ``split``: two or more children;
- ``shift``: exactly one child, below ``PERSIST_MIN_CORR``: the feature moved, or kept one child and
  lost the rest of itself to children below the threshold;
- ``vanish``: no child.

The edges of all consecutive size pairs form the *tree* across sizes (parent -> children ->
grandchildren); a child may have more than one parent, as the paper saw (features both split and
merge), so a root's tree is its set of descendants, level by level.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from universality.measures.comparison import correlate
from universality.measures.correlation import Activations

CHILD_MIN_CORR = 0.4  # activation correlation above which a feature of the larger dictionary is a child
PERSIST_MIN_CORR = 0.9  # a single child above this: the feature persists
CLASSES = ("persist", "split", "shift", "vanish")
EXCLUDED = "excluded"  # dead or too rare to correlate: not classified
EDGE_COLUMNS: dict[str, str] = {"feature_a": "int64", "feature_b": "int64", "corr": "float64", "cos": "float64"}


@dataclass(frozen=True)
class SplitLevel:
    """The features of one model's dictionary of ``size_a`` against its next larger one, ``size_b``."""

    size_a: int
    size_b: int
    edges: pd.DataFrame  # EDGE_COLUMNS: every (parent, child) pair, by feature_a then descending corr
    included_a: np.ndarray  # [F_A] bool: alive and frequent enough to correlate
    included_b: np.ndarray  # [F_B] bool
    density_a: np.ndarray  # [F_A] fraction of held-out tokens on which each feature fires
    density_b: np.ndarray  # [F_B]

    def classes(self, persist_min_corr: float = PERSIST_MIN_CORR) -> np.ndarray:
        return classify(self.edges, self.included_a, persist_min_corr)

    def children(self, feature: int) -> pd.DataFrame:
        """The children of A's ``feature``, most correlated first."""
        return self.edges[self.edges.feature_a == feature]

    def parents(self, feature: int) -> pd.DataFrame:
        """The parents of B's ``feature`` (usually one), most correlated first."""
        return self.edges[self.edges.feature_b == feature].sort_values("corr", ascending=False, kind="stable")


def edge_cosines(W_dec_a_FD: np.ndarray, W_dec_b_FD: np.ndarray, rows_a: np.ndarray, rows_b: np.ndarray) -> np.ndarray:
    """Cosine of the decoder vectors of each pair (``rows_a[i]``, ``rows_b[i]``), in float64."""
    a = np.asarray(W_dec_a_FD, np.float64)[rows_a]
    b = np.asarray(W_dec_b_FD, np.float64)[rows_b]
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ed,ed->e", a, b)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def split_edges(corr: np.ndarray, included_a: np.ndarray, included_b: np.ndarray,
                min_corr: float = CHILD_MIN_CORR) -> pd.DataFrame:
    """(feature_a, feature_b, corr) of every included pair correlated above ``min_corr``, sorted by
    feature_a, then by descending correlation."""
    valid = np.asarray(corr) > min_corr
    valid &= np.asarray(included_a, bool)[:, None] & np.asarray(included_b, bool)[None, :]
    rows, cols = np.nonzero(valid)
    values = np.asarray(corr, np.float64)[rows, cols]
    order = np.lexsort((-values, rows))
    return pd.DataFrame({"feature_a": rows[order].astype(np.int64), "feature_b": cols[order].astype(np.int64),
                         "corr": values[order]})


def classify(edges: pd.DataFrame, included_a: np.ndarray, persist_min_corr: float = PERSIST_MIN_CORR) -> np.ndarray:
    """[F_A] class of each feature of A (``CLASSES``, or ``EXCLUDED``) from its children in ``edges``."""
    included_a = np.asarray(included_a, bool)
    n_children = np.bincount(edges.feature_a.to_numpy(), minlength=included_a.size)
    best = np.zeros(included_a.size)
    np.maximum.at(best, edges.feature_a.to_numpy(), edges["corr"].to_numpy())
    classes = np.select([n_children >= 2, (n_children == 1) & (best > persist_min_corr), n_children == 1],
                        ["split", "persist", "shift"], default="vanish").astype(object)
    classes[~included_a] = EXCLUDED
    return classes


def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if x.size else float("nan")


def level_statistics(level: SplitLevel, persist_min_corr: float = PERSIST_MIN_CORR) -> dict[str, float]:
    """Fractions of A's included features that persist, split, shift or vanish; how many children a
    split has; the children's density relative to their parent's (each child, and all of a parent's
    children together: near 1 when a feature's firings are shared out among its children)."""
    classes = level.classes(persist_min_corr)
    n = int((classes != EXCLUDED).sum())
    stats: dict[str, float] = {"n_parents": n}
    stats.update({f"frac_{c}": float((classes == c).sum() / n) if n else float("nan") for c in CLASSES})
    split = level.edges[classes[level.edges.feature_a.to_numpy()] == "split"]
    ratio = level.density_b[split.feature_b.to_numpy()] / level.density_a[split.feature_a.to_numpy()]
    parents = np.unique(split.feature_a.to_numpy())
    stats["children_per_split_mean"] = float(len(split) / parents.size) if parents.size else float("nan")
    stats["child_density_ratio_median"] = _median(ratio)
    summed = pd.Series(ratio).groupby(split.feature_a.to_numpy()).sum().to_numpy()
    stats["children_density_sum_ratio_median"] = _median(summed)
    persist = level.edges[classes[level.edges.feature_a.to_numpy()] == "persist"]
    stats["persist_decoder_cos_median"] = _median(persist["cos"].to_numpy())
    return stats


def compare_sizes(chunks: Iterable[tuple[Activations, Activations]], W_dec_a_FD: np.ndarray, W_dec_b_FD: np.ndarray,
                  min_firings: int, min_corr: float = CHILD_MIN_CORR) -> SplitLevel:
    """The split level of two dictionaries of one model: ``chunks`` yields both dictionaries' activations
    on the same tokens (the smaller first), ``W_dec_*`` are their decoders [F, D] in the same neuron space."""
    corr, census_a, census_b = correlate(chunks, min_firings)
    edges = split_edges(corr, census_a.included, census_b.included, min_corr)
    edges["cos"] = edge_cosines(W_dec_a_FD, W_dec_b_FD, edges.feature_a.to_numpy(), edges.feature_b.to_numpy())
    return SplitLevel(W_dec_a_FD.shape[0], W_dec_b_FD.shape[0], edges.astype(EDGE_COLUMNS), census_a.included,
                      census_b.included, census_a.density, census_b.density)


# ---- the tree across sizes ------------------------------------------------------------------

def descendants(levels: Sequence[SplitLevel], root: int) -> list[pd.DataFrame]:
    """The tree of ``levels[0]``'s feature ``root``: per level, the edges from the previous generation
    (the root, then its children, ...) to the next. Empty frames once a generation has no children."""
    generation = np.array([root])
    tree = []
    for level in levels:
        edges = level.edges[level.edges.feature_a.isin(generation)]
        tree.append(edges)
        generation = np.unique(edges.feature_b.to_numpy())
    return tree


def forest(levels: Sequence[SplitLevel]) -> list[SplitLevel]:
    """The levels with each child kept under its most correlated parent only: the trees drawn and ranked in
    reports, where a dense feature that correlates with many children must not claim them all."""
    kept = []
    for level in levels:
        edges = level.edges.loc[level.edges.groupby("feature_b")["corr"].idxmax()] if len(level.edges) else level.edges
        edges = edges.sort_values(["feature_a", "corr"], ascending=[True, False], kind="stable").reset_index(drop=True)
        kept.append(dataclasses.replace(level, edges=edges))
    return kept


def top_families(levels: Sequence[SplitLevel], n: int) -> list[int]:
    """The ``n`` features of the smallest dictionary with the largest trees in ``levels`` (pass ``forest(levels)``
    for trees in which every child has one parent): most descendants at the largest size, then most edges, then
    the strongest first edge; only features that split somewhere."""
    scored = []
    for root in np.unique(levels[0].edges.feature_a.to_numpy()) if levels else []:
        tree = descendants(levels, int(root))
        n_edges = sum(map(len, tree))
        if n_edges > len(tree) or any(len(edges) > 1 for edges in tree):
            leaves = tree[-1].feature_b.nunique()
            scored.append((-leaves, -n_edges, -float(tree[0]["corr"].max()), int(root)))
    return [root for *_, root in sorted(scored)[:n]]


SPLIT_COLUMNS: dict[str, str] = {"model": "string", "size_a": "int64", "feature_a": "int64", "size_b": "int64",
                                 "feature_b": "int64", "corr": "float64", "cos": "float64"}


def splits_table(splits: Mapping[str, Sequence[SplitLevel]]) -> pd.DataFrame:
    """Every (parent, child) edge of every model (``splits``: model name -> its levels) across its size pairs."""
    frames = [level.edges.assign(model=model, size_a=level.size_a, size_b=level.size_b)
              for model, levels in splits.items() for level in levels]
    frame = pd.concat(frames) if frames else pd.DataFrame({c: [] for c in SPLIT_COLUMNS})
    return frame[list(SPLIT_COLUMNS)].astype(SPLIT_COLUMNS).reset_index(drop=True)
