"""One pair of runs, compared in three bases on the same held-out tokens, and saved for reuse.

- features: SAE feature activations of A vs B (the paper's activation similarity);
- neurons: MLP neurons of A vs B (the privileged basis the paper compares against);
- rotation: A's neurons vs B's neurons under a random rotation (Gurnee et al.'s null model:
  the same information, no shared basis).
Each basis is also compared given the current token, in the same streaming pass
(``measures.token_control``): ``contextual.<basis>.*`` with every feature's per-token mean removed,
``token_lookup.<basis>.*`` on the per-token means alone (what token identity gives by itself), and
``by_token_share.<basis>.<bin>.*`` by A's token share.
Matched features are also compared by their logit weights, and the two MLP spaces as wholes
by linear CKA and SVCCA.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models.transformer import OneLayerTransformer
from sae.base import SAE
from universality.analysis.heldout import HeldoutActivations, paired_chunks, with_tokens
from universality.runtime.atomic import atomic_path, write_text
from universality.core.config import CompareConfig
from universality.measures.matching import NO_PARTNER, Matching
from universality.measures.similarity import decoder_statistics, linear_cka, logit_weight_similarity, svcca
from universality.measures.statistics import excess_statistics, random_rotation
from universality.measures.token_control import TokenControlledPair, compare_token_controlled, token_control_statistics
from universality.analysis.steering import PairCausal

BASES = ("features", "neurons", "rotation")
SIMILARITY_TOKENS = 8192  # tokens used for CKA / SVCCA of the MLP spaces
TOP_BLOCK = 32  # matched features shown in the correlation heat map


@dataclass(frozen=True)
class PairResult:
    run_a: str
    run_b: str
    stats: dict[str, float]  # flat and loggable: "features.max_corr_median", "neurons.frac_above_0.5", "cka", ...
    table: pd.DataFrame  # one row per SAE feature of A: partners, correlations (raw and contextual), token share, densities, logit_corr, effect_corr
    matching: Matching  # of the SAE features
    max_corr: dict[str, np.ndarray]  # basis -> [F_A] max correlation with B (NaN where excluded); features only for same-model pairs
    top_block: np.ndarray  # [k, k] correlations of A's top matched features with their partners
    directory: Path | None = None  # the cached comparison's folder, once saved
    # Ablation-effect correlations of random feature pairs (compare.causal_top_n; the top matches' are the
    # table's ``effect_corr`` column): the null that causal universality is read against
    random_effect_corr: np.ndarray = field(default_factory=lambda: np.zeros(0))
    context_matching: Matching | None = None  # of the SAE features with each one's current-token mean removed
    token_share_a: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [F_A] cross-fitted token share (NaN: constant)
    token_share_b: np.ndarray = field(default_factory=lambda: np.zeros(0))


@torch.no_grad()
def feature_logit_weights(model: OneLayerTransformer, sae: SAE) -> np.ndarray:
    """Each feature's direct effect on the logits [F, V]: its decoder vector through W_out and W_U,
    shifted so its median logit weight is 0 (as the paper)."""
    weights_FV = (sae.W_dec.float().cpu() @ model.neuron_logit_weights().float().cpu()).numpy()
    return weights_FV - np.median(weights_FV, axis=1, keepdims=True)


def compare_runs(
    run_a: str, acts_a: HeldoutActivations, logits_a: np.ndarray,
    run_b: str, acts_b: HeldoutActivations, logits_b: np.ndarray,
    cfg: CompareConfig, rotation_seed: int, tokens: np.ndarray, vocab_size: int,
    decoders: tuple[np.ndarray, np.ndarray] | None = None,
) -> PairResult:
    """Compare A and B in every basis, raw and given the current token; ``logits_*`` are ``feature_logit_weights``
    of each run, ``tokens`` [N] the current token id of each activation row (``heldout.comparison_tokens``).

    ``decoders`` (A's and B's ``W_dec``) marks two SAEs of one model: their neurons are the same, so
    only features are compared, and their decoder vectors too (one neuron space: cosines mean something).
    """
    def compared(chunks) -> TokenControlledPair:
        return compare_token_controlled(with_tokens(chunks, tokens), vocab_size, cfg.min_firings, cfg.thresholds)

    controlled = {"features": compared(paired_chunks(acts_a.features(), acts_b.features()))}
    if decoders is None:
        neurons_a, neurons_b = acts_a.neurons(), acts_b.neurons()
        rotation = random_rotation(neurons_b.shape[1], rotation_seed).astype(np.float32)
        controlled["neurons"] = compared(paired_chunks(neurons_a, neurons_b))
        controlled["rotation"] = compared(paired_chunks(neurons_a, neurons_b, lambda chunk: chunk @ rotation))
    results = {basis: pair.raw for basis, pair in controlled.items()}
    stats = {f"{basis}.{key}": value for basis, r in results.items() for key, value in r.stats.items()}
    for basis, pair in controlled.items():
        stats.update(token_control_statistics(pair, basis, cfg.thresholds))
    max_corr = {basis: r.matching.best_b_corr for basis, r in results.items()}
    if decoders is None:
        stats.update({f"neurons.{k}": v for k, v in excess_statistics(max_corr["neurons"], max_corr["rotation"]).items()})
        for basis in ("neurons", "rotation"):
            stats[f"features.excess_over_{basis}"] = stats["features.max_corr_mean"] - stats[f"{basis}.max_corr_mean"]
    else:
        census_a, census_b = results["features"].census_a, results["features"].census_b
        stats.update({f"decoder.{k}": v for k, v in decoder_statistics(*decoders, census_a.included, census_b.included).items()})

    matching = results["features"].matching
    table = with_context_columns(results["features"].table(), controlled["features"])
    has_partner = matching.best_b != NO_PARTNER
    logit_corr = np.full(len(table), np.nan)
    logit_corr[has_partner] = logit_weight_similarity(logits_a, logits_b, np.flatnonzero(has_partner), matching.best_b[has_partner])
    table["logit_corr"] = logit_corr
    table["effect_corr"] = np.nan  # ablation-effect correlation with the partner, where computed (``with_causal``)
    stats["features.logit_corr_median"] = float(np.nanmedian(logit_corr)) if has_partner.any() else float("nan")
    mutual_a, _ = matching.mutual_pairs()
    stats["features.logit_corr_median_mutual"] = float(np.median(logit_corr[mutual_a])) if mutual_a.size else float("nan")

    if decoders is None:
        sample_a = np.asarray(neurons_a[:SIMILARITY_TOKENS], np.float64)
        sample_b = np.asarray(neurons_b[:SIMILARITY_TOKENS], np.float64)
        stats["cka"], stats["svcca"] = linear_cka(sample_a, sample_b), svcca(sample_a, sample_b)
    features = controlled["features"]
    return PairResult(run_a, run_b, stats, table, matching, max_corr, _top_block(results["features"].corr, matching),
                      context_matching=features.contextual.matching, token_share_a=features.token_share_a,
                      token_share_b=features.token_share_b)


def with_context_columns(table: pd.DataFrame, features: TokenControlledPair) -> pd.DataFrame:
    """The table with A's token share and its max-correlation partner after token means are removed."""
    context = features.contextual.matching
    return table.assign(token_share_a=features.token_share_a, feature_b_context=context.best_b,
                        corr_context=context.best_b_corr)


