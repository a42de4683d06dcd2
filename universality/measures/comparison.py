"""Compare two runs on the same tokens: stream their activations, correlate, match, summarize.

The one call the pipeline makes per pair and per basis (SAE features, neurons, rotated
neurons): ``compare(chunks, cfg)`` with ``chunks`` yielding ``(acts_a, acts_b)`` for the same
tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd

from universality.core.config import CompareConfig
from universality.measures.correlation import Activations, StreamingCorrelation
from universality.measures.matching import Matching, match
from universality.measures.statistics import FeatureCensus, pair_statistics


@dataclass(frozen=True)
class PairComparison:
    """Everything learned about one pair of runs in one basis."""

    corr: np.ndarray  # [F_A, F_B] float32 Pearson correlation over the eval tokens
    census_a: FeatureCensus  # A's firing counts, densities, dead / ultralow / included
    census_b: FeatureCensus
    matching: Matching  # among included features only
    stats: dict[str, float]  # pair_statistics: flat, loggable

    def table(self) -> pd.DataFrame:
        """One row per feature of A: its partners, their correlations and the densities."""
        m = self.matching
        density_b = np.append(self.census_b.density, np.nan)  # index NO_PARTNER (-1) -> NaN
        return pd.DataFrame(
            {
                "feature_a": np.arange(m.best_b.size),
                "feature_b": m.best_b,
                "corr": m.best_b_corr,
                "hungarian_b": m.hungarian_b,
                "hungarian_corr": m.hungarian_corr,
                "mutual": m.mutual,
                "density_a": self.census_a.density,
                "density_b": density_b[m.best_b],
                "dead_a": self.census_a.dead,
                "ultralow_a": self.census_a.ultralow,
            }
        )


def correlate(chunks: Iterable[tuple[Activations, Activations]],
              min_firings: int) -> tuple[np.ndarray, FeatureCensus, FeatureCensus]:
    """The Pearson correlation [F_A, F_B] of A's and B's features streamed over all chunks, and each
    side's census (features firing fewer than ``min_firings`` times are too rare to correlate)."""
    acc = StreamingCorrelation()
    for acts_a, acts_b in chunks:
        acc.update(acts_a, acts_b)
    return (acc.correlation(), FeatureCensus(acc.counts_a, acc.dead_a, acc.n_tokens, min_firings),
            FeatureCensus(acc.counts_b, acc.dead_b, acc.n_tokens, min_firings))


def compare(chunks: Iterable[tuple[Activations, Activations]], cfg: CompareConfig) -> PairComparison:
    """Correlate A's and B's features over all chunks, match the included ones, and summarize.

    Uses ``cfg.min_firings`` and ``cfg.thresholds``; the caller decides how many tokens to stream.
    """
    corr, census_a, census_b = correlate(chunks, cfg.min_firings)
    matching = match(corr, census_a.included, census_b.included)
    stats = pair_statistics(matching, census_a, census_b, cfg.thresholds)
    return PairComparison(corr, census_a, census_b, matching, stats)
