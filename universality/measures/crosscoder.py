"""A crosscoder's latents as numbers: the fraction of live latents in each class, and how its shared latents line
up with per-model SAE matching. Pure: arrays in, numbers out (``analysis.crosscoder`` feeds them)."""

from __future__ import annotations

import numpy as np

from universality.measures.matching import NO_PARTNER, Matching

DEAD, SHARED, EXCLUSIVE = "dead", "shared", "exclusive-"


def class_fractions(classes_F: np.ndarray) -> dict[str, float]:
    """Fractions of the live (not dead) latents that are shared by every model, exclusive to one, shared by some
    but not all (k of M), and the dead fraction of all latents. NaN fractions when no latent is live."""
    classes_F = np.asarray(classes_F, dtype=str)
    live = classes_F != DEAD
    n_live = int(live.sum())
    exclusive = np.char.startswith(classes_F, EXCLUSIVE)
    shared = classes_F == SHARED
    frac = (lambda mask: float(mask.sum() / n_live)) if n_live else (lambda mask: float("nan"))
    return {"frac_shared": frac(shared), "frac_exclusive": frac(exclusive), "frac_shared_kofm": frac(live & ~shared & ~exclusive),
            "frac_dead": float((~live).mean()) if classes_F.size else float("nan")}


def mutual_matches_one_latent(pair: Matching, best_a_F: np.ndarray, best_b_F: np.ndarray, shared_F: np.ndarray) -> float:
    """The fraction of the mutual matches (a, b) between two models' SAE features for which one shared latent has a
    as its best-matched feature in model A and b in model B: per-model matching's pairs the crosscoder accounts for
    with a single latent. NaN without mutual matches."""
    mutual_a, mutual_b = pair.mutual_pairs()
    if mutual_a.size == 0:
        return float("nan")
    shared_F = np.asarray(shared_F, bool) & (np.asarray(best_a_F) != NO_PARTNER) & (np.asarray(best_b_F) != NO_PARTNER)
    by_latent = set(zip(np.asarray(best_a_F)[shared_F].tolist(), np.asarray(best_b_F)[shared_F].tolist()))
    return float(np.mean([(a, b) in by_latent for a, b in zip(mutual_a.tolist(), mutual_b.tolist())]))


def shared_latent_corr(best_corr_FM: np.ndarray, shared_F: np.ndarray) -> dict[str, float]:
    """Over the shared latents: the median of each latent's best activation correlation with an SAE feature of each
    model, and of its lowest over the models (the weakest model decides whether the latent is a cross-model match)."""
    rows = np.asarray(best_corr_FM, np.float64)[np.asarray(shared_F, bool)]
    if rows.size == 0:
        return {"sae_corr_median_shared": float("nan"), "sae_corr_min_median_shared": float("nan")}
    rows = np.nan_to_num(rows, nan=0.0)
    return {"sae_corr_median_shared": float(np.median(rows)), "sae_corr_min_median_shared": float(np.median(rows.min(axis=1)))}
