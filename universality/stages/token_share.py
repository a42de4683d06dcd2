"""The token-share stage: a run's SAE features' and neurons' token and position shares on the comparison
tokens (``analysis.token_share``), from the recorded activations and the data stage's token ids; once per run,
read by its reports, feature cards, export and MLflow run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from universality.analysis import heldout, token_share
from universality.analysis.heldout import HeldoutActivations
from universality.core.config import ExperimentConfig
from universality.runtime import cache
from universality.stages.data import Dataset
from universality.stages.sae import RunSAE

STAGE = cache.Stage("token_share", 1)


def key(activations_key: str, cfg: ExperimentConfig) -> str:
    """The activations (which fix the tokens, the context length and the skipped positions) and ``min_firings``."""
    return STAGE.key(activations=activations_key, min_firings=cfg.compare.min_firings)


def build(dataset: Dataset, sae: RunSAE, acts: HeldoutActivations, cfg: ExperimentConfig, share_key: str,
          results_dir: Path) -> RunSAE:
    """``sae`` with its features' and its model's neurons' token and position shares (computed once)."""

    def compute(directory: Path) -> dict:
        ctx_len, skip = cfg.data.ctx_len, cfg.compare.skip_first_positions
        tokens = heldout.comparison_tokens(dataset.heldout, ctx_len, cfg.compare.tokens, skip)
        shares = token_share.token_shares(acts, tokens, dataset.vocab_size, heldout.row_positions(tokens.size, ctx_len, skip),
                                          ctx_len, cfg.compare.min_firings)
        token_share.save(shares, directory)
        return {"run": sae.name}

    return load(STAGE.build(results_dir, share_key, compute, f"token share of {sae.name}"), sae)


def load(directory: Path, sae: RunSAE) -> RunSAE:
    return dataclasses.replace(sae, token_shares=token_share.load(directory))
