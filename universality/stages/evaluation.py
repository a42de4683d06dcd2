"""The evaluation stage: an SAE's quality on the comparison tokens (past the skipped first positions of each
context): reconstruction, sparsity, densities, loss recovered, and how much it still moved late in training.
Its own stage, so that comparison settings re-evaluate but never retrain. It runs after the activations stage
and reads the SAE features that stage recorded on exactly these tokens: the SAE runs only as its 75% snapshot
(for the convergence diagnostic), the model only once, for loss recovered, whose pass also gives the
reconstruction metrics (the recorded neurons are read back for the convergence diagnostic only). Its two large
matmuls, the unembedding of loss recovered and the snapshot's encoder, run in the SAE's precision
(``sae.precision``: bf16 where the hardware runs it fast): about 2 s less per SAE on quick, each statistic
moved by about 1e-5."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from sae.checkpoint import jsonable, load_snapshot
from sae.evaluation import Reconstruction, convergence, loss_recovered
from sae.training import matmul_dtype, resolve_precision
from universality.analysis import heldout
from universality.analysis.heldout import HeldoutActivations
from universality.core.config import ExperimentConfig
from universality.runtime import cache
from universality.runtime.atomic import write_text
from universality.stages.data import Dataset
from universality.stages.model import RunModel
from universality.stages.sae import RunSAE

STAGE = cache.Stage("evaluation", 3)  # 3: the unembedding and the snapshot's encoder in the SAE's precision; one pass
BATCH_CONTEXTS = 32  # contexts per forward pass of the evaluation


def key(dataset: Dataset, sae_key: str, activations_key: str, cfg: ExperimentConfig) -> str:
    return STAGE.key(sae=sae_key, activations=activations_key, data=dataset.key, tokens=cfg.compare.tokens,
                     skip_first_positions=cfg.compare.skip_first_positions)


def build(dataset: Dataset, model: RunModel, sae: RunSAE, acts: HeldoutActivations, cfg: ExperimentConfig,
          evaluation_key: str, device: str, results_dir: Path) -> RunSAE:
    """``sae`` with its evaluation's metrics (computed once), on what ``acts`` (its activations stage) recorded."""

    def compute(directory: Path) -> dict:
        contexts = heldout.eval_contexts(dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens)
        skip = cfg.compare.skip_first_positions
        rows = BATCH_CONTEXTS * (cfg.data.ctx_len - skip)  # the stored rows of a batch of contexts
        row_tokens = contexts[:, skip:].reshape(-1).split(rows)  # each stored row's current token
        dtype = matmul_dtype(resolve_precision(cfg.sae.precision, device))
        reconstruction = Reconstruction(sae.sae)  # filled by loss recovered's pass, from the neurons it computes
        losses = loss_recovered(model.model, sae.sae, contexts.split(BATCH_CONTEXTS), device, skip,
                                acts.feature_chunks(rows), dtype, reconstruction)
        metrics = reconstruction.metrics() | losses
        snapshot = load_snapshot(sae.directory, device)
        if snapshot is not None:
            snapshot.matmul_dtype = dtype  # its encoder only: the final SAE's features are the recorded ones
            metrics.update(convergence(sae.sae, snapshot, acts.neuron_chunks(rows), cfg.compare,
                                       acts.feature_chunks(rows), row_tokens))
        write_text(directory / "metrics.json", json.dumps(metrics, default=jsonable))
        return {"run": sae.name}

    return load(STAGE.build(results_dir, evaluation_key, compute, f"evaluation of the SAE of {sae.name}"), sae)


def load(directory: Path, sae: RunSAE) -> RunSAE:
    metrics = json.loads((directory / "metrics.json").read_text())
    metrics["densities"] = np.asarray(metrics["densities"])
    return dataclasses.replace(sae, metrics=metrics, evaluation=directory)
