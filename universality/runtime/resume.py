"""Resumable training checkpoints: tensors in ``checkpoint.safetensors``, scalars in ``checkpoint.json``.

The JSON (written last, atomically) records the tensor file's size and sha256, so a checkpoint
torn by a crash or corrupted on disk is detected on load and training starts over instead of
resuming from garbage. Nothing is unpickled.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from universality.runtime.atomic import atomic_path, write_text
from universality.runtime.cache import file_sha256

TENSORS = "checkpoint.safetensors"
STATE = "checkpoint.json"


def save(directory: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    """Write both files atomically, the JSON (with the tensor file's checksum) last."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / TENSORS) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    path = directory / TENSORS
    check = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    write_text(directory / STATE, json.dumps({**state, "_tensors": check}))


def load(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of the checkpoint in ``directory``; None when there is none or it is damaged."""
    state_path, path = directory / STATE, directory / TENSORS
    if not state_path.exists():
        return None
    try:
        state = json.loads(state_path.read_text())
        check = state.pop("_tensors")
        intact = path.stat().st_size == check["size"] and file_sha256(path) == check["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        warnings.warn(f"checkpoint in {directory} is damaged (checksum mismatch); starting over", stacklevel=2)
        return None
    return load_file(str(path)), state


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat ``optim.<index>.<name>`` tensors."""
    return {f"optim.{i}.{k}": torch.as_tensor(v) for i, state in optimizer.state_dict()["state"].items()
            for k, v in state.items()}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Restore what ``optimizer_tensors`` saved (other keys of ``tensors`` are ignored)."""
    optim_state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            optim_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optim_state)
