"""From pairwise matchings to statements about N seeds.

Runs are numbered 0..R-1 and ``matchings[(i, j)]`` (i < j) matches run i's features (A) to
run j's (B). From those: in how many other runs each feature has a good partner; feature
families (connected components of the mutual-match graph, so a family is "the same
feature" found in several runs); and any per-pair statistic summarized over the pairs, with a
confidence interval from resampling seeds (pairs share seeds, so they are not independent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from universality.measures.matching import Matching

RunPair = tuple[int, int]
FAMILY_MIN_CORR = 0.5  # mutual matches above this correlation link features into a family
MIN_SEEDS_FOR_INTERVAL = 3  # seeds a bootstrap interval needs (below, none is given)


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


def unit_counts(n_units: int, n_bootstrap: int, seed: int = 0) -> np.ndarray:
    """[n_bootstrap, n_units] counts: how often each seed (the sampled unit) is drawn, with replacement,
    in each bootstrap resample of ``n_units`` seeds."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1 / n_units), size=n_bootstrap)


def resampled_means(values: np.ndarray, pair_units: Sequence[tuple[int, ...]], counts_BU: np.ndarray) -> np.ndarray:
    """[B] the statistic's mean over the pairs among each resample's drawn seeds.

    A cross-model pair (i, j) appears once for every two drawn positions holding i and j, i.e.
    ``c_i · c_j`` times; a same-model pair (i,) once per draw of i (``c_i``); a seed drawn twice
    makes no pair with itself. NaN where a resample holds no pair with a value (e.g. one seed drawn N times).
    """
    values = np.asarray(values, np.float64)
    weights_BP = np.ones((len(counts_BU), len(pair_units)))
    for p, units in enumerate(pair_units):
        for unit in set(units):
            weights_BP[:, p] *= counts_BU[:, unit]
    present = ~np.isnan(values)
    weights_BP = weights_BP[:, present]
    total = weights_BP.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weights_BP @ values[present] / total, np.nan)


def summarize(values: Sequence[float], pair_units: Sequence[tuple[int, ...]], n_units: int, n_bootstrap: int,
              seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean and sample std of a per-pair statistic over pairs, and (from 3 seeds on) a percentile
    bootstrap interval of the mean that respects the design: pairs share seeds, so seeds (not pairs) are resampled and the
    mean is recomputed over the pairs among the drawn seeds (``resampled_means``)."""
    x = np.asarray(values, np.float64)
    present = x[~np.isnan(x)]
    if present.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    summary = {"mean": float(present.mean()), "std": float(present.std(ddof=1)) if present.size > 1 else 0.0,
               "n": int(present.size)}
    if len({unit for units in pair_units for unit in units}) < MIN_SEEDS_FOR_INTERVAL:
        return summary  # the resamples of two seeds hold one pair or none: no interval to speak of
    means = resampled_means(x, pair_units, unit_counts(n_units, n_bootstrap, seed))
    means = means[~np.isnan(means)]
    tail = (1 - level) / 2
    return summary | {"ci_low": float(np.quantile(means, tail)), "ci_high": float(np.quantile(means, 1 - tail))}


def summarize_pairs(pair_stats: Sequence[Mapping[str, float]], pair_units: Sequence[tuple[int, ...]], n_units: int,
                    n_bootstrap: int, seed: int = 0) -> dict[str, float]:
    """Every statistic shared by all pairs, summarized over pairs: ``{key}_mean``, ``{key}_std``, ``{key}_ci_low``, ...

    ``pair_units[p]`` names the seeds pair p is made of (indices below ``n_units``): ``(i, j)`` for
    two models, ``(i,)`` for two SAEs of model i."""
    keys = [k for k in pair_stats[0] if all(k in s for s in pair_stats)] if pair_stats else []
    return {
        f"{key}_{name}": value
        for key in keys
        for name, value in summarize([s[key] for s in pair_stats], pair_units, n_units, n_bootstrap, seed).items()
    }
