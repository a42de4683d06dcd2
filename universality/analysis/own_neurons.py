"""SAE features against the neurons of their own model: the paper's "invisible in the neuron basis".

Two numbers per feature of a run's SAE. Its max activation correlation with any single MLP neuron
of the same model on the held-out comparison tokens (streamed and matched exactly as features are
matched across seeds: signed Pearson, dead and too-rare features and neurons left out), and how
spread its decoder vector is over neurons: the fewest neurons that carry 90% of its squared norm
(in the raw neuron space of the saved SAE). A feature that is a neuron in disguise scores 1 and 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from universality.analysis.heldout import HeldoutActivations, paired_chunks
from universality.runtime.atomic import atomic_path, write_text
from universality.measures.comparison import compare
from universality.core.config import CompareConfig

NORM_SHARE = 0.9  # the share of a decoder vector's squared norm whose carriers are counted
ARRAYS, STATS = "own_neurons.npz", "stats.json"


@dataclass(frozen=True)
class OwnNeurons:
    """Each feature of one SAE against its own model's neurons, and their summary over included features."""

    max_corr: np.ndarray  # [F] max Pearson correlation with a neuron (NaN: feature or all neurons excluded)
    neuron: np.ndarray  # [F] that neuron (-1: none)
    neurons_for_90pct: np.ndarray  # [F] fewest neurons carrying 90% of the decoder vector's squared norm (0: zero vector)
    stats: dict[str, float]  # max_corr_median, max_corr_mean, frac_above_<t>, neurons_for_90pct_median, ..., n_included
    directory: Path | None = None  # the cached stage folder, once saved


def neurons_for_norm_share(W_dec_FD: np.ndarray, share: float = NORM_SHARE) -> np.ndarray:
    """[F] the fewest neurons whose squared decoder entries sum to ``share`` of each vector's squared norm.

    A share hit exactly (a vector spread evenly over 10 neurons needs 9 for 90%) counts despite float
    rounding: the target is lowered by a relative 1e-9."""
    squares = np.sort(np.asarray(W_dec_FD, np.float64) ** 2, axis=1)[:, ::-1]
    cumulative = np.cumsum(squares, axis=1)
    total = cumulative[:, -1:]
    count = (cumulative < share * total * (1 - 1e-9)).sum(axis=1) + 1
    return np.where(total[:, 0] > 0, count, 0)


def compare_own_neurons(acts: HeldoutActivations, W_dec_FD: np.ndarray, cfg: CompareConfig) -> OwnNeurons:
    """Correlate the SAE's features with its own model's neurons over the stored comparison tokens, and
    measure each decoder vector's spread; features below ``cfg.min_firings`` are excluded, as across seeds."""
    result = compare(paired_chunks(acts.features(), acts.neurons()), cfg)
    matching, included = result.matching, result.census_a.included
    spread = neurons_for_norm_share(W_dec_FD)
    stats = {key: result.stats[key] for key in ("max_corr_median", "max_corr_mean",
                                                *(f"frac_above_{t:g}" for t in cfg.thresholds))}
    stats.update({
        "neurons_for_90pct_median": float(np.median(spread[included])) if included.any() else float("nan"),
        "neurons_for_90pct_mean": float(spread[included].mean()) if included.any() else float("nan"),
        "n_included": int(included.sum()),
    })
    return OwnNeurons(matching.best_b_corr, matching.best_b, spread, stats)


def save(result: OwnNeurons, directory: Path) -> None:
    with atomic_path(directory / ARRAYS) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, max_corr=result.max_corr, neuron=result.neuron, neurons_for_90pct=result.neurons_for_90pct)
    write_text(directory / STATS, json.dumps(result.stats))


def load(directory: Path) -> OwnNeurons:
    with np.load(directory / ARRAYS) as arrays:
        return OwnNeurons(arrays["max_corr"], arrays["neuron"], arrays["neurons_for_90pct"],
                          json.loads((directory / STATS).read_text()), directory)

