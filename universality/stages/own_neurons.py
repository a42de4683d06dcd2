"""The own-neurons stage: an SAE's features against its own model's neurons on the comparison tokens (the
paper's "invisible in the neuron basis"), from the recorded activations and the decoder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from universality.analysis import own_neurons
from universality.analysis.heldout import HeldoutActivations
from universality.core.config import ExperimentConfig
from universality.runtime import cache
from universality.stages.sae import RunSAE

STAGE = cache.Stage("own_neurons", 1)


def key(activations_key: str, cfg: ExperimentConfig) -> str:
    return STAGE.key(activations=activations_key, min_firings=cfg.compare.min_firings, thresholds=cfg.compare.thresholds)


def build(sae: RunSAE, acts: HeldoutActivations, cfg: ExperimentConfig, own_key: str, results_dir: Path) -> RunSAE:
    """``sae`` with its features' comparison against its model's neurons (computed once)."""

    def compute(directory: Path) -> dict:
        own_neurons.save(own_neurons.compare_own_neurons(acts, sae.decoder(), cfg.compare), directory)
        return {"run": sae.name}

    return load(STAGE.build(results_dir, own_key, compute, f"features vs own neurons of {sae.name}"), sae)


def load(directory: Path, sae: RunSAE) -> RunSAE:
    return dataclasses.replace(sae, own_neurons=own_neurons.load(directory))
