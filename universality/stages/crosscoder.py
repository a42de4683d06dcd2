"""The crosscoder stages: one sparse crosscoder over several models' MLP activations at the same training tokens
(``crosscoder``: training), and its evaluation on the comparison tokens (``crosscoder_eval``): FVU per model, L0,
dead latents, class counts, the per-latent table (decoder norms, class, Latent Scaling, density) saved as Parquet,
each latent's top examples, and the latents' activations, which the seed-stability control and the comparison
with per-model SAE matching read (``analysis.crosscoder``). Two stages, as an SAE and its evaluation are:
comparison settings re-evaluate but never retrain.

A run fits the crosscoder over every seed's trained model, and, as configured, its controls: the first seed's model
with itself (identical inputs), with its weight-shuffled copy, and extra crosscoder seeds on the same models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from sae.activations import model_activations, shuffled_batches, stacked
from sae.checkpoint import jsonable
from sae.crosscoder import Crosscoder, evaluate_crosscoder
from sae.crosscoder_checkpoint import load_crosscoder_dir, save_crosscoder
from sae.training import resolve_precision, train_sae
from universality.analysis import heldout
from universality.core.config import ExperimentConfig
from universality.measures.correlation import to_csr
from universality.runtime import cache
from universality.runtime.atomic import atomic_path, write_text
from universality.stages import data
from universality.stages.model import RunModel

STAGE = cache.Stage("crosscoder", 1)
EVAL_STAGE = cache.Stage("crosscoder_eval", 1)
REPLICATE_SEED_STRIDE = 1_000_003  # extra crosscoder seed r trains with crosscoder.seed + r * stride
LATENTS, LATENT_ACTS, TOP_VALUES, TOP_POSITIONS = "latents.parquet", "latent_acts.npz", "top_values.npy", "top_positions.npy"
BATCH_CONTEXTS = 32  # contexts per forward pass of the evaluation


@dataclass(frozen=True)
class RunCrosscoder:
    """A trained crosscoder and its evaluation on the comparison tokens."""

    name: str  # "crosscoder", "crosscoder-r1", "crosscoder-identity", "crosscoder-shuffled"
    models: tuple[str, ...]  # the run names of its models, in decoder order
    directory: Path  # the training stage's folder
    key: str
    crosscoder: Crosscoder
    history: list[dict]
    resampling_events: list[dict]
    metrics: dict  # evaluate_crosscoder's scalars: tokens, fvu (per model), l0, dead_fraction, class_counts
    latents: pd.DataFrame  # crosscoder_latents.latent_table, a row per latent
    evaluation: Path  # the evaluation stage's folder

    def latent_activations(self) -> sp.csr_matrix:
        """[tokens, latents] on the comparison tokens, in the rows of every run's held-out activations."""
        return sp.load_npz(self.evaluation / LATENT_ACTS).tocsr()

    def top_examples(self) -> tuple[np.ndarray, np.ndarray]:
        """Each latent's top activations [F, k] and their positions in the flat comparison tokens (-1: none)."""
        return np.load(self.evaluation / TOP_VALUES), np.load(self.evaluation / TOP_POSITIONS)


def crosscoder_seed(cfg: ExperimentConfig, replicate: int) -> int:
    return cfg.crosscoder.seed + REPLICATE_SEED_STRIDE * replicate


def key(model_keys: Sequence[str], cfg: ExperimentConfig, device: str, replicate: int = 0) -> str:
    """The models (in order), the crosscoder's training fields (with the resolved precision) and its seed: nothing
    about evaluation, and not which controls or how many seeds a run asks for."""
    sae_cfg = cfg.crosscoder.sae_config(cfg.sae)
    fields = sae_cfg.training_fields() | {"precision": resolve_precision(sae_cfg.precision, device)}
    return STAGE.key(models=list(model_keys), crosscoder=fields, seed=crosscoder_seed(cfg, replicate))


def eval_key(dataset_key: str, crosscoder_key: str, cfg: ExperimentConfig) -> str:
    return EVAL_STAGE.key(crosscoder=crosscoder_key, data=dataset_key, tokens=cfg.compare.tokens,
                          skip_first_positions=cfg.compare.skip_first_positions, top_k=cfg.compare.top_k_examples)


