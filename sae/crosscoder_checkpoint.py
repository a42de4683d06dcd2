"""A crosscoder's checkpoint folder: ``crosscoder.safetensors`` (``crosscoder.crosscoder_tensors``: W_dec
[n_models, n_latents, d] ...), ``cfg.json`` (its SAEConfig) and ``metrics.json`` (training history, input scales,
precision and any metrics given), each written atomically. What the crosscoder stage and ``univ crosscoder`` write."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sae.checkpoint import jsonable
from sae.crosscoder import Crosscoder, crosscoder_tensors, load_crosscoder
from sae.training import TrainedSAE
from universality.core.config import SAEConfig
from universality.runtime.atomic import atomic_path, write_text

WEIGHTS_FILE, CFG_FILE, METRICS_FILE = "crosscoder.safetensors", "cfg.json", "metrics.json"


def save_crosscoder(trained: TrainedSAE, cfg: SAEConfig, out_dir: Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``trained``'s crosscoder, its config and metrics (history, resampling events, precision) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(crosscoder_tensors(trained.sae), str(tmp))
    write_text(out / CFG_FILE, json.dumps(dataclasses.asdict(cfg), indent=2))
    record = {**(metrics or {}), "history": trained.history, "resampling_events": trained.resampling_events,
              "precision": trained.precision}
    write_text(out / METRICS_FILE, json.dumps(record, default=jsonable))
    return out


def load_crosscoder_dir(directory: Path, device: str | torch.device = "cpu") -> tuple[Crosscoder, dict[str, Any]]:
    """The crosscoder ``save_crosscoder`` wrote (on ``device``) and its metrics."""
    directory = Path(directory)
    cfg = SAEConfig(**json.loads((directory / CFG_FILE).read_text()))
    crosscoder = load_crosscoder(load_file(str(directory / WEIGHTS_FILE)), cfg).to(device)
    return crosscoder, json.loads((directory / METRICS_FILE).read_text())
