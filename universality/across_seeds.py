"""From pairwise matchings to statements about N seeds.

Runs are numbered 0..R-1 and ``matchings[(i, j)]`` (i < j) matches run i's features (A) to
run j's (B). From those: in how many other runs each feature has a good partner; feature
families (connected components of the mutual-match graph, so a family is "the same
feature" found in several runs); and any per-pair statistic summarized over the pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from universality.matching import Matching

RunPair = tuple[int, int]
FAMILY_MIN_CORR = 0.5  # mutual matches above this correlation link features into a family


def _n_features(matchings: Mapping[RunPair, Matching]) -> dict[int, int]:
    """Features per run, read off the matchings (and checked to agree)."""
    sizes: dict[int, int] = {}
    for (i, j), m in matchings.items():
        for run, size in ((i, m.best_b.size), (j, m.best_a.size)):
            if sizes.setdefault(run, size) != size:
                raise ValueError(f"run {run} has {size} features in pair {(i, j)} but {sizes[run]} in another")
    return sizes


def included_features(matchings: Mapping[RunPair, Matching]) -> dict[int, np.ndarray]:
    """Per run, [F] bool: features that take part in matching (not dead, not too rare to correlate).
    An excluded feature has a NaN max correlation in every pair, so any pair tells."""
    included = {}
    for (i, j), m in matchings.items():
        included[i], included[j] = ~np.isnan(m.best_b_corr), ~np.isnan(m.best_a_corr)
    return included


def partner_counts(matchings: Mapping[RunPair, Matching], threshold: float) -> dict[int, np.ndarray]:
    """Per run, [F] int: in how many other runs each feature's max-correlation partner exceeds ``threshold``."""
    counts = {run: np.zeros(size, dtype=np.int64) for run, size in _n_features(matchings).items()}
    for (i, j), m in matchings.items():
        counts[i] += np.nan_to_num(m.best_b_corr, nan=0.0) > threshold
        counts[j] += np.nan_to_num(m.best_a_corr, nan=0.0) > threshold
    return counts


@dataclass(frozen=True)
class Families:
    """Feature families: connected components of the graph whose edges are mutual matches."""

    family: dict[int, np.ndarray]  # run -> [F] family id of each feature
    size: np.ndarray  # [n_families] features in each family (singletons included)
    n_runs: np.ndarray  # [n_families] distinct runs a family spans

    def size_distribution(self) -> dict[int, int]:
        """Family size -> number of families of that size."""
        sizes, n = np.unique(self.size, return_counts=True)
        return {int(s): int(c) for s, c in zip(sizes, n)}


def feature_families(matchings: Mapping[RunPair, Matching], min_corr: float = 0.0) -> Families:
    """Families from the mutual nearest-neighbour pairs with correlation above ``min_corr``."""
    sizes = _n_features(matchings)
    runs = sorted(sizes)
    offset = dict(zip(runs, np.cumsum([0] + [sizes[r] for r in runs[:-1]])))
    n_nodes = sum(sizes.values())
    src, dst = [], []
    for (i, j), m in matchings.items():
        a, b = m.mutual_pairs()
        keep = m.best_b_corr[a] > min_corr
        src.append(offset[i] + a[keep])
        dst.append(offset[j] + b[keep])
    src_all = np.concatenate(src) if src else np.zeros(0, int)
    dst_all = np.concatenate(dst) if dst else np.zeros(0, int)
    graph = sp.coo_matrix((np.ones(src_all.size), (src_all, dst_all)), shape=(n_nodes, n_nodes))
    _, labels = connected_components(graph, directed=False)
    run_of_node = np.repeat(runs, [sizes[r] for r in runs])
    family_run = np.unique(np.stack([labels, run_of_node]), axis=1)  # distinct (family, run) pairs
    n_runs = np.bincount(family_run[0], minlength=labels.max() + 1)
    family = {r: labels[offset[r] : offset[r] + sizes[r]] for r in runs}
    return Families(family=family, size=np.bincount(labels), n_runs=n_runs)


def summarize(values: Sequence[float], n_bootstrap: int, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean, sample std and a percentile bootstrap confidence interval of the mean.

    Pairs of N seeds share runs, so they are not independent: read the interval as indicative.
    """
    x = np.asarray(values, np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    means = np.random.default_rng(seed).choice(x, size=(n_bootstrap, x.size), replace=True).mean(axis=1)
    tail = (1 - level) / 2
    return {
        "mean": float(x.mean()),
        "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "ci_low": float(np.quantile(means, tail)),
        "ci_high": float(np.quantile(means, 1 - tail)),
        "n": int(x.size),
    }


def summarize_pairs(pair_stats: Sequence[Mapping[str, float]], n_bootstrap: int, seed: int = 0) -> dict[str, float]:
    """Every statistic shared by all pairs, summarized over pairs: ``{key}_mean``, ``{key}_std``, ``{key}_ci_low``, ..."""
    keys = [k for k in pair_stats[0] if all(k in s for s in pair_stats)] if pair_stats else []
    return {
        f"{key}_{name}": value
        for key in keys
        for name, value in summarize([s[key] for s in pair_stats], n_bootstrap, seed).items()
    }
