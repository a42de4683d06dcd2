"""A run's crosscoders (``stages.crosscoder.RunCrosscoder``) beside its per-model SAEs: each latent's best-matched
SAE feature in each model (activation correlation on the comparison tokens), the mutual matches of per-model matching
that one shared latent accounts for, the crosscoder's seed stability (two crosscoder seeds on the same models,
matched as two SAEs of one model are), and the statistics a run reports under ``crosscoder.``."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from universality.analysis.heldout import paired_chunks
from universality.analysis.pairs import PairResult
from universality.core.config import CompareConfig
from universality.core.run_names import crosscoder_role
from universality.measures import crosscoder as measures
from universality.measures.comparison import compare, correlate
from universality.measures.matching import Matching, match
from universality.measures.similarity import decoder_statistics


def latent_feature_matching(latents: sp.csr_matrix, features: sp.csr_matrix, min_firings: int) -> Matching:
    """The crosscoder's latents (rows) matched to one model's SAE features by activation correlation."""
    corr, census_latents, census_features = correlate(paired_chunks(latents, features), min_firings)
    return match(corr, census_latents.included, census_features.included)


def beside_matching(cc, features: Mapping[str, sp.csr_matrix], pairs: Sequence[PairResult],
                    cfg: CompareConfig) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """(per-latent columns ``sae_feature_m`` / ``sae_corr_m``: the SAE feature of model m most correlated with the
    latent and that correlation, statistics): over the shared latents, their best correlations with each model's SAE
    features; and the fraction of the mutual matches of each pair of the crosscoder's models (``pairs``) that one
    shared latent accounts for (mean over pairs). ``features``: each run's SAE features on the comparison tokens."""
    latents = cc.latent_activations()
    matchings = [latent_feature_matching(latents, features[name], cfg.min_firings) for name in cc.models]
    columns = {f"{what}_{m}": values for m, found in enumerate(matchings)
               for what, values in (("sae_feature", found.best_b), ("sae_corr", found.best_b_corr))}
    shared_F = cc.latents["class"].to_numpy(str) == measures.SHARED
    stats = measures.shared_latent_corr(np.stack([found.best_b_corr for found in matchings], axis=1), shared_F)
    index = {name: m for m, name in enumerate(cc.models)}
    explained = [measures.mutual_matches_one_latent(p.matching, matchings[index[p.run_a]].best_b,
                                                    matchings[index[p.run_b]].best_b, shared_F)
                 for p in pairs if p.run_a in index and p.run_b in index]
    stats["frac_mutual_matches_one_latent"] = float(np.nanmean(explained)) if np.isfinite(explained).any() else float("nan")
    return columns, stats


def seed_stability(a, b, cfg: CompareConfig) -> dict[str, float]:
    """How well a crosscoder reproduces itself under another seed, as two SAEs of one model are compared: each latent's
    max activation correlation with the other's latents (median), and the median cosine of one-to-one matched
    decoders (each latent's decoders of all models, concatenated)."""
    result = compare(paired_chunks(a.latent_activations(), b.latent_activations()), cfg)
    decoders = [cc.crosscoder.W_dec.detach().cpu().numpy() for cc in (a, b)]
    cosines = decoder_statistics(*decoders, result.census_a.included, result.census_b.included)
    return {"max_corr_median": result.stats["max_corr_median"], "decoder_cos_hungarian_median": cosines["cos_hungarian_median"]}


def crosscoder_statistics(cc) -> dict[str, float]:
    """One crosscoder's evaluation as flat statistics: class fractions of its live latents, the fraction of its
    exclusive latents that Latent Scaling finds explained in another model, FVU per model, L0, dead fraction."""
    classes = cc.latents["class"].to_numpy(str)
    exclusive = np.char.startswith(classes, measures.EXCLUSIVE)
    flagged = cc.latents["explained_elsewhere"].to_numpy(bool)
    stats = measures.class_fractions(classes)
    stats["frac_exclusive_explained_elsewhere"] = float(flagged[exclusive].mean()) if exclusive.any() else float("nan")
    stats |= {f"fvu_{name}": fvu for name, fvu in zip(cc.models, cc.metrics["fvu"])}
    return stats | {"l0": cc.metrics["l0"], "dead_fraction": cc.metrics["dead_fraction"]}


def run_statistics(crosscoders: Mapping, main: str, replicates: Sequence[str],
                   beside: Mapping[str, float], cfg: CompareConfig) -> dict[str, float]:
    """A run's ``crosscoder.`` statistics: the main crosscoder's (``crosscoder_statistics`` and ``beside``), each
    control's under its name (``crosscoder.identity.frac_exclusive``, ...), and the seed stability of the main
    crosscoder against each extra seed (median over them)."""
    stats = {f"crosscoder.{k}": v for k, v in {**crosscoder_statistics(crosscoders[main]), **beside}.items()}
    for name, cc in crosscoders.items():
        if (role := crosscoder_role(name)) not in ("main", "replicate"):
            stats |= {f"crosscoder.{role}.{k}": v for k, v in crosscoder_statistics(cc).items() if not k.startswith("fvu_")}
    if replicates:
        stability = [seed_stability(crosscoders[main], crosscoders[r], cfg) for r in replicates]
        stats |= {f"crosscoder.seed_stability.{k}": float(np.median([s[k] for s in stability])) for k in stability[0]}
    return stats
