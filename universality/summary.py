"""A run's statistics over its pairs and seeds: the mean, std and seed-bootstrap interval of every pair statistic,
the within-model ceiling and the ratio of cross-model universality to it, feature families and partner counts,
the features against their own neurons over seeds, and feature splitting over models (``RunResult.summary``)."""

from __future__ import annotations

from universality.analysis import crosscoder as crosscoder_analysis
from universality.analysis.heldout import HeldoutActivations
from universality.analysis.pairs import PairResult
from universality.core.config import ExperimentConfig
from universality.core.run_names import crosscoder_name, model_name, summary_prefix
from universality.measures.across_seeds import FAMILY_MIN_CORR, feature_families, included_features, partner_counts, summarize_pairs
from universality.measures.splitting import SplitLevel, level_statistics
from universality.runtime import cache
from universality.stages.sae import RunSAE


def summarize_splits(splits: dict[str, list[SplitLevel]], cfg: ExperimentConfig) -> dict[str, float]:
    """Each consecutive size pair's split statistics over the models (mean, std, seed-bootstrap CI):
    ``splits.512_to_1024.frac_split_mean``, ``splits.512_to_1024.child_density_ratio_median_mean``, ..."""
    by_sizes: dict[tuple[int, int], list[dict]] = {}
    for levels in splits.values():
        for level in levels:
            by_sizes.setdefault((level.size_a, level.size_b), []).append(level_statistics(level))
    summary = {}
    for (size_a, size_b), stats in by_sizes.items():
        over_models = summarize_pairs(stats, [(i,) for i in range(len(stats))], len(stats), cfg.compare.n_bootstrap)
        summary.update({f"splits.{size_a}_to_{size_b}.{key}": value for key, value in over_models.items()})
    return summary


CEILING_RATIOS = ("features.max_corr_median", "features.max_corr_mean", "features.frac_above_0.5")


def summarize(pairs: list[PairResult], replicate_pairs: list[PairResult], randomized: PairResult | None,
              names: list[str], cfg: ExperimentConfig, untrained: PairResult | None = None) -> dict:
    """Statistics over all pairs (mean, std, seed-bootstrap CI), the within-model ceiling and the ratio of
    cross-model universality to it, feature families and partner counts, the controls (``randomized.*``,
    ``untrained.*``) and the gaps between the trained models and each null (``gap.*``)."""
    index = {name: i for i, name in enumerate(names)}
    units = [(index[model_name(p.run_a)], index[model_name(p.run_b)]) for p in pairs]
    summary = summarize_pairs([p.stats for p in pairs], units, len(names), cfg.compare.n_bootstrap) if pairs else {}
    if replicate_pairs:
        units = [(index[model_name(p.run_a)],) for p in replicate_pairs]
        ceiling = summarize_pairs([p.stats for p in replicate_pairs], units, len(names), cfg.compare.n_bootstrap)
        summary.update({f"ceiling.{key}": value for key, value in ceiling.items()})
        if pairs:
            for key in CEILING_RATIOS:
                summary[f"ceiling_ratio.{key}"] = summary[f"{key}_mean"] / summary[f"ceiling.{key}_mean"]
    matchings = {(index[model_name(p.run_a)], index[model_name(p.run_b)]): p.matching for p in pairs}
    if matchings:
        families = feature_families(matchings, min_corr=FAMILY_MIN_CORR)
        multi = families.n_runs > 1
        summary.update({
            "families.n_multi_run": int(multi.sum()),
            "families.n_all_runs": int((families.n_runs == len(names)).sum()),
            "families.mean_size_multi_run": float(families.size[multi].mean()) if multi.any() else 0.0,
        })
        included = included_features(matchings)
        for run, counts in partner_counts(matchings, threshold=FAMILY_MIN_CORR).items():
            partnered_everywhere = counts[included[run]] == len(names) - 1
            summary[f"{names[run]}.frac_features_partnered_all_runs"] = float(partnered_everywhere.mean())
    for prefix, control in (("randomized", randomized), ("untrained", untrained)):
        if control is not None:
            summary.update({f"{prefix}.{key}": value for key, value in control.stats.items()})
    if randomized is not None and pairs:
        summary["features.excess_over_randomized"] = (
            summary["features.max_corr_mean_mean"] - randomized.stats["features.max_corr_mean"])
    summary.update(gaps(summary))
    return summary


