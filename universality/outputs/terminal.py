"""What ``univ run`` prints when it finishes: each run's losses and SAE, each pair, then the universality
headline, raw and contextual (the current token's part removed), with its ceiling (two SAEs of one model),
baselines, controls and the token-lookup null beside it, so each number says how far to
trust it; for a dictionary family, universality by size and feature splitting; the crosscoder."""

from __future__ import annotations

from universality.core.run_names import model_name, size_of, summary_prefix
from universality.measures import splitting
from universality.outputs.crosscoder_report import crosscoder_lines
from universality.outputs.formatting import number


def describe(result) -> str:
    """The lines for a finished ``pipeline.RunResult``."""
    lines = [*run_lines(result), *pair_lines(result)]
    lines += headline(result.summary, len(result.pairs), len(result.replicate_pairs), result.randomized, result.untrained)
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
    """A line per pair of seeds (features, neurons, rotated neurons) and per pair of SAEs of one model, each median
    raw (contextual in brackets, where the pair has it)."""
    def median(p, basis: str) -> str:
        contextual = p.stats.get(f"contextual.{basis}.max_corr_median")
        return f"{p.stats[f'{basis}.max_corr_median']:.3f}" + ("" if contextual is None else f" ({number(contextual)})")

    lines = [f"{p.run_a} vs {p.run_b}: median max corr (contextual) features {median(p, 'features')} | "
             f"neurons {median(p, 'neurons')} | rotated neurons {median(p, 'rotation')}" for p in result.pairs]
    return lines + [f"{p.run_a} vs {p.run_b} (same model): median max corr (contextual) features {median(p, 'features')} | "
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


def headline(summary: dict, n_pairs: int, n_replicate_pairs: int, randomized, untrained=None) -> list[str]:
    """Median max activation correlation of SAE features across models, raw and contextual (each feature's
    current-token mean removed) side by side, beside its ceiling, their ratio, the baselines, both controls and
    the token-lookup null, and the gap to each null (mean over pairs, with the 95% interval from resampling seeds)."""
    if not n_pairs and not n_replicate_pairs:
        return []

    def cell(key: str) -> str:
        if key not in summary and f"{key}_mean" not in summary:
            return f"{'–':<22}"
        low, high = summary.get(f"{key}_ci_low"), summary.get(f"{key}_ci_high")
        interval = f" [{number(low)}, {number(high)}]" if number(low) != "–" else ""
        return f"{number(summary.get(f'{key}_mean', summary.get(key))) + interval:<22}"

    def row(label: str, key: str, contextual: str | None) -> list[str]:
        if f"{key}_mean" not in summary and key not in summary:
            return []
        return [f"  {label:<50} {cell(key)} {cell(contextual) if contextual else '':<22}".rstrip()]

    def both(label: str, basis_key: str, scope: str = "") -> list[str]:
        return row(label, f"{scope}{basis_key}", f"{scope}contextual.{basis_key}")

    lines = [f"universality: median max activation correlation, mean over {n_pairs} pair{'s' * (n_pairs != 1)} of models"
             " [95% interval, resampling seeds; none below 3 seeds]",
             f"  {'':<50} {'raw':<22} {'contextual (token means removed)'}",
             *both("SAE features, across models", "features.max_corr_median")]
    if n_replicate_pairs:
        lines += both(f"SAE features, same model (ceiling, {n_replicate_pairs} SAE pair{'s' * (n_replicate_pairs > 1)})",
                      "features.max_corr_median", "ceiling.")
        if "ceiling_ratio.features.max_corr_median" in summary:
            lines.append(f"  {'across models / ceiling':<50} {number(summary['ceiling_ratio.features.max_corr_median'])}")
    lines += both("neurons", "neurons.max_corr_median") + both("rotated neurons (baseline)", "rotation.max_corr_median")
    lines += row("SAE features vs own neurons (mean over seeds)", "own_neurons.max_corr_median", None)
    for label, scope, control in (("weight-shuffled", "randomized.", randomized), ("untrained", "untrained.", untrained)):
        if control is not None:
            lines += both(f"SAE features, {label} models", "features.max_corr_median", scope)
    lines += row("SAE features, token lookup (per-token means alone)", "token_lookup.features.max_corr_median", None)
    gaps = [f"{label} {number(summary.get(f'gap.raw.{null}'))} | {number(summary.get(f'gap.contextual.{null}'))}"
            for null, label in (("randomized", "weight-shuffled"), ("untrained", "untrained"), ("token_lookup", "token lookup"))
            if f"gap.raw.{null}" in summary]
    if gaps:
        lines.append(f"  {'across models minus each null (raw | contextual)':<50} " + "; ".join(gaps))
    if "token_share.features_median_mean" in summary:
        lines.append(f"  {'token share, median (mean over seeds)':<50} SAE features "
                     f"{number(summary['token_share.features_median_mean'])} | neurons {number(summary.get('token_share.neurons_median_mean'))}")
    if "causal.effect_corr_median_top_mean" in summary:
        lines += ["causal universality: median correlation of ablation effects (per-token change in next-token log-prob)",
                  *row("top mutual matches (compare.causal_top_n)", "causal.effect_corr_median_top", None),
                  *row("random feature pairs", "causal.effect_corr_median_random", None)]
    return lines