def build(dataset_dir: Path, dataset_key: str, models: Sequence[RunModel], name: str, cfg: ExperimentConfig,
          replicate: int, train_key: str, evaluation_key: str, device: str, results_dir: Path,
          progress: bool = True) -> RunCrosscoder:
    """Fit (or reuse) the crosscoder over ``models``' MLP activations at the same training tokens, then evaluate it
    (or reuse its evaluation) on the comparison tokens."""
    dataset = data.load(dataset_dir, dataset_key)
    sae_cfg = cfg.crosscoder.sae_config(cfg.sae)
    seed = crosscoder_seed(cfg, replicate)

    def train(directory: Path) -> dict:
        seqs = max(1, sae_cfg.batch_size // cfg.data.ctx_len)
        sources = [model_activations(m.model, dataset.train, cfg.data.ctx_len, seqs, device, seed=seed) for m in models]
        batches = shuffled_batches(stacked(sources), sae_cfg.buffer_size, sae_cfg.batch_size,
                                   torch.Generator().manual_seed(seed))
        trained = train_sae(batches, sae_cfg, models[0].model.cfg.d_mlp, seed=seed, device=device, progress=progress,
                            checkpoint_dir=directory / cache.SCRATCH)
        save_crosscoder(trained, sae_cfg, directory, {"models": [m.name for m in models]})
        return {"run": name}

    folder = STAGE.build(results_dir, train_key, train, f"{name} over {', '.join(m.name for m in models)}")
    crosscoder, saved = load_crosscoder_dir(folder, device)

    def evaluate(directory: Path) -> dict:
        contexts = heldout.eval_contexts(dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens)
        batches = lambda: comparison_batches(models, contexts, device, cfg.compare.skip_first_positions)  # noqa: E731
        metrics = evaluate_crosscoder(crosscoder, batches())
        latents = pd.DataFrame(metrics.pop("latents"))
        with atomic_path(directory / LATENTS) as tmp:
            latents.to_parquet(tmp, index=False)
        record_latents(crosscoder, batches(), directory, cfg.compare.top_k_examples, cfg.data.ctx_len,
                       cfg.compare.skip_first_positions)
        write_text(directory / "metrics.json", json.dumps(metrics, default=jsonable))
        return {"run": name}

    evaluation = EVAL_STAGE.build(results_dir, evaluation_key, evaluate, f"evaluation of {name}")
    return load(folder, evaluation, name, train_key, crosscoder, saved)


def comparison_batches(models: Sequence[RunModel], contexts: torch.Tensor, device: str, skip: int) -> Iterator[torch.Tensor]:
    """Every model's MLP neurons on the comparison tokens, [tokens, M, d_mlp] per batch of contexts: the rows of
    each run's held-out activations (``analysis.heldout.mlp_neurons``)."""
    return stacked([heldout.mlp_neurons(m.model, contexts, device, skip, BATCH_CONTEXTS) for m in models])


@torch.no_grad()
def record_latents(crosscoder: Crosscoder, batches: Iterator[torch.Tensor], directory: Path, top_k: int, ctx_len: int,
                   skip: int) -> None:
    """The latents' activations (sparse) on the comparison tokens and each latent's top ``top_k`` examples."""
    chunks, top = [], heldout.StreamingTopK(crosscoder.d_sae, top_k)
    for x_BMD in batches:
        f_BF = crosscoder.encode(x_BMD.to(crosscoder.W_dec.device, torch.float32)).cpu()
        chunks.append(to_csr(f_BF))
        top.update(f_BF)
    with atomic_path(directory / LATENT_ACTS) as tmp:
        with open(tmp, "wb") as f:
            sp.save_npz(f, sp.vstack(chunks, format="csr"))
    top_values, top_rows = top.result()
    for file, array in ((TOP_VALUES, top_values), (TOP_POSITIONS, heldout.token_positions(top_rows, ctx_len, skip))):
        with atomic_path(directory / file) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, array)


def load(directory: Path, evaluation: Path, name: str, train_key: str, crosscoder: Crosscoder, saved: dict) -> RunCrosscoder:
    metrics = json.loads((evaluation / "metrics.json").read_text())
    return RunCrosscoder(name, tuple(saved["models"]), directory, train_key, crosscoder, saved["history"],
                         saved["resampling_events"], metrics, pd.read_parquet(evaluation / LATENTS), evaluation)


def is_cached(results_dir: Path, train_key: str, evaluation_key: str) -> bool:
    """Whether both the training and the evaluation are complete: then ``build`` only looks them up."""
    return STAGE.is_cached(results_dir, train_key) and EVAL_STAGE.is_cached(results_dir, evaluation_key)
