"""Matching the features of run A to those of run B by activation correlation (Li et al. 2016).

Three matchings of one correlation matrix: the max-correlation partner in each direction
(semi-matching, several A features may share a partner), the one-to-one Hungarian
matching that maximizes the total correlation, and mutual nearest neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

NO_PARTNER = -1


@dataclass(frozen=True)
class Matching:
    """Partners of A's features (rows) in B (columns); ``NO_PARTNER`` and NaN where there is none."""

    best_b: np.ndarray  # [F_A] int: the most correlated B feature of each A feature
    best_b_corr: np.ndarray  # [F_A] float: its correlation
    best_a: np.ndarray  # [F_B] int: the most correlated A feature of each B feature
    best_a_corr: np.ndarray  # [F_B] float
    hungarian_b: np.ndarray  # [F_A] int: one-to-one partner maximizing the summed correlation
    hungarian_corr: np.ndarray  # [F_A] float
    mutual: np.ndarray  # [F_A] bool: A's best partner has this A feature as its own best partner

    @property
    def n_mutual(self) -> int:
        return int(self.mutual.sum())

    def mutual_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(A indices, B indices) of the mutual nearest-neighbour pairs."""
        a = np.flatnonzero(self.mutual)
        return a, self.best_b[a]


def _best(corr: np.ndarray, valid_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the argmax over valid columns and its value (``NO_PARTNER``/NaN if none)."""
    cols = np.flatnonzero(valid_cols)
    if cols.size == 0:
        return np.full(corr.shape[0], NO_PARTNER), np.full(corr.shape[0], np.nan)
    sub = corr[:, cols]
    arg = sub.argmax(axis=1)
    return cols[arg], sub[np.arange(corr.shape[0]), arg].astype(np.float64)


def match(corr: np.ndarray, valid_a: np.ndarray | None = None, valid_b: np.ndarray | None = None) -> Matching:
    """All three matchings of ``corr`` [F_A, F_B], among valid features only.

    Invalid features (dead or too rare to correlate: see ``statistics.FeatureCensus``) get no
    partner and are never anyone's partner. Rectangular matrices are fine: the Hungarian
    matching then leaves the surplus features of the larger side unpaired.
    """
    corr = np.asarray(corr)
    valid_a = np.ones(corr.shape[0], bool) if valid_a is None else np.asarray(valid_a, bool)
    valid_b = np.ones(corr.shape[1], bool) if valid_b is None else np.asarray(valid_b, bool)

    best_b, best_b_corr = _best(corr, valid_b)
    best_a, best_a_corr = _best(corr.T, valid_a)
    for partner, value, valid in ((best_b, best_b_corr, valid_a), (best_a, best_a_corr, valid_b)):
        partner[~valid], value[~valid] = NO_PARTNER, np.nan

    has_partner = best_b != NO_PARTNER
    mutual = np.zeros(corr.shape[0], bool)
    mutual[has_partner] = best_a[best_b[has_partner]] == np.flatnonzero(has_partner)

    hungarian_b = np.full(corr.shape[0], NO_PARTNER)
    hungarian_corr = np.full(corr.shape[0], np.nan)
    rows_a, cols_b = np.flatnonzero(valid_a), np.flatnonzero(valid_b)
    if rows_a.size and cols_b.size:
        r, c = linear_sum_assignment(corr[np.ix_(rows_a, cols_b)], maximize=True)
        hungarian_b[rows_a[r]] = cols_b[c]
        hungarian_corr[rows_a[r]] = corr[rows_a[r], cols_b[c]]

    return Matching(best_b, best_b_corr, best_a, best_a_corr, hungarian_b, hungarian_corr, mutual)
