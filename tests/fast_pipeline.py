"""A pipeline config small enough for tests that run it many times (a few seconds per seed),
shared by the cache, orchestration and hardening tests."""

from __future__ import annotations

from pathlib import Path

from universality import pipeline
from universality.core.config import ExperimentConfig, load_preset
from universality.runtime.engine import Engine


def fast_cfg() -> ExperimentConfig:
    return load_preset("tiny").replace(
        data={"max_tokens": 60_000, "heldout_tokens": 4096, "tokenizer_chars": 300_000},
        train={"steps": 20, "warmup_steps": 5, "eval_every": 10, "checkpoint_every": 10},
        sae={"samples": 8192, "batch_size": 1024, "buffer_size": 4096, "resample_inputs": 2048},
        compare={"tokens": 4096, "n_bootstrap": 20},
    )


def run_fast(results: Path, seeds: list[int], cfg: ExperimentConfig | None = None, jobs: int = 1,
             progress: bool = False, **engine) -> pipeline.RunResult:
    """``pipeline.run`` on the fast config; ``jobs=1`` keeps it in this process (monkeypatches apply)."""
    return pipeline.run(cfg or fast_cfg(), seeds, results, device="cpu", progress=progress, engine=Engine(jobs=jobs, **engine))


def stage_checksums(results: Path, stage: str, name: str) -> dict[str, str]:
    """label -> sha256 of one output file of each of ``stage``'s folders (e.g. the model weights)."""
    import json

    found = {}
    for done in sorted((Path(results) / "cache" / stage).glob("*/done.json")):
        record = json.loads(done.read_text())
        found[record["label"]] = record["files"][name]["sha256"]
    return found
