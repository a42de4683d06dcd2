"""A re-run answered by the run it repeats: ``univ run`` given a command it has finished before, with nothing
changed, prints that run's summary and MLflow run again, re-running and logging nothing, without loading torch
or MLflow (well under a second on the quick preset, whose first run takes minutes).

Each finished ``univ run`` records its answer in ``<results>/commands/<request>.json``: the MLflow run that
logged its outputs, the summary it printed and the stage folders it read. The request key hashes what the answer
depends on that can be read without running anything: the whole config, the seeds, the device asked for (and the
GPUs the driver lists, which decide "auto"), the results folder, the tracking store and experiment, the corpus's
content, univ's own source files and the versions of the libraries that compute. A record answers while every
stage folder it lists is complete (``runtime.cache``: sizes and checksums as recorded) and its MLflow run is
finished and not deleted. Otherwise (another code version, a cleared cache, a run deleted in the UI, a tracking
server, which only MLflow can ask) the command runs the pipeline, which only reads the stages still cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

from universality.core.config import ExperimentConfig
from universality.runtime import cache
from universality.runtime.atomic import write_text
from universality.text.corpus import load_corpus
from universality.tracking import store

COMMANDS = "commands"  # <results>/commands/<request key>.json: what each finished command answered
PACKAGES = ("universality", "models", "sae")  # univ's code: every file of these packages
LIBRARIES = ("torch", "numpy", "scipy", "tokenizers", "pandas", "mlflow")  # what computes or logs the outputs
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")  # one folder per GPU the driver sees


@dataclass(frozen=True)
class Answer:
    """What a finished ``univ run`` answered: the MLflow run holding its outputs and the summary it printed."""

    run_id: str  # the run that logged every output (for a linked re-run, the run it links to)
    experiment_id: str
    tracking_uri: str
    description: str  # the summary printed in the terminal
    stage_folders: tuple[str, ...]  # every stage folder the run read, as "<stage>/<key>" (cache.folder_name)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stage_folders", tuple(self.stage_folders))  # a list, as JSON reads it back


def request_key(cfg: ExperimentConfig, seeds: Sequence[int], device: str, results_dir: Path,
                tracking_uri: str | None, experiment: str) -> str:
    """A short hash of everything a ``univ run``'s answer depends on that is known before it runs."""
    payload = {"config": cfg.flat(), "seeds": list(seeds), "device": device, "gpus": visible_gpus(),
               "results_dir": str(Path(results_dir).resolve()), "experiment": experiment,
               "tracking_uri": store.resolve_uri(results_dir, tracking_uri),
               "corpus": load_corpus(cfg.data.corpus).fingerprint, "code": code_digest(),
               "libraries": {name: _version(name) for name in LIBRARIES}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded(results_dir: Path, key: str) -> Answer | None:
    """The recorded answer to request ``key`` while it still holds (see the module's docstring), else None."""
    try:
        answer = Answer(**json.loads((Path(results_dir) / COMMANDS / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):  # none recorded, or a record this code cannot read
        return None
    folders = [cache.stage_dir(results_dir, *name.split("/")) for name in answer.stage_folders]
    if not all(cache.is_complete(folder) for folder in folders):
        return None
    return answer if store.is_finished_run(answer.tracking_uri, answer.run_id) else None


def record(results_dir: Path, key: str, answer: Answer) -> None:
    """Keep ``answer`` for the next time request ``key`` is made (atomically: a record is whole or absent)."""
    folder = Path(results_dir) / COMMANDS
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / f"{key}.json", json.dumps(dataclasses.asdict(answer), indent=1))


def code_digest() -> str:
    """A sha256 over every file of univ's packages (names and contents): any edit, installed or in a checkout,
    makes another request."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(f"{package}/{path.relative_to(root)}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def visible_gpus() -> list[str]:
    """What "auto" resolves by, read without torch: the NVIDIA GPUs the driver lists and ``CUDA_VISIBLE_DEVICES``."""
    listed = sorted(p.name for p in NVIDIA_GPUS.iterdir()) if NVIDIA_GPUS.is_dir() else []
    return [*listed, os.environ.get("CUDA_VISIBLE_DEVICES", "")]


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None
