"""The pair stage: two runs' features, neurons and rotated neurons matched by activation correlation on the
same comparison tokens (``analysis.pairs``), cached per pair. Two SAEs of one model (``same_model``: the
within-model ceiling) share their neurons: their features are matched, and their decoder vectors. With
``compare.causal_top_n`` the top mutual matches are also ablated in both models and their effects correlated
(causal universality). Every basis is also compared given the current token (contextual, token-lookup null, by
token-share bin) in the same pass, on the comparison tokens' ids from the data stage."""

from __future__ import annotations

from pathlib import Path

from universality.analysis import heldout, steering
from universality.analysis.pairs import PairResult, compare_runs, feature_logit_weights, load_pair, save_pair, with_causal
from universality.core.config import ExperimentConfig
from universality.runtime import cache
from universality.stages.data import heldout_tokens

STAGE = cache.Stage("pair", 5)  # 3: same-model (replicate) pairs compare features and decoder vectors. 4: causal universality (compare.causal_top_n). 5: contextual and token-lookup statistics, token-share bins


def key(activations_a: str, activations_b: str, cfg: ExperimentConfig, same_model: bool = False) -> str:
    """Both runs' activations (which fix the tokens) and the only compare settings a pair uses."""
    return STAGE.key(a=activations_a, b=activations_b, min_firings=cfg.compare.min_firings,
                     thresholds=cfg.compare.thresholds, same_model=same_model, causal_top_n=cfg.compare.causal_top_n)


def build(a, b, cfg: ExperimentConfig, pair_key: str, results_dir: Path, same_model: bool, data_dir: Path) -> PairResult:
    """Match A's features (an ``SAERun``), neurons and rotated neurons against B's, raw and given the current
    token of the held-out tokens of the data stage in ``data_dir`` (causal universality too, with
    ``compare.causal_top_n``)."""

    def compute(directory: Path) -> dict:
        decoders = (a.sae.sae.W_dec.detach().cpu().numpy(), b.sae.sae.W_dec.detach().cpu().numpy()) if same_model else None
        tokens = heldout.comparison_tokens(heldout_tokens(data_dir), cfg.data.ctx_len, cfg.compare.tokens,
                                           cfg.compare.skip_first_positions)
        result = compare_runs(a.name, a.activations, feature_logit_weights(a.model.model, a.sae.sae),
                              b.name, b.activations, feature_logit_weights(b.model.model, b.sae.sae),
                              cfg.compare, rotation_seed=int(pair_key[:8], 16), tokens=tokens,
                              vocab_size=a.model.model.cfg.vocab_size, decoders=decoders)
        if cfg.compare.causal_top_n:
            result = with_causal(result, _causal(a, b, result, cfg, data_dir, seed=int(pair_key[8:16], 16)))
        save_pair(result, directory)
        return {"pair": [a.name, b.name]}

    return load_pair(STAGE.build(results_dir, pair_key, compute, f"{a.name} vs {b.name}"))


def _causal(a, b, result: PairResult, cfg: ExperimentConfig, data_dir: Path, seed: int) -> steering.PairCausal:
    """Ablation effects of the pair's top mutual matches and of random pairs, on the comparison tokens."""
    contexts = heldout.eval_contexts(heldout_tokens(data_dir), cfg.data.ctx_len, cfg.compare.tokens)
    a_subject, b_subject = (steering.subject(run.model.model, run.sae.sae, run.activations.features(), contexts,
                                             cfg.compare.skip_first_positions) for run in (a, b))
    return steering.causal_universality(a_subject, b_subject, result.matching, cfg.compare.causal_top_n, seed)
