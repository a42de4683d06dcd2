"""Similarity beyond single activations: logit weights of matched pairs, decoder vectors of two SAEs
of one model, and whole representations.

Feature-level: do matched features also push the same logits? Model-level: are the two
runs' representations the same up to a rotation (linear CKA, Kornblith et al. 2019) or up
to an invertible linear map of their principal subspaces (SVCCA, Raghu et al. 2017)?
"""

from __future__ import annotations

import numpy as np

from universality.measures.matching import NO_PARTNER, match

VARIANCE_KEPT = 0.99  # SVCCA: keep the top directions explaining this much variance
SHARED_COSINES = (0.7, 0.9)  # decoder cosine above which two SAEs' features count as shared (Paulo & Belrose 2025)


def logit_weight_similarity(
    logit_w_a: np.ndarray, logit_w_b: np.ndarray, pairs_a: np.ndarray, pairs_b: np.ndarray
) -> np.ndarray:
    """Pearson correlation of the logit weights [F, V] of each matched pair (``pairs_a[i]``, ``pairs_b[i]``).

    The paper shifts each feature's logit weights so their median is 0; Pearson correlation is
    invariant to that shift, so it is not applied here. A row with no variance gets 0.
    """
    a = np.asarray(logit_w_a, np.float64)[pairs_a]
    b = np.asarray(logit_w_b, np.float64)[pairs_b]
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("pv,pv->p", a, b)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def decoder_cosines(W_dec_a_FD: np.ndarray, W_dec_b_FD: np.ndarray) -> np.ndarray:
    """[F_A, F_B] cosine similarity of every pair of decoder vectors (rows)."""
    a = np.asarray(W_dec_a_FD, np.float64)
    b = np.asarray(W_dec_b_FD, np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return a @ b.T


def decoder_statistics(W_dec_a_FD: np.ndarray, W_dec_b_FD: np.ndarray, included_a: np.ndarray,
                       included_b: np.ndarray) -> dict[str, float]:
    """SAE-seed stability as Paulo & Belrose (2025) measure it: A's and B's decoder vectors matched
    one-to-one (Hungarian, by cosine), and the fraction of A's features whose match is above each of
    ``SHARED_COSINES``. Meaningful only for two SAEs of the same model (one neuron space); features
    left out of the activation statistics (dead, too rare) are left out here too."""
    matching = match(decoder_cosines(W_dec_a_FD, W_dec_b_FD), included_a, included_b)
    rows = np.flatnonzero(included_a)
    matched = np.where(matching.hungarian_b[rows] != NO_PARTNER, matching.hungarian_corr[rows], 0.0)
    best = np.nan_to_num(matching.best_b_corr[rows], nan=0.0)
    empty = rows.size == 0
    return {
        "cos_hungarian_mean": float("nan") if empty else float(matched.mean()),
        "cos_hungarian_median": float("nan") if empty else float(np.median(matched)),
        "cos_max_median": float("nan") if empty else float(np.median(best)),
        **{f"frac_shared_above_{t:g}": float("nan") if empty else float((matched > t).mean()) for t in SHARED_COSINES},
    }


def _centred(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x - x.mean(axis=0)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same N inputs, x [N, D1] and y [N, D2].

    HSIC of the centred linear Gram matrices, in the equivalent feature-space form
    ||YᵀX||²_F / (||XᵀX||_F ||YᵀY||_F), which costs O(N·D²) instead of O(N²).
    Invariant to orthogonal transforms and isotropic scaling of either side.
    """
    x, y = _centred(x), _centred(y)
    denominator = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(np.linalg.norm(y.T @ x) ** 2 / denominator) if denominator > 0 else 0.0


def _top_directions(x: np.ndarray, variance: float, top_k: int | None) -> np.ndarray:
    """Orthonormal basis [N, k] of the top principal directions of centred x (the "SV" of SVCCA)."""
    u, s, _ = np.linalg.svd(_centred(x), full_matrices=False)
    if top_k is None:
        explained = np.cumsum(s**2) / np.sum(s**2)
        top_k = int(np.searchsorted(explained, variance)) + 1
    return u[:, : min(top_k, int(np.sum(s > s[0] * 1e-10)))]


def svcca(x: np.ndarray, y: np.ndarray, variance: float = VARIANCE_KEPT, top_k: int | None = None) -> float:
    """Mean canonical correlation between the top principal subspaces of x [N, D1] and y [N, D2].

    Each side keeps its top directions explaining ``variance`` of its variance (or exactly
    ``top_k``). The canonical correlations of two orthonormal bases are the singular values
    of their product. Meaningful only for N well above the kept dimensions.
    """
    u_x, u_y = _top_directions(x, variance, top_k), _top_directions(y, variance, top_k)
    canonical = np.linalg.svd(u_x.T @ u_y, compute_uv=False)
    return float(np.clip(canonical, 0.0, 1.0).mean())
