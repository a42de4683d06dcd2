"""What ``univ run`` prints when it finishes: each run's losses and SAE, each pair, then the universality
headline with its ceiling (two SAEs of one model) and baselines beside it, so each number says how far to
trust it; for a dictionary family, universality by size and feature splitting; the crosscoder."""

from __future__ import annotations

from universality.core.run_names import model_name, size_of, summary_prefix
from universality.measures import splitting
from universality.outputs.crosscoder_report import crosscoder_lines
from universality.outputs.formatting import number


def describe(result) -> str:
    """The lines for a finished ``pipeline.RunResult``."""
    lines = [*run_lines(result), *pair_lines(result)]
    lines += headline(result.summary, len(result.pairs), len(result.replicate_pairs), result.randomized)
    lines += size_lines(result) + split_lines(result) + crosscoder_lines(result)
    lines.append(f"results in {result.dataset.results_dir}")
    return "\n".join(lines)


def run_lines(result) -> list[str]:
    """A line per run: a trained model's held-out loss beside its SAE's quality; another SAE of it; a control."""
    lines = []
    for name, m in result.models.items():
        sae = result.saes[name]
        s = sae.metrics
        quality = f"SAE fvu {s['fvu']:.3f} L0 {s['l0']:.1f} dead {s['dead_fraction']:.1%}"
        if "convergence_corr_median" in s:
            quality += f" converged {s['convergence_corr_median']:.2f}"
        if sae.replicate or size_of(name):
            what = "replicate SAE" if sae.replicate else f"{sae.sae.W_dec.shape[0]:,}-feature SAE"
            lines.append(f"{name} ({what} of {model_name(name)}): {quality} loss recovered {s['loss_recovered']:.1%}")
        elif m.metrics:  # a trained model; a weight-shuffled control's MLP barely matters to its loss
            lines.append(f"{name}: held-out loss {m.metrics['eval_loss']:.3f} (bigram {m.metrics['bigram_ce']:.3f}) | "
                         f"{quality} loss recovered {s['loss_recovered']:.1%}")
        else:
            lines.append(f"{name} (control): {quality}")
    return lines


def pair_lines(result) -> list[str]:
    """A line per pair of seeds (features, neurons, rotated neurons) and per pair of SAEs of one model."""
    lines = [f"{p.run_a} vs {p.run_b}: median max corr features {p.stats['features.max_corr_median']:.3f} | "
             f"neurons {p.stats['neurons.max_corr_median']:.3f} | rotated neurons {p.stats['rotation.max_corr_median']:.3f}"
             for p in result.pairs]
    return lines + [f"{p.run_a} vs {p.run_b} (same model): median max corr features {p.stats['features.max_corr_median']:.3f} | "
                    f"decoder cosine, one-to-one {p.stats['decoder.cos_hungarian_median']:.3f}" for p in result.replicate_pairs]


def size_lines(result) -> list[str]:
    """A dictionary family's universality at each size: across models, the ceiling and their ratio (none for one size)."""
    if len(result.size_pairs) < 2:
        return []
    primary = result.cfg.sae.dict_size
    lines = ["by dictionary size: median max activation correlation (mean over pairs): across models | ceiling | ratio"]
    for size in result.size_pairs:
        prefix = summary_prefix(None if size == primary else size)
        values = [result.summary.get(f"{prefix}{key}") for key in (
            "features.max_corr_median_mean", "ceiling.features.max_corr_median_mean", "ceiling_ratio.features.max_corr_median")]
        lines.append(f"  {size:>8,} features{' (primary)' if size == primary else '':<10} " + " | ".join(map(number, values)))
    return lines


def split_lines(result) -> list[str]:
    """A dictionary family's feature splitting between consecutive sizes (none for one size)."""
    pairs = [(level.size_a, level.size_b) for level in next(iter(result.splits.values()), [])]
    if not pairs:
        return []
    lines = [f"feature splitting: the smaller dictionary's features (mean over models) whose children in the next size "
             f"(activation correlation > {splitting.CHILD_MIN_CORR}) are one above {splitting.PERSIST_MIN_CORR} (persist), "
             "two or more (split), one below it (shift), none (vanish)"]
    for size_a, size_b in pairs:
        prefix = f"splits.{size_a}_to_{size_b}."
        shown = " | ".join(f"{c} {number(result.summary.get(f'{prefix}frac_{c}_mean'), '.2f')}" for c in splitting.CLASSES)
        lines.append(f"  {size_a:>8,} -> {size_b:<8,} {shown}")
    return lines


def headline(summary: dict, n_pairs: int, n_replicate_pairs: int, randomized) -> list[str]:
    """Median max activation correlation of SAE features across models, beside its ceiling, their ratio
    and the baselines (mean over pairs, with the 95% interval from resampling seeds)."""
    if not n_pairs and not n_replicate_pairs:
        return []

    def row(label: str, key: str) -> list[str]:
        if f"{key}_mean" not in summary:
            return []
        low, high = summary.get(f"{key}_ci_low"), summary.get(f"{key}_ci_high")
        interval = f"  [{number(low)}, {number(high)}]" if number(low) != "–" else ""
        return [f"  {label:<50} {number(summary[f'{key}_mean'])}{interval}"]

    lines = [f"universality: median max activation correlation, mean over {n_pairs} pair{'s' * (n_pairs != 1)} of models"
             " [95% interval, resampling seeds; none below 3 seeds]", *row("SAE features, across models", "features.max_corr_median")]
    if n_replicate_pairs:
        lines += row(f"SAE features, same model (ceiling, {n_replicate_pairs} SAE pair{'s' * (n_replicate_pairs > 1)})",
                     "ceiling.features.max_corr_median")
        if "ceiling_ratio.features.max_corr_median" in summary:
            lines.append(f"  {'across models / ceiling':<50} {number(summary['ceiling_ratio.features.max_corr_median'])}")
    lines += row("neurons", "neurons.max_corr_median") + row("rotated neurons (baseline)", "rotation.max_corr_median")
    lines += row("SAE features vs own neurons (mean over seeds)", "own_neurons.max_corr_median")
    if randomized is not None:
        lines.append(f"  {'SAE features, weight-shuffled models':<50} {number(randomized.stats['features.max_corr_median'])}")
    if "causal.effect_corr_median_top_mean" in summary:
        lines += ["causal universality: median correlation of ablation effects (per-token change in next-token log-prob)",
                  *row("top mutual matches (compare.causal_top_n)", "causal.effect_corr_median_top"),
                  *row("random feature pairs", "causal.effect_corr_median_random")]
    return lines
