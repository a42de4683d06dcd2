"""Interventions on SAE features, and whether a feature and its partners in other seeds do the same thing.

The paper's two interventions ("Towards Monosemanticity", Interventions):

- ablation: subtract f_i(x) d_i from the MLP neurons at every position and finish the forward pass;
  its effect is the change in log-probability of each held-out token's actual next token;
- pinned sampling: clamp f_i to a value at every position and sample a continuation of a prompt.

The model has one layer, so ablating a feature changes the residual stream only at the positions where
it fires, by -f_i (W_out d_i): ``ablation_effect`` recomputes only the final LayerNorm and the
unembedding there, and the effect elsewhere is exactly zero. ``feature_hook`` is the same intervention
as an MLP hook for a full forward pass (the reference the fast path is tested against, and how pinning
runs). The saved SAE works on raw neurons (its input scale is folded in: ``SAE.fold_input_scale``) with
unit-norm decoder rows, so f_i d_i is in neuron units as it is.

Across seeds, effects are compared on the same held-out tokens: the Pearson correlation of two
features' per-token log-probability changes, the overlap of their most-affected tokens, and (pinning)
the Jensen–Shannon divergence between two models' next-token distributions, steered and unsteered.

Shapes: C contexts, T positions, N scored tokens (positions past the first ``skip`` of a context that
have a next token in it), R rows where a feature fires, K features, D d_model, M neurons, V vocab,
L tokens of a text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from models.transformer import MLPHook, OneLayerTransformer
from sae.base import SAE
from universality.core.errors import UnivError
from universality.measures.matching import NO_PARTNER, Matching

UNEMBED_ROWS = 8192  # rows unembedded at once: a [rows, V] logits block
BATCH_CONTEXTS = 32  # contexts per forward pass over the comparison tokens


@dataclass(frozen=True)
class Residuals:
    """One model on the comparison tokens, at the scored tokens: what an ablation starts from."""

    resid_ND: Tensor  # the residual stream after the MLP (the final LayerNorm's input)
    target_N: Tensor  # int64: the token each position predicts, the next one in its context
    logp_N: Tensor  # log p(target) without intervention


@dataclass(frozen=True)
class Effect:
    """The change in log p(actual next token) under an intervention, on N scored tokens: zero but at ``rows``."""

    rows: np.ndarray  # [R] int64, increasing: the scored tokens it changes
    delta: np.ndarray  # [R] float64: log p after minus before
    n: int  # scored tokens in all

    def dense(self) -> np.ndarray:
        """[N] float64: every scored token's change."""
        out = np.zeros(self.n)
        out[self.rows] = self.delta
        return out

    def loss_change(self) -> float:
        """Mean change in next-token loss (nats) over the tokens it changes (NaN: none)."""
        return float(-self.delta.mean()) if self.delta.size else math.nan

    def most_affected(self, k: int) -> np.ndarray:
        """The scored tokens (rows) of the ``k`` largest |changes|, largest first (non-zero changes only)."""
        moved = np.flatnonzero(self.delta)
        order = moved[np.argsort(-np.abs(self.delta[moved]), kind="stable")[:k]]
        return self.rows[order]


def scored_rows(n_contexts: int, ctx_len: int, skip: int) -> np.ndarray:
    """Which rows of a run's stored activations (positions ``skip``..T-1 of each context, in order) are
    scored tokens: all but each context's last position, whose next token is in no context of its own."""
    kept = ctx_len - skip
    rows = np.arange(n_contexts * kept)
    return rows[rows % kept != kept - 1]


