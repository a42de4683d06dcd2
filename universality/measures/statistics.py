"""Universality statistics of one pair of runs, and their null baseline.

Given the matching of A's features to B's and each side's firing counts: how correlated the
partners are (mean/median max correlation, fraction above thresholds, Hungarian mean, mutual
pairs), overall and by feature-density decile. Dead and ultralow-density features are counted
and left out of every average, as the paper does. Next to the statistic sits its baseline
(Gurnee et al.): B's neurons under a random rotation, and the excess correlation over it.
All results are flat dicts of floats/ints, ready to log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from universality.measures.matching import NO_PARTNER, Matching

ULTRALOW_DENSITY = 1e-6  # the paper: features firing on fewer than 1 in a million tokens are excluded
N_DECILES = 10
UNIVERSAL_EXCESS = 0.5  # Gurnee et al.: a neuron is universal if its excess correlation exceeds this


@dataclass(frozen=True)
class FeatureCensus:
    """Which features of one run can be correlated: dead, ultralow density, or included."""

    counts: np.ndarray  # [F] tokens on which each feature fired (> 0)
    dead: np.ndarray  # [F] bool: never fired, or constant
    n_tokens: int
    min_firings: int  # fewer firings than this on the eval tokens: too rare to correlate

    @property
    def density(self) -> np.ndarray:
        return self.counts / self.n_tokens

    @property
    def ultralow(self) -> np.ndarray:
        """Alive, but firing on < 1 in a million tokens or fewer than ``min_firings`` times."""
        rare = (self.counts < self.min_firings) | (self.density < ULTRALOW_DENSITY)
        return ~self.dead & rare

    @property
    def included(self) -> np.ndarray:
        return ~self.dead & ~self.ultralow

    def summary(self, side: str) -> dict[str, int]:
        return {
            f"n_features_{side}": int(self.counts.size),
            f"n_dead_{side}": int(self.dead.sum()),
            f"n_ultralow_{side}": int(self.ultralow.sum()),
            f"n_included_{side}": int(self.included.sum()),
        }


def density_deciles(density: np.ndarray, included: np.ndarray) -> np.ndarray:
    """[F] decile 0..9 of each included feature by firing density (equal counts), -1 if excluded."""
    decile = np.full(density.size, -1)
    idx = np.flatnonzero(included)
    for d, part in enumerate(np.array_split(idx[np.argsort(density[idx], kind="stable")], N_DECILES)):
        decile[part] = d
    return decile


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if x.size else float("nan")


def _correlation_summary(matching: Matching, rows: np.ndarray, thresholds: Sequence[float]) -> dict[str, float]:
    """Max-correlation, Hungarian and mutual-pair statistics over the A features in ``rows``."""
    max_corr = np.nan_to_num(matching.best_b_corr[rows], nan=0.0)  # no live partner: nothing correlates
    hungarian = matching.hungarian_corr[rows]
    return {
        "n": int(rows.size),
        "max_corr_mean": _mean(max_corr),
        "max_corr_median": _median(max_corr),
        **{f"frac_above_{t:g}": _mean(max_corr > t) for t in thresholds},
        "hungarian_mean": _mean(hungarian[matching.hungarian_b[rows] != NO_PARTNER]),
        "n_mutual": int(matching.mutual[rows].sum()),
    }


def pair_statistics(
    matching: Matching, census_a: FeatureCensus, census_b: FeatureCensus, thresholds: Sequence[float]
) -> dict[str, float]:
    """Statistics of A's included features matched into B (and B's into A), overall and by density decile.

    ``matching`` should come from ``match(corr, census_a.included, census_b.included)``, so
    excluded features are neither averaged nor anyone's partner.
    """
    rows = np.flatnonzero(census_a.included)
    overall = _correlation_summary(matching, rows, thresholds)
    del overall["n"]
    max_corr_ba = np.nan_to_num(matching.best_a_corr[census_b.included], nan=0.0)
    stats: dict[str, float] = {
        **census_a.summary("a"),
        **census_b.summary("b"),
        **overall,
        "max_corr_mean_ba": _mean(max_corr_ba),
        "max_corr_median_ba": _median(max_corr_ba),
    }
    decile = density_deciles(census_a.density, census_a.included)
    for d in range(N_DECILES):
        members = np.flatnonzero(decile == d)
        stats[f"decile{d}_density_max"] = float(census_a.density[members].max()) if members.size else float("nan")
        stats.update({f"decile{d}_{k}": v for k, v in _correlation_summary(matching, members, thresholds).items()})
    return stats


def random_rotation(dim: int, seed: int) -> np.ndarray:
    """A seeded Haar-random orthogonal matrix [dim, dim]: QR of a Gaussian with R's signs fixed.

    Rotating B's neuron activations (``acts_b @ Q``) keeps all the information but no
    privileged basis: the null model for "neurons match because the basis is shared".
    """
    gaussian = np.random.default_rng(seed).standard_normal((dim, dim))
    q, r = np.linalg.qr(gaussian)
    return q * np.sign(np.diag(r))  # without the fix QR's output is not uniformly distributed


def excess_correlation(max_corr: np.ndarray, baseline_max_corr: np.ndarray) -> np.ndarray:
    """Per feature: max correlation with B minus max correlation with the baseline (rotated B).

    NaN where either is missing (an excluded feature): not comparable.
    """
    return np.asarray(max_corr, np.float64) - np.asarray(baseline_max_corr, np.float64)


def excess_statistics(max_corr: np.ndarray, baseline_max_corr: np.ndarray) -> dict[str, float]:
    """Gurnee et al.'s summary: mean excess correlation and the fraction that is universal."""
    excess = excess_correlation(max_corr, baseline_max_corr)
    comparable = ~np.isnan(excess)
    return {
        "baseline_max_corr_mean": _mean(np.asarray(baseline_max_corr)[comparable]),
        "excess_corr_mean": _mean(excess[comparable]),
        "frac_universal": _mean(excess[comparable] > UNIVERSAL_EXCESS),
        "n_comparable": int(comparable.sum()),
    }
