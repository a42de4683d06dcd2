"""The names of a univ run's runs, made and read in one place: "seed0" is seed 0's model and its own SAE,
"seed0-sae1" the first replicate SAE of that model (the within-model ceiling), "shuffled-seed0-1" a
weight-shuffled control, "untrained-seed0" seed 0's architecture at its random initialization (the untrained control). In a dictionary family (``sae.dict_sizes``) the primary (largest) size keeps these
names and another size N of the same model is "seed0-dN" (its replicates "seed0-dN-sae1"). Pairs, MLflow
child runs, reports and the export all go by these names."""

from __future__ import annotations

import re

from universality.core.config import ExperimentConfig

SHUFFLED = "shuffled-"  # before a weight-shuffled control's model name
UNTRAINED = "untrained-"  # before an untrained control's model name
VERSUS = "-vs-"  # between the two runs of a pair
REPLICATE = "-sae"  # between a model's name (and size) and a replicate's index
SIZE = "-d"  # between a model's name and a non-primary dictionary size
_PARTS = re.compile(rf"^(?P<model>.+?)(?:{SIZE}(?P<size>\d+))?(?:{REPLICATE}(?P<replicate>\d+))?$")


def replica_name(model_name: str, replicate: int, size: int | None = None) -> str:
    """"seed0" for a model's own SAE, "seed0-sae1" for its first replicate; with a ``size`` (not the
    primary one) "seed0-d512" and "seed0-d512-sae1"."""
    sized = model_name if size is None else f"{model_name}{SIZE}{size}"
    return sized if replicate == 0 else f"{sized}{REPLICATE}{replicate}"


def model_name(run_name: str) -> str:
    """The model a run's SAE belongs to: "seed0" for "seed0", "seed0-sae1", "seed0-d512" and "seed0-d512-sae1"."""
    return _PARTS.match(run_name)["model"]


def replicate_of(run_name: str) -> int:
    """0 for a run's own SAE ("seed0", "seed0-d512"), r for its replicate r ("seed0-sae1", "seed0-d512-sae1" -> 1)."""
    return int(_PARTS.match(run_name)["replicate"] or 0)


def size_of(run_name: str) -> int | None:
    """The dictionary size a name carries ("seed0-d512" -> 512); None for the primary size ("seed0", "seed0-sae1")."""
    size = _PARTS.match(run_name)["size"]
    return None if size is None else int(size)


def summary_prefix(size: int | None) -> str:
    """Where a size's statistics sit in a run's summary: "" for the primary size (None), "size512." for 512."""
    return "" if size is None else f"size{size}."


def seed_name(seed: int) -> str:
    """The run name of seed ``seed``'s model and its own SAE: "seed0"."""
    return f"seed{seed}"


def shuffled_name(seed: int, shuffle_seed: int) -> str:
    """The weight-shuffled control ``shuffle_seed`` of seed ``seed``'s model: "shuffled-seed0-1"."""
    return f"{SHUFFLED}{seed_name(seed)}-{shuffle_seed}"


def untrained_name(seed: int) -> str:
    """The untrained control of seed ``seed``: the initial weights its training starts from, "untrained-seed0"."""
    return f"{UNTRAINED}{seed_name(seed)}"


def control_kind(run_name: str) -> str | None:
    """The pair kind a control belongs to: "randomized" (weight-shuffled), "untrained", or None (not a control)."""
    return "randomized" if run_name.startswith(SHUFFLED) else "untrained" if run_name.startswith(UNTRAINED) else None


def is_control(run_name: str) -> bool:
    """Whether a run is a control (a weight-shuffled or an untrained model) rather than a seed's model or one of its SAEs."""
    return control_kind(run_name) is not None


def sae_run_name(cfg: ExperimentConfig, model: str, size: int, replicate: int = 0) -> str:
    """The run name of ``model``'s SAE of ``size`` features: today's names for the primary size, "-d<size>" else."""
    return replica_name(model, replicate, None if size == cfg.sae.dict_size else size)


def pair_name(run_a: str, run_b: str) -> str:
    """A pair's child run and report folder: "seed0-vs-seed1"."""
    return f"{run_a}{VERSUS}{run_b}"


CROSSCODER = "crosscoder"  # a crosscoder over every seed's model; its controls and seeds are suffixed
CROSSCODER_CONTROLS = ("identity", "shuffled")  # the first seed's model with itself | with its weight-shuffled copy


def crosscoder_name(control: str | None = None, replicate: int = 0) -> str:
    """"crosscoder" over every seed's model, "crosscoder-identity" / "crosscoder-shuffled" for a control,
    "crosscoder-r1" for the first extra crosscoder seed on the same models."""
    name = CROSSCODER if control is None else f"{CROSSCODER}-{control}"
    return name if replicate == 0 else f"{name}-r{replicate}"


def crosscoder_role(name: str) -> str:
    """What a crosscoder is, from its name: "main" ("crosscoder"), "replicate" (an extra seed, "crosscoder-r1") or its
    control ("identity", "shuffled")."""
    match = re.fullmatch(rf"{CROSSCODER}(?:-(?P<control>{'|'.join(CROSSCODER_CONTROLS)}))?(?:-r(?P<replicate>\d+))?", name)
    if match is None:
        raise ValueError(f"not a crosscoder's name: {name!r}")
    return "replicate" if match["replicate"] else match["control"] or "main"
