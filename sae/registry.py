"""Architecture name -> SAE class: a new architecture is one file plus one line here."""

from __future__ import annotations

from typing import Sequence

import torch

from sae.base import SAE
from sae.crosscoder import BatchTopKCrosscoder, Crosscoder, L1Crosscoder
from sae.relu import ReLUSAE
from sae.tokenized import TokenizedReLUSAE
from sae.topk import TopKSAE
from universality.core.config import SAEConfig
from universality.core.errors import ConfigError

SAE_CLASSES: dict[str, type[SAE]] = {
    ReLUSAE.arch: ReLUSAE,
    TopKSAE.arch: TopKSAE,
    TokenizedReLUSAE.arch: TokenizedReLUSAE,
    L1Crosscoder.arch: L1Crosscoder,
    BatchTopKCrosscoder.arch: BatchTopKCrosscoder,
}


def build_sae(cfg: SAEConfig, d_in: int, generator: torch.Generator | None = None, n_models: int = 1,
              model_dims: Sequence[int] | None = None, vocab_size: int | None = None) -> SAE:
    """A freshly initialised SAE of ``cfg.arch`` on ``d_in``-dimensional inputs; a crosscoder reads
    ``n_models`` >= 2 such inputs at once, an SAE one. ``model_dims``: a crosscoder's models' own widths when
    they differ (their inputs zero-padded to ``d_in``; ``sae.crosscoder``); ``vocab_size``: the tokens an SAE that
    reads them knows (``sae.tokenized``)."""
    if cfg.arch not in SAE_CLASSES:
        raise ConfigError(f"unknown SAE architecture {cfg.arch!r} (choose from {', '.join(SAE_CLASSES)})")
    if d_in < 1:
        raise ConfigError(f"SAE input dimension must be >= 1, not {d_in}")
    cls = SAE_CLASSES[cfg.arch]
    if issubclass(cls, Crosscoder):
        if n_models < 2:
            raise ConfigError(f"a crosscoder ({cfg.arch}) needs activations of at least 2 models, not {n_models}")
        return cls(d_in, cfg, generator, n_models, model_dims)
    if n_models != 1 or model_dims is not None:
        raise ConfigError(f"an SAE ({cfg.arch}) reads one model's activations, not {n_models}: use a crosscoder arch")
    return cls(d_in, cfg, generator, vocab_size) if cls.reads_tokens else cls(d_in, cfg, generator)
