"""The SAE stage: a sparse autoencoder fitted on one model's MLP activations over the training tokens.

Besides one SAE per seed, a run fits replicate SAEs (``sae.replicates``) on the same transformer, differing
only in the SAE's seed: their pairs are the within-model ceiling every cross-model number is read against. A
dictionary family (``sae.dict_sizes``) fits one SAE per size on the same activation stream, each with the key
of a single-size run of its size. The SAE's evaluation is a stage of its own (``stages.evaluation``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sae.activations import model_activations, shuffled_batches
from sae.base import SAE
from sae.checkpoint import load_sae, save_sae
from sae.registry import SAE_CLASSES
from sae.training import resolve_precision, train_sae
from universality.analysis.own_neurons import OwnNeurons
from universality.analysis.token_share import TokenShares
from universality.core.config import ExperimentConfig
from universality.core.run_names import replica_name
from universality.runtime import cache
from universality.stages.data import Dataset
from universality.stages.model import RunModel

STAGE = cache.Stage("sae", 4)  # 2: training only (its evaluation is the evaluation stage); replicates. 3: bf16 matmuls, LR decay, snapshot, resampling until late. 4: sparse steps on CPU (equal to the dense step within float rounding, not bit for bit)
REPLICATE_SEED_STRIDE = 1_000_003  # replicate r of a model seeded s trains with SAE seed s + r * stride


@dataclass(frozen=True)
class RunSAE:
    """The SAE fitted on one run's MLP activations, and its evaluation."""

    name: str  # the run's name: "seed0", or "seed0-sae1" for replicate 1 of seed 0's model
    directory: Path
    key: str
    sae: SAE
    history: list[dict]
    resampling_events: list[dict]
    replicate: int = 0  # 0: the run's SAE; r > 0: an extra SAE of the same model with another SAE seed
    metrics: dict = dataclasses.field(default_factory=dict)  # the evaluation stage's: reconstruction, loss recovered, convergence
    evaluation: Path | None = None  # the evaluation stage's folder
    own_neurons: OwnNeurons | None = None  # the own_neurons stage's: its features vs its model's neurons
    token_shares: TokenShares | None = None  # the token_share stage's: its features' and neurons' token and position shares

    def decoder(self):
        """The decoder's feature directions [F, d_mlp] as float32 numpy."""
        return self.sae.W_dec.detach().float().cpu().numpy()


def size_config(cfg: ExperimentConfig, size: int | None = None) -> ExperimentConfig:
    """The config one SAE of the family is trained with: ``size`` features (None: the primary size) and no family,
    so that its cache key and checkpoint are those of a single-size run of that size."""
    sae = dataclasses.replace(cfg.sae, dict_size=size or cfg.sae.dict_size, dict_sizes=())
    return dataclasses.replace(cfg, sae=sae)


def sae_seed(model_seed: int, replicate: int) -> int:
    """Replicate 0 (the run's SAE) is seeded by its model's seed; replicate r by a seed of its own."""
    return model_seed + REPLICATE_SEED_STRIDE * replicate


def key(model_key: str, cfg: ExperimentConfig, device: str, replicate: int = 0, size: int | None = None) -> str:
    """The model, the SAE's training fields (with the precision "auto" resolves to on ``device``; ``size``
    features, None: the primary size) and its replicate index: nothing about evaluation or comparison, and not
    how many replicates or sizes a run asks for (adding replicates or sizes retrains no existing SAE)."""
    sae_cfg = size_config(cfg, size).sae
    fields = sae_cfg.training_fields() | {"precision": resolve_precision(sae_cfg.precision, device)}
    return STAGE.key(model=model_key, sae=fields, replicate=replicate)


def build(dataset: Dataset, model: RunModel, cfg: ExperimentConfig, sae_key: str, device: str, results_dir: Path,
          replicate: int = 0, progress: bool = True, size: int | None = None) -> RunSAE:
    """Fit (or reuse) an SAE on ``model``'s MLP activations over the training tokens. Replicate r > 0
    differs from the run's SAE only in its seed: initialization and the order activations arrive in.
    ``size``: another size of the family than the primary; its SAE sees the same activation stream."""
    seed = sae_seed(model.seed, replicate)
    name = replica_name(model.name, replicate, size)
    cfg = size_config(cfg, size)

    def compute(directory: Path) -> dict:
        seqs = max(1, cfg.sae.batch_size // cfg.data.ctx_len)
        reads_tokens = SAE_CLASSES[cfg.sae.arch].reads_tokens  # a tokenized SAE trains on (activations, token ids)
        source = model_activations(model.model, dataset.train, cfg.data.ctx_len, seqs, device, seed=seed,
                                   with_tokens=reads_tokens)
        batches = shuffled_batches(source, cfg.sae.buffer_size, cfg.sae.batch_size, torch.Generator().manual_seed(seed))
        trained = train_sae(batches, cfg.sae, model.model.cfg.d_mlp, seed=seed, device=device, progress=progress,
                            checkpoint_dir=directory / cache.SCRATCH, vocab_size=model.model.cfg.vocab_size)
        save_sae(trained, cfg.sae, directory)
        return {"run": name}

    return load(STAGE.build(results_dir, sae_key, compute, f"SAE of {name}"), sae_key, name, replicate, device)


def load(directory: Path, key: str, name: str, replicate: int, device: str) -> RunSAE:
    saved = json.loads((directory / "metrics.json").read_text())
    return RunSAE(name, directory, key, load_sae(directory, device), saved["history"], saved["resampling_events"], replicate)
