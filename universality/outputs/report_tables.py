"""The HTML tables of univ's reports: a pair's headline beside the paper's, the run's universality beside its
ceiling, controls and nulls, each SAE's quality and convergence, and how neuron-like each seed's features are."""

from __future__ import annotations

from typing import Mapping

from universality.analysis.own_neurons import OwnNeurons
from universality.analysis.pairs import PairResult
from universality.outputs.formatting import number, statistic_spec

PAPER_MEDIAN_MAX_CORR = {"features": 0.72, "neurons": 0.46}  # Towards Monosemanticity, A/1 vs B/1


def own_neurons_table(own: Mapping[str, OwnNeurons]) -> str:
    """Per seed: how neuron-like its SAE's features are (over included features)."""
    keys = [k for k in next(iter(own.values())).stats if k.startswith(("max_corr_", "frac_above_", "neurons_for_"))]
    head = "".join(f"<th>{k}</th>" for k in keys)
    body = "".join(f"<tr><td>{name}</td>" + "".join(f"<td>{number(o.stats[k], statistic_spec(k))}</td>" for k in keys) + "</tr>"
                   for name, o in own.items())
    return (f"<table><tr><th>SAE</th>{head}</tr>{body}</table><p>Max correlation: each feature's highest Pearson "
            "correlation with a single neuron of its own model on the comparison tokens (the paper: features are "
            "not neurons in disguise). Features firing fewer than compare.min_firings times are left out.</p>")


def headline_table(stats: Mapping[str, float]) -> str:
    rows = [("median max corr, SAE features", "features.max_corr_median", PAPER_MEDIAN_MAX_CORR["features"]),
            ("median max corr, SAE features, contextual (token means removed)", "contextual.features.max_corr_median", None),
            ("median max corr, SAE features, token lookup (null)", "token_lookup.features.max_corr_median", None),
            ("median max corr, neurons", "neurons.max_corr_median", PAPER_MEDIAN_MAX_CORR["neurons"]),
            ("median max corr, neurons, contextual", "contextual.neurons.max_corr_median", None),
            ("median max corr, rotated neurons", "rotation.max_corr_median", None),
            ("mean max corr, SAE features", "features.max_corr_mean", None),
            ("fraction of features with a partner above 0.5", "features.frac_above_0.5", None),
            ("mutual matches", "features.n_mutual", None),
            ("median logit-weight corr, mutual matches", "features.logit_corr_median_mutual", None),
            ("linear CKA of the MLP spaces", "cka", None),
            ("median ablation-effect corr, top mutual matches", "causal.effect_corr_median_top", None),
            ("median ablation-effect corr, random feature pairs", "causal.effect_corr_median_random", None)]
    body = "".join(f"<tr><td>{label}</td><td>{number(stats.get(key), statistic_spec(key))}</td><td>{number(paper)}</td></tr>"
                   for label, key, paper in rows)
    return f"<table><tr><th>statistic</th><th>this run</th><th>paper (A/1 vs B/1)</th></tr>{body}</table>"


CEILING_ROWS = (("SAE features, across models", "", "features.max_corr_median"),  # (label, scope, statistic)
                ("SAE features, same model: two SAE seeds (the ceiling)", "ceiling.", "features.max_corr_median"),
                ("neurons, across models", "", "neurons.max_corr_median"),
                ("rotated neurons, across models (baseline)", "", "rotation.max_corr_median"))


def ceiling_table(summary: Mapping[str, float], n_pairs: int, n_replicate_pairs: int, randomized: PairResult | None,
                   untrained: PairResult | None = None) -> str:
    """Median max activation correlation across models, raw and contextual, beside the same-model ceiling, their
    ratio, the baselines, both controls and the token-lookup null, each with its interval: what a cross-model
    number can be trusted to say."""
    rows = [(label, summary.get(f"{scope}{key}_mean"), summary.get(f"{scope}contextual.{key}_mean"),
             summary.get(f"{scope}{key}_ci_low"), summary.get(f"{scope}{key}_ci_high")) for label, scope, key in CEILING_ROWS]
    rows.append(("across models / ceiling", summary.get("ceiling_ratio.features.max_corr_median"), None, None, None))
    for label, control in (("weight-shuffled", randomized), ("untrained", untrained)):
        if control is not None:
            rows.append((f"SAE features, {label} models (control)", control.stats["features.max_corr_median"],
                         control.stats.get("contextual.features.max_corr_median"), None, None))
    rows.append(("SAE features, token lookup (null: per-token means alone)",
                 summary.get("token_lookup.features.max_corr_median_mean"), None, None, None))
    body = "".join(f"<tr><td>{label}</td><td>{number(mean)}</td><td>{number(context)}</td><td>"
                   + (f"{number(low)} – {number(high)}" if low is not None else "") + "</td></tr>"
                   for label, mean, context, low, high in rows)
    return (f"<table><tr><th>median max activation correlation</th><th>mean over pairs</th><th>contextual</th>"
            f"<th>95% interval (raw)</th></tr>{body}"
            f"</table><p>Across models: {n_pairs} pair(s) of seeds. Ceiling: {n_replicate_pairs} pair(s) of SAEs trained on "
            "the same transformer with different SAE seeds; a cross-model number can be no higher than the SAEs' own "
            "agreement. Intervals: percentile bootstrap over seeds (each resample draws seeds with replacement and "
            "averages the pairs among the drawn seeds), none with fewer than 3 seeds. Contextual: the same after each "
            "feature's mean activation for the current token is removed (the partial correlation given the token); "
            "token lookup: each feature replaced by its per-token means, what token identity gives by itself.</p>")


SAE_COLUMNS = (("FVU", "fvu", ".3f"), ("L0", "l0", ".1f"), ("dead", "dead_fraction", ".1%"),
               ("loss recovered", "loss_recovered", ".1%"),
               ("converged: activations", "convergence_corr_median", ".3f"),
               ("converged: decoder", "convergence_decoder_cos_median", ".3f"))


def sae_table(sae_metrics: Mapping[str, Mapping]) -> str:
    """Each SAE's evaluation on the comparison tokens, and how far it had settled: its features at 75% of
    training matched to its final ones (median max activation correlation; median one-to-one decoder cosine)."""
    head = "".join(f"<th>{label}</th>" for label, _, _ in SAE_COLUMNS)
    body = "".join(f"<tr><td>{name}</td>" + "".join(f"<td>{number(m.get(key), spec)}</td>" for _, key, spec in SAE_COLUMNS) + "</tr>"
                   for name, m in sae_metrics.items())
    return (f"<table><tr><th>SAE</th>{head}</tr>{body}</table><p>Converged: each final feature's max activation "
            "correlation with the SAE as it was at 75% of training (median), and the median cosine of one-to-one "
            "matched decoder vectors; 1 means the dictionary had stopped moving.</p>")