def scored_position(row: int, ctx_len: int, skip: int) -> int:
    """Where the next token of scored token ``row`` sits in the flat comparison tokens."""
    per_context = ctx_len - skip - 1
    return (row // per_context) * ctx_len + skip + row % per_context + 1


def target_logprobs(logits_XV: Tensor, target_X: Tensor) -> Tensor:
    """log p(target) under each row of logits."""
    return torch.log_softmax(logits_XV, dim=-1).gather(-1, target_X.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def residuals(model: OneLayerTransformer, contexts_CT: Tensor, skip: int) -> Residuals:
    """One pass over the contexts: the residual stream, next token and its log-probability at every scored token."""
    device = model.W_U.weight.device
    parts = []
    for batch in contexts_CT.split(BATCH_CONTEXTS):
        batch = batch.to(device)
        resid_BTD, _ = model.residual(batch)
        resid_BSD, target_BS = resid_BTD[:, skip:-1], batch[:, skip + 1 :]
        logp_BS = target_logprobs(model.unembed(resid_BSD), target_BS)
        parts.append((resid_BSD.reshape(-1, resid_BSD.shape[-1]), target_BS.reshape(-1), logp_BS.reshape(-1)))
    return Residuals(*(torch.cat(column) for column in zip(*parts)))


@torch.no_grad()
def ablation_effect(model: OneLayerTransformer, res: Residuals, rows_R: np.ndarray, f_RK: Tensor, d_KM: Tensor) -> Effect:
    """Ablate K features together: their activations ``f_RK`` at the scored tokens ``rows_R`` where any of
    them fires (zero everywhere else), their decoder rows ``d_KM``. One layer: the residual stream moves by
    -f (d W_outᵀ) at those tokens only, so only they are unembedded again."""
    W_out_DM = model.mlp.W_out.weight
    shift_KD = d_KM.to(W_out_DM) @ W_out_DM.T
    rows = torch.as_tensor(rows_R, dtype=torch.long, device=W_out_DM.device)
    f_RK = f_RK.to(W_out_DM)
    deltas = []
    for start in range(0, len(rows), UNEMBED_ROWS):
        r = rows[start : start + UNEMBED_ROWS]
        resid_RD = res.resid_ND[r] - f_RK[start : start + UNEMBED_ROWS] @ shift_KD
        deltas.append(target_logprobs(model.unembed(resid_RD), res.target_N[r]) - res.logp_N[r])
    delta = torch.cat(deltas).double().cpu().numpy() if deltas else np.zeros(0)
    return Effect(np.asarray(rows_R, np.int64), delta, len(res.target_N))


def feature_hook(sae: SAE, features: Sequence[int], value: float | None = None) -> MLPHook:
    """The intervention on the neurons [..., M] as an MLP hook: ``value`` None ablates the features (subtracts
    f_i d_i), a number pins each of them to it (adds (value - f_i) d_i), at every position. An SAE that reads tokens
    cannot be hooked: a hook sees the neurons, not the tokens."""
    if sae.reads_tokens:
        raise UnivError(f"a {sae.arch} SAE's features cannot be set through an MLP hook (--pin): its encoder needs each "
                        "position's token, which the hook does not see (ablating them works)")
    index = torch.as_tensor(list(features), dtype=torch.long)

    def hook(acts_XM: Tensor) -> Tensor:
        flat_YM = acts_XM.reshape(-1, acts_XM.shape[-1])
        f_YK = sae.encode(flat_YM)[:, index].to(acts_XM.dtype)
        target_YK = torch.zeros_like(f_YK) if value is None else torch.full_like(f_YK, value)
        return (flat_YM + (target_YK - f_YK) @ sae.W_dec[index].to(acts_XM.dtype)).reshape(acts_XM.shape)

    return hook


@dataclass(frozen=True)
class Subject:
    """One model and its SAE on the comparison tokens: what interventions run on."""

    model: OneLayerTransformer
    sae: SAE
    res: Residuals
    features_NF: sp.csc_matrix  # SAE feature activations at the scored tokens

    def activations(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, values) of the scored tokens where ``feature`` fires."""
        start, end = self.features_NF.indptr[feature : feature + 2]
        return self.features_NF.indices[start:end].astype(np.int64), self.features_NF.data[start:end]

    def max_activation(self, feature: int) -> float:
        """The feature's largest activation on the scored tokens (0: it never fires)."""
        values = self.activations(feature)[1]
        return float(values.max()) if values.size else 0.0

    def ablation(self, feature: int) -> Effect:
        rows, values = self.activations(feature)
        return ablation_effect(self.model, self.res, rows, torch.from_numpy(values)[:, None],
                               self.sae.W_dec[feature : feature + 1].detach())


def subject(model: OneLayerTransformer, sae: SAE, features: sp.csr_matrix, contexts_CT: Tensor, skip: int) -> Subject:
    """A run on its comparison contexts; ``features`` are its stored activations (every position past ``skip``)."""
    rows = scored_rows(*contexts_CT.shape, skip)
    csc = sp.csc_matrix(features[rows])
    csc.sort_indices()
    return Subject(model, sae, residuals(model, contexts_CT, skip), csc)


def effect_correlation(a: Effect, b: Effect) -> float:
    """Pearson correlation of two effects over their N scored tokens (zeros included), from sums over the
    tokens where either is non-zero; NaN when either is constant."""
    n = a.n
    _, ia, ib = np.intersect1d(a.rows, b.rows, assume_unique=True, return_indices=True)
    sa, sb = a.delta.sum(), b.delta.sum()
    cov = a.delta[ia] @ b.delta[ib] - sa * sb / n
    var_a, var_b = a.delta @ a.delta - sa * sa / n, b.delta @ b.delta - sb * sb / n
    if var_a <= 0 or var_b <= 0:
        return math.nan
    return float(np.clip(cov / math.sqrt(var_a * var_b), -1.0, 1.0))


def top_overlap(a: Effect, b: Effect, k: int) -> float:
    """Jaccard overlap of the two effects' ``k`` most-affected tokens (NaN: neither changes any)."""
    top_a, top_b = set(a.most_affected(k).tolist()), set(b.most_affected(k).tolist())
    union = top_a | top_b
    return len(top_a & top_b) / len(union) if union else math.nan


@torch.no_grad()
def sample(model: OneLayerTransformer, prompt_L: Tensor, n_tokens: int, temperature: float, seed: int,
           hook: MLPHook | None = None) -> Tensor:
    """``n_tokens`` sampled after the prompt (each step sees the last ``ctx_len`` tokens) at ``temperature``
    (0: greedy), from a generator seeded with ``seed``: the same seed, the same draws, steered or not."""
    generator = torch.Generator().manual_seed(seed)
    device = model.W_U.weight.device
    tokens = [int(t) for t in prompt_L]
    for _ in range(n_tokens):
        window = torch.tensor(tokens[-model.cfg.ctx_len :], device=device)
        logits_V = model(window[None], mlp_hook=hook).logits[0, -1].double().cpu()
        if temperature == 0:
            tokens.append(int(logits_V.argmax()))
        else:
            tokens.append(int(torch.multinomial(torch.softmax(logits_V / temperature, -1), 1, generator=generator)))
    return torch.tensor(tokens[len(prompt_L) :], dtype=torch.long)


@torch.no_grad()
def next_token_logprobs(model: OneLayerTransformer, tokens_L: Tensor, hook: MLPHook | None = None) -> Tensor:
    """[L, V] float64: the model's next-token log-distribution at every position of a text (its last ``ctx_len`` tokens)."""
    window = tokens_L[-model.cfg.ctx_len :].to(model.W_U.weight.device)
    return torch.log_softmax(model(window[None], mlp_hook=hook).logits[0].double().cpu(), dim=-1)


def jensen_shannon(logp_XV: Tensor, logq_XV: Tensor) -> Tensor:
    """[X] Jensen–Shannon divergence (bits, in [0, 1]) between two distributions per row, given as log-probabilities."""
    logm_XV = torch.logaddexp(logp_XV, logq_XV) - math.log(2)

    def kl_to_m(logx_XV: Tensor) -> Tensor:
        x_XV = logx_XV.exp()
        return torch.where(x_XV > 0, x_XV * (logx_XV - logm_XV), torch.zeros(())).sum(-1)

    return (kl_to_m(logp_XV) + kl_to_m(logq_XV)) / (2 * math.log(2))


@dataclass(frozen=True)
class PairCausal:
    """Causal universality of one pair of runs: how alike the ablation effects of matched features are."""

    stats: dict[str, float]  # "causal.effect_corr_median_top", "causal.effect_corr_median_random", "causal.n_top"
    effect_corr_A: np.ndarray  # [F_A] effect correlation of each of A's top mutual matches with its partner (NaN elsewhere)
    random_corr: np.ndarray  # [n] the same for the random pairs


def causal_pairs(matching: Matching, top_n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(A, B) features of the ``top_n`` mutual matches with the highest activation correlation, and of
    ``top_n`` random pairs (A's and B's features that have partners, drawn independently, seeded)."""
    mutual_a, mutual_b = matching.mutual_pairs()
    order = np.argsort(-matching.best_b_corr[mutual_a], kind="stable")[:top_n]
    included_a = np.flatnonzero(matching.best_b != NO_PARTNER)
    included_b = np.flatnonzero(matching.best_a != NO_PARTNER)
    rng = np.random.default_rng(seed)
    n_random = top_n if included_a.size and included_b.size else 0
    return (mutual_a[order], mutual_b[order], rng.choice(included_a, n_random), rng.choice(included_b, n_random))


def causal_universality(a: Subject, b: Subject, matching: Matching, top_n: int, seed: int) -> PairCausal:
    """Median correlation of ablation effects over the top mutual matches, beside random pairs'."""
    top_a, top_b, random_a, random_b = causal_pairs(matching, top_n, seed)
    effects_a = {f: a.ablation(f) for f in dict.fromkeys([*top_a.tolist(), *random_a.tolist()])}
    effects_b = {f: b.ablation(f) for f in dict.fromkeys([*top_b.tolist(), *random_b.tolist()])}
    corr = lambda fa, fb: np.array([effect_correlation(effects_a[i], effects_b[j])  # noqa: E731
                                    for i, j in zip(fa.tolist(), fb.tolist())], np.float64)
    top_corr, random_corr = corr(top_a, top_b), corr(random_a, random_b)
    per_feature = np.full(len(matching.best_b), np.nan)
    per_feature[top_a] = top_corr
    stats = {"causal.effect_corr_median_top": _median(top_corr), "causal.effect_corr_median_random": _median(random_corr),
             "causal.n_top": int(top_a.size)}
    return PairCausal(stats, per_feature, random_corr)


def _median(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else math.nan
