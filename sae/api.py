"""Train an SAE on a user's activation file (``univ train-sae``), or a crosscoder on several models' activation
files over the same rows (``univ crosscoder``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from sae.activations import array_chunks, load_npy_activations, shuffled_batches, stacked, zero_padded
from sae.checkpoint import save_sae
from sae.crosscoder import evaluate_crosscoder
from sae.crosscoder_checkpoint import save_crosscoder
from sae.evaluation import evaluate_sae
from sae.training import train_sae
from universality.core.config import CROSSCODER_ARCHITECTURES, SAEConfig
from universality.core.errors import ConfigError, DataError
from universality.runtime.atomic import atomic_path
from universality.runtime.engine import resolve_device

HELDOUT_FRACTION = 0.1  # tail of the rows kept out of training, for the metrics
MAX_HELDOUT_ROWS = 100_000
PAPER_D_IN = 512  # the paper's λ = 0.004 was for 512 MLP neurons
LATENTS_CSV = "latents.csv"  # univ crosscoder's per-latent table: latent, norm_0 .., class, density


def default_l1_coeff(d_in: int) -> float:
    """The paper's λ carried over to ``d_in`` dims as λ ∝ 1/d_in: with E[||x||²] = d_in the MSE (a mean over
    the d_in elements) gains a²/d_in from a feature of size a, which pays λ·a, so the cut-off a = λ·d_in
    stays a fixed multiple of one element's RMS. Measured on planted dictionaries in 64 dims
    (tests/test_sae.py): λ ∝ 1/√d_in, the earlier rule, was 3x weaker there and gave an L0 5-8x the planted
    one (heavy-tailed, off-centre data: mean best cosine 0.978, L0 20 of 4.1 planted; this rule 0.989, L0 8)."""
    return SAEConfig.l1_coeff * PAPER_D_IN / d_in


def train_sae_on_npy(
    acts_path: str | Path, out_dir: str | Path, overrides: dict[str, Any], *, seed: int = 0, device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Validate the file and the settings (nothing is written on a bad input), train on all rows but
    a held-out tail, evaluate on that tail, and save the checkpoint; returns the metrics.

    ``overrides`` are SAEConfig fields; by default dict_size is 8 × d and l1_coeff ``default_l1_coeff(d)``."""
    batch_size = SAEConfig.batch_size if overrides.get("batch_size") is None else overrides["batch_size"]
    array = load_npy_activations(acts_path, min_rows=max(1, batch_size))
    n_rows, d_in = array.shape
    defaults = {"dict_size": 8 * d_in, "l1_coeff": default_l1_coeff(d_in)}
    cfg = SAEConfig(**{**defaults, **{key: value for key, value in overrides.items() if value is not None}})

    n_heldout = min(int(n_rows * HELDOUT_FRACTION), n_rows - batch_size, MAX_HELDOUT_ROWS)
    train_rows = array[: n_rows - n_heldout]
    eval_rows = array[n_rows - n_heldout :] if n_heldout > 0 else train_rows[-MAX_HELDOUT_ROWS:]
    generator = torch.Generator().manual_seed(seed)
    batches = shuffled_batches(array_chunks(train_rows, cfg.batch_size, seed), cfg.buffer_size, cfg.batch_size, generator)
    trained = train_sae(batches, cfg, d_in, seed=seed, device=resolve_device(device), progress=progress)

    metrics = evaluate_sae(trained.sae, array_chunks(eval_rows, cfg.batch_size, seed=None))
    metrics.update(heldout_rows=n_heldout, train_rows=len(train_rows), source=str(acts_path))
    save_sae(trained, cfg, out_dir, metrics)
    return metrics | {"cfg": dataclasses.asdict(cfg)}



def train_crosscoder_on_npy(
    acts_paths: Sequence[str | Path], out_dir: str | Path, overrides: dict[str, Any], *, seed: int = 0,
    device: str = "auto", progress: bool = True,
) -> dict[str, Any]:
    """What ``univ crosscoder`` runs: validate every file and the settings (nothing is written on a bad input), train
    one crosscoder on their rows (row n of every file: the same token in each model) but a held-out tail, evaluate it
    on that tail, and write its checkpoint and ``latents.csv`` into ``out_dir``; returns the metrics.

    The files' dims may differ (each model is read zero-padded to the widest; ``sae.crosscoder``). ``overrides`` are
    SAEConfig fields; by default arch "crosscoder-batchtopk", 8 × the widest d latents and, for L1,
    ``default_l1_coeff`` of the models' summed dims."""
    if len(acts_paths) < 2:
        raise ConfigError(f"a crosscoder needs activations of at least two models, got {len(acts_paths)} file(s)")
    batch_size = SAEConfig.batch_size if overrides.get("batch_size") is None else overrides["batch_size"]
    arrays = [load_npy_activations(path, min_rows=max(1, batch_size)) for path in acts_paths]
    if len({len(a) for a in arrays}) != 1:
        raise DataError(f"the activation files must have the same rows (one per token); their row counts are "
                        f"{', '.join(str(len(a)) for a in arrays)}")
    n_rows, dims = len(arrays[0]), [a.shape[1] for a in arrays]
    d_in = max(dims)  # narrower models are read zero-padded to the widest (sae.crosscoder)
    defaults = {"arch": "crosscoder-batchtopk", "dict_size": 8 * d_in, "l1_coeff": default_l1_coeff(sum(dims))}
    cfg = SAEConfig(**{**defaults, **{key: value for key, value in overrides.items() if value is not None}})
    if cfg.arch not in CROSSCODER_ARCHITECTURES:
        raise ConfigError(f"a crosscoder's arch must be one of {', '.join(CROSSCODER_ARCHITECTURES)}, not {cfg.arch!r}")

    n_heldout = min(int(n_rows * HELDOUT_FRACTION), n_rows - batch_size, MAX_HELDOUT_ROWS)
    train_rows = [a[: n_rows - n_heldout] for a in arrays]
    eval_rows = [a[n_rows - n_heldout :] if n_heldout > 0 else a[: n_rows - n_heldout][-MAX_HELDOUT_ROWS:] for a in arrays]

    def tokens(rows: list[np.ndarray], order_seed: int | None) -> Iterator[Tensor]:
        """Chunks [n, M, d_in] of every file's rows at the same tokens, each model zero-padded to the widest."""
        return stacked([zero_padded(array_chunks(r, cfg.batch_size, order_seed), d_in) for r in rows])

    generator = torch.Generator().manual_seed(seed)
    batches = shuffled_batches(tokens(train_rows, seed), cfg.buffer_size, cfg.batch_size, generator)
    trained = train_sae(batches, cfg, d_in, seed=seed, device=resolve_device(device), progress=progress,
                        model_dims=None if len(set(dims)) == 1 else dims)

    metrics = evaluate_crosscoder(trained.sae, tokens(eval_rows, None))
    latents = pd.DataFrame(metrics.pop("latents"))
    metrics.update(heldout_rows=n_heldout, train_rows=n_rows - n_heldout, sources=[str(p) for p in acts_paths], dims=dims)
    out = save_crosscoder(trained, cfg, Path(out_dir), metrics)
    columns = ["latent", *(f"norm_{m}" for m in range(len(arrays))), "class", "density"]
    with atomic_path(out / LATENTS_CSV) as tmp:
        latents[columns].to_csv(tmp, index=False)
    return metrics | {"cfg": dataclasses.asdict(cfg)}
