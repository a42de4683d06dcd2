"""Architecture name -> SAE class: a new architecture is one file plus one line here."""

from __future__ import annotations

import torch

from sae.base import SAE
from sae.relu import ReLUSAE
from sae.topk import TopKSAE
from universality.core.config import SAEConfig
from universality.core.errors import ConfigError

SAE_CLASSES: dict[str, type[SAE]] = {
    ReLUSAE.arch: ReLUSAE,
    TopKSAE.arch: TopKSAE,
}


def build_sae(cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None) -> SAE:
    """A freshly initialised SAE of ``cfg.arch`` on ``d_in``-dimensional inputs."""
    if cfg.arch not in SAE_CLASSES:
        raise ConfigError(f"unknown SAE architecture {cfg.arch!r} (choose from {', '.join(SAE_CLASSES)})")
    if d_in < 1:
        raise ConfigError(f"SAE input dimension must be >= 1, not {d_in}")
    return SAE_CLASSES[cfg.arch](d_in, cfg, generator)
