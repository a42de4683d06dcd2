"""Content-addressed stage outputs: ``<results>/cache/<stage>/<key>/``.

A stage's key hashes everything that determines its output (its config and its upstream keys,
the corpus fingerprint, the seed, the stage's code version), so a re-run with the same inputs
finds the folder complete and skips the work, and any change lands in a new folder.
A folder is complete once its ``done.json`` exists; that file is written last, atomically.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from universality.atomic import write_text

DONE = "done.json"


def stage_key(stage: str, version: int, **inputs: Any) -> str:
    """A short stable hash of a stage's name, code version and inputs (JSON-serializable)."""
    payload = json.dumps({"stage": stage, "version": version, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def stage_dir(results_dir: Path, stage: str, key: str) -> Path:
    return Path(results_dir) / "cache" / stage / key


def is_complete(directory: Path) -> bool:
    return (directory / DONE).exists()


def mark_complete(directory: Path, summary: dict[str, Any]) -> None:
    write_text(directory / DONE, json.dumps(summary, indent=1, default=str))


def read_summary(directory: Path) -> dict[str, Any]:
    return json.loads((directory / DONE).read_text())


def clear(results_dir: Path) -> int:
    """Remove every cached stage output; returns how many folders were removed."""
    root = Path(results_dir) / "cache"
    folders = [p for p in root.glob("*/*") if p.is_dir()] if root.exists() else []
    for folder in folders:
        shutil.rmtree(folder)
    return len(folders)