def with_causal(result: PairResult, causal: PairCausal) -> PairResult:
    """The pair with its causal universality: statistics, A's ``effect_corr`` column, the random pairs'."""
    return dataclasses.replace(result, stats={**result.stats, **causal.stats},
                               table=result.table.assign(effect_corr=causal.effect_corr_A),
                               random_effect_corr=causal.random_corr)


def _top_block(corr: np.ndarray, matching: Matching) -> np.ndarray:
    """Correlations among the best-matched features of A and their partners, in match order."""
    order = np.argsort(-np.nan_to_num(matching.best_b_corr, nan=-1.0))[:TOP_BLOCK]
    order = order[matching.best_b[order] != NO_PARTNER]
    return corr[np.ix_(order, matching.best_b[order])].astype(np.float32)


def save_pair(result: PairResult, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "table.parquet") as tmp:
        result.table.to_parquet(tmp, index=False)
    arrays = {f"matching_{k}": v for k, v in vars(result.matching).items()}
    arrays.update({f"context_matching_{k}": v for k, v in vars(result.context_matching).items()})
    arrays.update({f"max_corr_{k}": v for k, v in result.max_corr.items()}, top_block=result.top_block,
                  random_effect_corr=result.random_effect_corr, token_share_a=result.token_share_a,
                  token_share_b=result.token_share_b)
    with atomic_path(directory / "arrays.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    write_text(directory / "pair.json", json.dumps({"run_a": result.run_a, "run_b": result.run_b, "stats": result.stats}))


def load_pair(directory: Path) -> PairResult:
    meta = json.loads((directory / "pair.json").read_text())
    with np.load(directory / "arrays.npz") as arrays:
        matching, context_matching = (Matching(**{k[len(prefix):]: arrays[k] for k in arrays.files if k.startswith(prefix)})
                                      for prefix in ("matching_", "context_matching_"))
        max_corr = {basis: arrays[f"max_corr_{basis}"] for basis in BASES if f"max_corr_{basis}" in arrays.files}
        top_block, random_effect_corr = arrays["top_block"], arrays["random_effect_corr"]
        token_share_a, token_share_b = arrays["token_share_a"], arrays["token_share_b"]
    table = pd.read_parquet(directory / "table.parquet")
    return PairResult(meta["run_a"], meta["run_b"], meta["stats"], table, matching, max_corr, top_block, directory,
                      random_effect_corr, context_matching, token_share_a, token_share_b)
