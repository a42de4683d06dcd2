"""SAE checkpoints as SAELens lays them out: ``cfg.json`` + ``sae_weights.safetensors`` (+ ``metrics.json``).

Every file is written atomically (temp file in the same folder, then ``os.replace``), and a
``COMPLETE`` marker is written last and removed first: a crashed save never looks finished.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sae.base import SAE
from sae.registry import build_sae
from sae.training import TrainedSAE
from universality.runtime.atomic import atomic_path, write_text
from universality.core.config import SAEConfig
from universality.core.errors import ConfigError, DataError

CFG_FILE, WEIGHTS_FILE, METRICS_FILE, COMPLETE_MARKER = "cfg.json", "sae_weights.safetensors", "metrics.json", "COMPLETE"
SNAPSHOT_FILE = "snapshot.safetensors"  # the SAE part-way through training (TrainedSAE.snapshot), for the convergence diagnostic
SAELENS_ARCHITECTURES = {"relu": "standard", "topk": "topk"}  # univ's arch -> SAELens's name for the same SAE


def saelens_fields(sae: SAE) -> dict[str, Any]:
    """The cfg.json fields SAELens's ``SAE.load_from_disk`` reads (TopK's ``k`` is univ's field of the same
    name): the SAE works on raw activations (the input scale is folded in, so no normalization) and
    subtracts b_dec before encoding, as SAELens's SAEs do."""
    fields = {"architecture": SAELENS_ARCHITECTURES.get(sae.arch, sae.arch), "d_in": sae.d_in, "d_sae": sae.d_sae,
              "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
              "reshape_activations": "none"}
    fields |= {"vocab_size": sae.vocab_size} if sae.reads_tokens else {}  # not SAELens's: its b_tok [V, D] is univ's own
    return fields | ({"rescale_acts_by_decoder_norm": False} if sae.arch == "topk" else {})


def save_sae(trained_or_sae: TrainedSAE | SAE, cfg: SAEConfig, out_dir: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint into ``out_dir`` (created if needed); returns it. With a ``TrainedSAE``,
    its history, resampling events, input scale and precision go into ``metrics.json`` too, and its
    snapshot (if any) into ``snapshot.safetensors``."""
    sae = trained_or_sae.sae if isinstance(trained_or_sae, TrainedSAE) else trained_or_sae
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / COMPLETE_MARKER).unlink(missing_ok=True)
    (out / SNAPSHOT_FILE).unlink(missing_ok=True)

    _save_parameters(sae.state_dict(), out / WEIGHTS_FILE)
    if isinstance(trained_or_sae, TrainedSAE) and trained_or_sae.snapshot is not None:
        _save_parameters(trained_or_sae.snapshot, out / SNAPSHOT_FILE)
    sae_cfg = {**saelens_fields(sae), **dataclasses.asdict(cfg)}
    all_metrics = dict(metrics or {})
    if isinstance(trained_or_sae, TrainedSAE):
        sae_cfg["input_scale_folded"] = trained_or_sae.input_scale
        all_metrics.update(history=trained_or_sae.history, resampling_events=trained_or_sae.resampling_events,
                           input_scale=trained_or_sae.input_scale, precision=trained_or_sae.precision)
    write_text(out / CFG_FILE, json.dumps(sae_cfg, indent=2))
    write_text(out / METRICS_FILE, json.dumps(all_metrics, indent=2, default=jsonable))
    write_text(out / COMPLETE_MARKER, "")
    return out


def _save_parameters(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """An SAE's state dict (SAELens's four weights, and a tokenized SAE's ``b_tok``), as float32 on the CPU."""
    with atomic_path(path) as tmp:
        save_file({name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}, str(tmp))


def is_complete(out_dir: str | Path) -> bool:
    """Whether ``out_dir`` holds a fully written checkpoint."""
    return (Path(out_dir) / COMPLETE_MARKER).exists()


def load_sae(out_dir: str | Path, device: str | torch.device = "cpu") -> SAE:
    """The SAE saved in ``out_dir`` (safetensors only: nothing is unpickled)."""
    out = Path(out_dir)
    if not is_complete(out):
        raise DataError(f"{out} is not a complete SAE checkpoint (no {COMPLETE_MARKER} marker)")
    raw = json.loads((out / CFG_FILE).read_text())
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    cfg = SAEConfig(**{key: value for key, value in raw.items() if key in fields})
    if cfg.dict_size != raw["d_sae"] or raw["architecture"] not in (cfg.arch, SAELENS_ARCHITECTURES.get(cfg.arch)):
        raise ConfigError(f"{out / CFG_FILE} is inconsistent (dict_size/d_sae or arch/architecture differ)")
    sae = build_sae(cfg, raw["d_in"], vocab_size=raw.get("vocab_size"))
    sae.load_state_dict(load_file(str(out / WEIGHTS_FILE)))
    return sae.to(device)


def load_snapshot(out_dir: str | Path, device: str | torch.device = "cpu") -> SAE | None:
    """The SAE as it was part-way through training (same layout as the final weights), or None if not saved."""
    out = Path(out_dir)
    if not (out / SNAPSHOT_FILE).exists():
        return None
    sae = load_sae(out, device)
    sae.load_state_dict(load_file(str(out / SNAPSHOT_FILE)))
    return sae


def jsonable(value: Any) -> Any:
    """Arrays and tensors as lists, for ``json.dumps(..., default=jsonable)``."""
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to metrics.json")
