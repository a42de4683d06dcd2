"""The activations stage: one run's neurons and SAE features on the comparison tokens, recorded once and
read by every pair, split level and own-neuron comparison it belongs to (``analysis.heldout``)."""

from __future__ import annotations

from pathlib import Path

from universality.analysis import heldout
from universality.analysis.heldout import HeldoutActivations
from universality.core.config import ExperimentConfig
from universality.runtime import cache
from universality.stages.data import Dataset
from universality.stages.model import RunModel
from universality.stages.sae import RunSAE

STAGE = cache.Stage("activations", 3)  # 3: the first compare.skip_first_positions of each context left out


def key(dataset: Dataset, sae_key: str, cfg: ExperimentConfig) -> str:
    return STAGE.key(sae=sae_key, tokens=cfg.compare.tokens, top_k=cfg.compare.top_k_examples, data=dataset.key,
                     skip_first_positions=cfg.compare.skip_first_positions)


def build(dataset: Dataset, model: RunModel, sae: RunSAE, cfg: ExperimentConfig, activations_key: str, device: str,
          results_dir: Path) -> HeldoutActivations:
    def compute(directory: Path) -> dict:
        contexts = heldout.eval_contexts(dataset.heldout, cfg.data.ctx_len, cfg.compare.tokens)
        heldout.record(model.model, sae.sae, contexts, directory, device, cfg.compare.top_k_examples,
                       cfg.compare.skip_first_positions)
        return {"run": model.name}

    return load(STAGE.build(results_dir, activations_key, compute, f"held-out activations of {model.name}"))


def load(directory: Path) -> HeldoutActivations:
    return HeldoutActivations(directory)