GAP_NULLS = {"randomized": "randomized.{kind}features.max_corr_median",  # null -> its median max corr of SAE features
             "untrained": "untrained.{kind}features.max_corr_median",
             "token_lookup": "token_lookup.features.max_corr_median_mean"}


def gaps(summary: dict[str, float]) -> dict[str, float]:
    """The trained models' median max correlation of SAE features (mean over pairs) minus each null's, raw and
    contextual: ``gap.raw.randomized``, ``gap.contextual.untrained``, ``gap.raw.token_lookup``, ... (the token-lookup
    null has no contextual version: given the token, a per-token mean is constant)."""
    out = {}
    for kind, prefix in (("raw", ""), ("contextual", "contextual.")):
        trained = summary.get(f"{prefix}features.max_corr_median_mean")
        for null, template in GAP_NULLS.items():
            if kind == "contextual" and null == "token_lookup":
                continue
            key = template.format(kind=prefix)
            if trained is not None and key in summary:
                out[f"gap.{kind}.{null}"] = trained - summary[key]
    return out


def summarize_own_neurons(saes: dict[str, RunSAE], names: list[str], cfg: ExperimentConfig) -> dict[str, float]:
    """The seeds' own SAEs against their models' neurons, over seeds (mean, std, seed-bootstrap CI):
    ``own_neurons.max_corr_median_mean``, ``own_neurons.neurons_for_90pct_median_mean``, ..."""
    over_seeds = _over_seeds([saes[name].own_neurons.stats for name in names], cfg)
    return {f"own_neurons.{key}": value for key, value in over_seeds.items()}


def summarize_token_shares(saes: dict[str, RunSAE], names: list[str], cfg: ExperimentConfig) -> dict[str, float]:
    """The seeds' features' and neurons' token and position shares, over seeds: ``token_share.features_median_mean``,
    ``position_share.neurons_frac_ge_0.8_mean``, ... (none where the runs have no token-share stage)."""
    if any(saes[name].token_shares is None for name in names):
        return {}
    return _over_seeds([saes[name].token_shares.stats for name in names], cfg)


def _over_seeds(stats: list[dict[str, float]], cfg: ExperimentConfig) -> dict[str, float]:
    return summarize_pairs(stats, [(i,) for i in range(len(stats))], len(stats), cfg.compare.n_bootstrap)


def run_summary(size_pairs: dict[int, list[PairResult]], size_replicate_pairs: dict[int, list[PairResult]],
                randomized: PairResult | None, saes: dict[str, RunSAE], splits: dict[str, list[SplitLevel]],
                seed_names: list[str], cfg: ExperimentConfig, untrained: PairResult | None = None) -> dict[str, float]:
    """A run's whole summary: the primary size's statistics (with the control and the own neurons), every other
    size's under its prefix (``size512.``), and the feature splitting between sizes."""
    primary = cfg.sae.dict_size
    summary = summarize(size_pairs[primary], size_replicate_pairs[primary], randomized, seed_names, cfg, untrained)
    summary.update(summarize_own_neurons(saes, seed_names, cfg))
    summary.update(summarize_token_shares(saes, seed_names, cfg))
    for size in cfg.sae.sizes:
        if size != primary:
            stats = summarize(size_pairs[size], size_replicate_pairs[size], None, seed_names, cfg)
            summary.update({f"{summary_prefix(size)}{key}": value for key, value in stats.items()})
    summary.update(summarize_splits(splits, cfg))
    return summary


def crosscoder_summary(crosscoders: dict, activations: dict[str, HeldoutActivations], pairs: list[PairResult],
                       cfg: ExperimentConfig) -> tuple[dict, dict[str, float]]:
    """(the main crosscoder's per-latent columns beside per-model matching, the run's ``crosscoder.`` statistics,
    with ``crosscoder.seconds``: what building its stages took); both empty without a crosscoder."""
    main = crosscoder_name()
    if main not in crosscoders:
        return {}, {}
    features = {name: activations[name].features() for name in dict.fromkeys(crosscoders[main].models)}
    beside, stats = crosscoder_analysis.beside_matching(crosscoders[main], features, pairs, cfg.compare)
    replicates = [crosscoder_name(None, r) for r in range(1, cfg.crosscoder.replicates + 1)]
    summary = crosscoder_analysis.run_statistics(crosscoders, main, replicates, stats, cfg.compare)
    seconds = sum(cache.build_seconds(folder) for cc in crosscoders.values() for folder in (cc.directory, cc.evaluation))
    return beside, summary | {"crosscoder.seconds": seconds}
