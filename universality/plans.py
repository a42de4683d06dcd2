"""Which runs a univ run compares, by name: the pairs (seeds, SAEs of one model, controls), the split levels of a
dictionary family and the crosscoders. Names and config in, plans out (``pipeline`` builds their stages)."""

from __future__ import annotations

import itertools

from universality.core.config import ExperimentConfig
from universality.core.run_names import control_kind, crosscoder_name, model_name, sae_run_name, seed_name, shuffled_name, size_of


def family(run_names, cfg: ExperimentConfig, model: str) -> dict[int, str]:
    """size -> the run name of ``model``'s own (replicate 0) SAE of that size, ascending, for the sizes among
    ``run_names`` (a RunResult's ``saes``, or any names)."""
    names = set(run_names)
    return {size: name for size in cfg.sae.sizes if (name := sae_run_name(cfg, model, size)) in names}


def pair_plan(run_names: list[str], seed_names: list[str], cfg: ExperimentConfig) -> list[tuple[str, str, str]]:
    """(A, B, kind) of every comparison: at each dictionary size (the primary first), each pair of seeds
    (cross-model) and each pair of SAEs of one model (same-model: the ceiling); then the two weight-shuffled
    controls (randomized) and the two untrained ones (untrained)."""
    plan = []
    for size in (cfg.sae.dict_size, *cfg.sae.sizes[-2::-1]):
        named = None if size == cfg.sae.dict_size else size
        own = [sae_run_name(cfg, name, size) for name in seed_names]
        plan += [(a, b, "cross-model") for a, b in itertools.combinations(own, 2)]
        for name in seed_names:  # the seed's own SAE first, in task order
            replicas = [n for n in run_names if model_name(n) == name and size_of(n) == named]
            plan += [(a, b, "same-model") for a, b in itertools.combinations(replicas, 2)]
    for kind in ("randomized", "untrained"):
        controls = [n for n in run_names if control_kind(n) == kind]
        if controls:
            plan.append((controls[0], controls[1], kind))
    return plan


def split_plan(run_names, seed_names: list[str], cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(smaller, next larger) own SAE of every seed's model, for each consecutive pair of its dictionary sizes;
    none for a single size."""
    plan = []
    for name in seed_names:
        names = list(family(run_names, cfg, name).values())
        plan += list(zip(names, names[1:]))
    return plan


def crosscoder_plan(seeds: list[int], cfg: ExperimentConfig) -> list[tuple[str, list[str], int]]:
    """(name, its models' run names, crosscoder replicate) of every crosscoder (none unless crosscoder.enabled and
    two or more seeds): the one over every seed's model, its extra seeds, then the controls on the first seed's model."""
    xcfg = cfg.crosscoder
    if not xcfg.enabled or len(seeds) < 2:
        return []
    plan = [(crosscoder_name(None, r), [seed_name(s) for s in seeds], r) for r in range(xcfg.replicates + 1)]
    first = seed_name(seeds[0])
    if xcfg.identity_control:
        plan.append((crosscoder_name("identity"), [first, first], 0))
    if xcfg.shuffled_control:
        plan.append((crosscoder_name("shuffled"), [first, shuffled_name(seeds[0], 1)], 0))
    return plan
