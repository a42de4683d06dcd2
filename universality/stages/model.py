"""The model stage: one seed's transformer, trained on the training tokens (resuming from its last checkpoint),
or a control: the paper's randomized transformer (a trained model with every weight tensor's entries permuted), or
the untrained transformer (a seed's initial weights, as Heap et al. 2025 compare SAEs of random transformers with)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.training import TrainingResult, build_model, train_transformer
from models.transformer import OneLayerTransformer, TransformerConfig
from universality.core.config import ExperimentConfig
from universality.core.run_names import seed_name, shuffled_name, untrained_name
from universality.runtime import cache
from universality.runtime.atomic import atomic_path, write_text
from universality.stages.data import Dataset

STAGE = cache.Stage("model", 2)  # 2: LayerNorm with thread-count-independent gradients


@dataclass(frozen=True)
class RunModel:
    """A transformer of one run: a seed's trained model, or a weight-shuffled control."""

    name: str  # "seed0", ..., or "shuffled-seed0-1" for the randomized-transformer baseline
    seed: int
    directory: Path
    key: str
    model: OneLayerTransformer
    history: list[dict]
    metrics: dict[str, float]


def transformer_config(cfg: ExperimentConfig, dataset: Dataset) -> TransformerConfig:
    return TransformerConfig(vocab_size=dataset.vocab_size, ctx_len=cfg.data.ctx_len, **dataclasses.asdict(cfg.model))


def key(dataset: Dataset, cfg: ExperimentConfig, seed: int) -> str:
    return STAGE.key(data=dataset.key, model=transformer_config(cfg, dataset).to_dict(),
                     train=dataclasses.asdict(cfg.train), seed=seed)


def shuffled_key(base_key: str, shuffle_seed: int) -> str:
    """A weight-shuffled control's key (its folder is in the model stage too): the trained model's, and the permutation."""
    return cache.stage_key("shuffled", STAGE.version, model=base_key, shuffle_seed=shuffle_seed)


def untrained_key(dataset: Dataset, cfg: ExperimentConfig, seed: int) -> str:
    """An untrained control's key (in the model stage's folder): the architecture and the seed its weights are drawn with."""
    return cache.stage_key("untrained", STAGE.version, model=transformer_config(cfg, dataset).to_dict(), seed=seed)


def build(dataset: Dataset, cfg: ExperimentConfig, seed: int, model_key: str, device: str, results_dir: Path,
          progress: bool = True) -> RunModel:
    """Train (or reuse) the transformer of one seed; resumes from its last checkpoint."""
    model_cfg = transformer_config(cfg, dataset)

    def compute(directory: Path) -> dict:
        result = train_transformer(dataset.train, dataset.heldout, model_cfg, cfg.train, seed, device,
                                   checkpoint_dir=directory / cache.SCRATCH, progress=progress)
        return {"metrics": _save(directory, result, model_cfg, dataset.baselines)}

    directory = STAGE.build(results_dir, model_key, compute, f"transformer {seed_name(seed)}")
    return load(directory, model_key, seed_name(seed), seed, device)


def _save(directory: Path, result: TrainingResult, model_cfg: TransformerConfig, baselines: dict) -> dict[str, float]:
    """Write the weights, config and loss history; returns the final metrics."""
    state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    write_text(directory / "config.json", json.dumps(model_cfg.to_dict(), indent=1))
    write_text(directory / "history.json", json.dumps(result.history))
    return {"eval_loss": result.eval_loss, **baselines, "eval_loss_minus_bigram": result.eval_loss - baselines["bigram_ce"]}


def build_shuffled(base: RunModel, shuffle_seed: int, control_key: str, results_dir: Path, device: str) -> RunModel:
    """The paper's randomized-transformer control: ``base`` with every weight tensor's entries
    permuted (a different permutation per ``shuffle_seed``): its statistics, none of its learning."""
    name = shuffled_name(base.seed, shuffle_seed)

    def compute(directory: Path) -> dict:
        generator = torch.Generator().manual_seed(shuffle_seed)
        _save_weights(directory, {k: v.cpu().flatten()[torch.randperm(v.numel(), generator=generator)].reshape(v.shape)
                                  for k, v in base.model.state_dict().items()}, base.model.cfg)
        return {"metrics": {}, "shuffled_from": base.key}

    directory = STAGE.build(results_dir, control_key, compute, f"transformer {name}")
    return load(directory, control_key, name, base.seed, device)


def build_untrained(dataset: Dataset, cfg: ExperimentConfig, seed: int, control_key: str, results_dir: Path,
                    device: str) -> RunModel:
    """The untrained control: seed ``seed``'s transformer at the initialization its training starts from
    (``models.training.build_model``), no step taken."""
    name = untrained_name(seed)

    def compute(directory: Path) -> dict:
        untrained = build_model(transformer_config(cfg, dataset), seed)
        _save_weights(directory, untrained.state_dict(), untrained.cfg)
        return {"metrics": {}, "untrained_seed": seed}

    directory = STAGE.build(results_dir, control_key, compute, f"transformer {name}")
    return load(directory, control_key, name, seed, device)


def _save_weights(directory: Path, state: dict[str, torch.Tensor], model_cfg: TransformerConfig) -> None:
    """A control's weights and config, with an empty training history."""
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    write_text(directory / "config.json", json.dumps(model_cfg.to_dict(), indent=1))
    write_text(directory / "history.json", "[]")


def load(directory: Path, key: str, name: str, seed: int, device: str) -> RunModel:
    model_cfg = TransformerConfig(**json.loads((directory / "config.json").read_text()))
    model = OneLayerTransformer(model_cfg)
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    model.to(device).eval()
    return RunModel(
        name=name,
        seed=seed,
        directory=directory,
        key=key,
        model=model,
        history=json.loads((directory / "history.json").read_text()),
        metrics=cache.read_summary(directory)["metrics"],
    )


def load_transformer(directory: Path, device: str = "cpu") -> OneLayerTransformer:
    """A model stage folder's transformer alone (feature cards, steering: the name and history do not matter)."""
    return load(Path(directory), Path(directory).name, Path(directory).name, 0, device).model
