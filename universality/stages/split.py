"""The split stage (a dictionary family only): one model's dictionaries of consecutive sizes compared on the
comparison tokens, every parent feature against every child (``measures.splitting``), cached per size pair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from universality.analysis.heldout import paired_chunks
from universality.core.config import ExperimentConfig
from universality.measures import splitting
from universality.runtime import cache
from universality.runtime.atomic import atomic_path, write_text

STAGE = cache.Stage("split", 1)


def key(activations_a: str, activations_b: str, cfg: ExperimentConfig) -> str:
    """Both dictionaries' activations (which fix the tokens) and the compare settings a split level uses."""
    return STAGE.key(a=activations_a, b=activations_b, min_firings=cfg.compare.min_firings, min_corr=splitting.CHILD_MIN_CORR)


def build(a, b, cfg: ExperimentConfig, split_key: str, results_dir: Path) -> splitting.SplitLevel:
    """A's features (an ``SAERun`` of the smaller dictionary) against B's (the next larger, same model): activation
    correlations and decoder cosines of every parent and child."""

    def compute(directory: Path) -> dict:
        chunks = paired_chunks(a.activations.features(), b.activations.features())
        save(splitting.compare_sizes(chunks, a.sae.decoder(), b.sae.decoder(), cfg.compare.min_firings), directory)
        return {"split": [a.name, b.name]}

    return load(STAGE.build(results_dir, split_key, compute, f"{a.name} into {b.name}"))


def save(level: splitting.SplitLevel, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "edges.parquet") as tmp:
        level.edges.to_parquet(tmp, index=False)
    with atomic_path(directory / "features.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, included_a=level.included_a, included_b=level.included_b, density_a=level.density_a,
                     density_b=level.density_b)
    write_text(directory / "level.json", json.dumps({"size_a": level.size_a, "size_b": level.size_b}))


def load(directory: Path) -> splitting.SplitLevel:
    sizes = json.loads((directory / "level.json").read_text())
    with np.load(directory / "features.npz") as arrays:
        features = {name: arrays[name] for name in arrays.files}
    edges = pd.read_parquet(directory / "edges.parquet").astype(splitting.EDGE_COLUMNS)
    return splitting.SplitLevel(sizes["size_a"], sizes["size_b"], edges, **features)
