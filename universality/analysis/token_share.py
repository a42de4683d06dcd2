"""How much of each SAE feature and each neuron of one run is its current token, and its position in context.

Token share: the fraction of a feature's activation variance on the comparison tokens explained by the
current token's identity; position share: the same with the position in context as the group. Both are
cross-fitted over two pseudo-random halves of the rows (``token_control.GroupStatistics.share``), so a
token seen once does not score 1; the halves are those the pair stage's token control uses, so a pair's
``token_share_a`` column is this run's features' token share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from universality.analysis.heldout import CHUNK_ROWS, HeldoutActivations
from universality.measures.token_control import GroupStatistics
from universality.runtime.atomic import atomic_path, write_text

HIGH_SHARE = 0.8  # a feature whose token share is at least this is a token feature (the top bin)
ARRAYS, STATS = "token_share.npz", "stats.json"
SHARES = ("features_token", "features_position", "neurons_token", "neurons_position")


@dataclass(frozen=True)
class TokenShares:
    """Cross-fitted token and position shares of one run's SAE features [F] and neurons [M] (NaN: constant)."""

    features_token: np.ndarray
    features_position: np.ndarray
    neurons_token: np.ndarray
    neurons_position: np.ndarray
    stats: dict[str, float]  # token_share.features_median, token_share.features_frac_ge_0.8, position_share..., ...


def group_shares(matrix, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """[F] cross-fitted share of each column's variance explained by ``groups`` [N], streamed in row chunks."""
    statistics = GroupStatistics(n_groups)
    for start in range(0, matrix.shape[0], CHUNK_ROWS):
        statistics.update(matrix[start : start + CHUNK_ROWS], groups[start : start + CHUNK_ROWS])
    return statistics.share()


def share_statistics(shares: dict[str, np.ndarray], fired: np.ndarray) -> dict[str, float]:
    """Median and fraction >= ``HIGH_SHARE`` of each share, over the features that fired (``fired`` [F]) and
    the neurons that are not constant."""
    stats = {}
    for name, share in shares.items():
        basis, group = name.split("_")
        values = share[np.isfinite(share) & (fired if basis == "features" else True)]
        stats[f"{group}_share.{basis}_median"] = float(np.median(values)) if values.size else float("nan")
        stats[f"{group}_share.{basis}_frac_ge_{HIGH_SHARE:g}"] = float((values >= HIGH_SHARE).mean()) if values.size else float("nan")
    return stats


def token_shares(acts: HeldoutActivations, tokens: np.ndarray, vocab_size: int, positions: np.ndarray,
                 ctx_len: int, min_firings: int) -> TokenShares:
    """Token and position shares of a run's recorded features and neurons; ``tokens`` and ``positions`` [N] per row."""
    features, neurons = acts.features(), acts.neurons()
    shares = {"features_token": group_shares(features, tokens, vocab_size),
              "features_position": group_shares(features, positions, ctx_len),
              "neurons_token": group_shares(neurons, tokens, vocab_size),
              "neurons_position": group_shares(neurons, positions, ctx_len)}
    fired = features.getnnz(axis=0) >= min_firings
    return TokenShares(**shares, stats=share_statistics(shares, fired))


def save(shares: TokenShares, directory: Path) -> None:
    with atomic_path(directory / ARRAYS) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{name: getattr(shares, name) for name in SHARES})
    write_text(directory / STATS, json.dumps(shares.stats))


def load(directory: Path) -> TokenShares:
    with np.load(Path(directory) / ARRAYS) as arrays:
        loaded = {name: arrays[name] for name in SHARES}
    return TokenShares(**loaded, stats=json.loads((Path(directory) / STATS).read_text()))
