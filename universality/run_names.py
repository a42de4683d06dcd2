"""The names of a univ run's runs, made and read in one place: "seed0" is seed 0's model and its own SAE,
"seed0-sae1" the first replicate SAE of that model (the within-model ceiling), "shuffled-seed0-1" a
weight-shuffled control. Pairs, MLflow child runs, reports and the export all go by these names."""

from __future__ import annotations

REPLICATE = "-sae"  # between a model's name and a replicate's index


def replica_name(model_name: str, replicate: int) -> str:
    """"seed0" for a model's own SAE, "seed0-sae1" for its first replicate."""
    return model_name if replicate == 0 else f"{model_name}{REPLICATE}{replicate}"


def model_name(run_name: str) -> str:
    """The model a run's SAE belongs to: "seed0" for "seed0" and for its replicate "seed0-sae1"."""
    return run_name.partition(REPLICATE)[0]


def replicate_of(run_name: str) -> int:
    """0 for a run's own SAE ("seed0"), r for its replicate r ("seed0-sae1" -> 1)."""
    return int(run_name.partition(REPLICATE)[2] or 0)
