"""Per-latent diagnostics of a crosscoder: decoder norms per model, a class per latent, and Latent Scaling.

Pure: tensors or arrays in, numbers out; nothing here runs a crosscoder (``sae.crosscoder.evaluate_crosscoder``
streams one over activations and feeds ``LatentScalingSums``). Shapes: N tokens, M models, D dims, F latents.

Classes (one per latent). Model m *has* latent i when its decoder norm is at least ``PRESENCE_RATIO`` of the
latent's largest: ||d_i^m|| >= 0.2 · max_m' ||d_i^m'||. The 0.2 is Minder et al.'s cut for a model-only latent
(relative norm difference < 0.1 ⇔ the weaker norm below 0.2 of the stronger). A latent that never fired on
the evaluation tokens is "dead"; otherwise it is "shared" (every model has it), "shared-kofM" (k of the M,
1 < k < M) or "exclusive-m" (model m alone).

Latent Scaling (Minder et al. 2025). For latent i and model m, the closed-form least-squares scale of the
latent's contribution f_i d_i^m fitted to a target y^m over the tokens, β = Σ_n f_ni <d_i^m, y_n^m> / (||d_i^m||²
Σ_n f_ni²), for two targets that both leave latent i's own contribution out (as Minder et al.'s code does):
model m's reconstruction by the *other* latents, Σ_{j≠i} f_j d_j^m (β_recon: they carry latent i's signal,
"latent decoupling"), and what that reconstruction misses, x^m − b_dec^m − Σ_{j≠i} f_j d_j^m (β_error: the
signal is in the error, "complete shrinkage"; ≈ 1 in a model that uses the latent fully, ≈ 0 in one without
its signal). The two add up to β of x^m − b_dec^m. Each model's own decoder vector d_i^m is used: seeds share no
basis, so the owner's vector means nothing in another model's space; for a latent shrunk in m the direction of
d_i^m still follows the reconstruction gradient f_i · error^m. (So β_recon sees a decoupled twin latent only
where d_i^m points along it; twins are better found by activation correlation.) ``fitted_norm`` turns β into
decoder-norm units, β ||d_i^m||, which does not blow up as ||d_i^m|| → 0.

The flag. An exclusive latent of model a is "explained elsewhere" when for some other model m the fitted norm
(β_recon^m + β_error^m) ||d_i^m|| — the least-squares norm of latent i along its direction in m's activations —
is at least PRESENCE_RATIO of ||d_i^a||: refitted to m's activations, the decoder would make m have the latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

PRESENCE_RATIO = 0.2  # a model has a latent when its decoder norm is >= 0.2 of the latent's largest


def norm_shares(norms_FM: np.ndarray) -> np.ndarray:
    """Each model's share of a latent's summed decoder norms, ||d_i^m|| / Σ_m' ||d_i^m'|| [F, M]
    (Lindsey's relative norm for two models; NaN for an all-zero decoder)."""
    norms_FM = np.asarray(norms_FM, dtype=np.float64)
    total_F1 = norms_FM.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total_F1 > 0, norms_FM / total_F1, np.nan)


def presence(norms_FM: np.ndarray, ratio: float = PRESENCE_RATIO) -> np.ndarray:
    """Whether model m has latent i [F, M]: ||d_i^m|| >= ratio · max_m' ||d_i^m'|| (and that max is > 0)."""
    norms_FM = np.asarray(norms_FM, dtype=np.float64)
    largest_F1 = norms_FM.max(axis=1, keepdims=True)
    return (norms_FM >= ratio * largest_F1) & (largest_F1 > 0)


def classify_latents(norms_FM: np.ndarray, density_F: np.ndarray, ratio: float = PRESENCE_RATIO) -> np.ndarray:
    """A class per latent [F] (strings): "dead", "shared", "shared-kofM" or "exclusive-m" (see the module doc)."""
    present_FM = presence(norms_FM, ratio)
    n_models = present_FM.shape[1]
    n_present_F = present_FM.sum(axis=1)
    owner_F = present_FM.argmax(axis=1)
    labels = [
        "dead" if not density > 0 or k == 0 else "shared" if k == n_models
        else f"exclusive-{owner}" if k == 1 else f"shared-{k}of{n_models}"
        for density, k, owner in zip(np.asarray(density_F), n_present_F, owner_F)
    ]
    return np.array(labels, dtype=object)


def class_counts(classes_F: np.ndarray) -> dict[str, int]:
    """How many latents each class has."""
    names, counts = np.unique(np.asarray(classes_F, dtype=str), return_counts=True)
    return {str(name): int(count) for name, count in zip(names, counts)}


@dataclass
class LatentScalingSums:
    """Streaming sums for Latent Scaling, in float64: Σ_n f_ni <d_i^m, y_n^m> for both targets [F, M], and
    Σ_n f_ni² [F]. Feed batches with ``update``; read β with ``betas``."""

    recon_FM: Tensor
    error_FM: Tensor
    f_sq_F: Tensor

    @classmethod
    def new(cls, n_latents: int, n_models: int, device: str | torch.device = "cpu") -> "LatentScalingSums":
        zeros = torch.zeros(n_latents, n_models, dtype=torch.float64, device=device)
        return cls(zeros, zeros.clone(), torch.zeros(n_latents, dtype=torch.float64, device=device))

    @torch.no_grad()
    def update(self, f_NF: Tensor, directions_NMD: Tensor, error_NMD: Tensor, W_dec_FMD: Tensor) -> None:
        """Add a batch: latent activations, each model's reconstruction without its decoder bias (Σ_i f_i d_i^m,
        every latent included: ``betas`` takes each latent's own part out), its error x^m − x̂^m, and the decoder."""
        f64 = f_NF.double()
        W = W_dec_FMD.double()
        self.recon_FM += torch.einsum("nf,nmd,fmd->fm", f64, directions_NMD.double(), W)
        self.error_FM += torch.einsum("nf,nmd,fmd->fm", f64, error_NMD.double(), W)
        self.f_sq_F += f64.pow(2).sum(dim=0)

    def betas(self, W_dec_FMD: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(β_recon, β_error) [F, M], both targets without latent i's own contribution f_i d_i^m, whose β is
        exactly 1 (Σ f_i² ||d_i||² / Σ f_i² ||d_i||²): β_recon is the full reconstruction's β minus 1, β_error
        the reconstruction error's plus 1. NaN where the latent never fired or its decoder in m is zero."""
        denom_FM = self.f_sq_F[:, None] * W_dec_FMD.double().pow(2).sum(dim=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            denom = denom_FM.cpu().numpy()
            ok = denom > 0
            beta_recon = np.where(ok, self.recon_FM.cpu().numpy() / np.where(ok, denom, 1) - 1, np.nan)
            beta_error = np.where(ok, self.error_FM.cpu().numpy() / np.where(ok, denom, 1) + 1, np.nan)
        return beta_recon, beta_error


def fitted_norm(beta_FM: np.ndarray, norms_FM: np.ndarray) -> np.ndarray:
    """β ||d_i^m||: a target's fitted amount of latent i along its direction in m, in decoder-norm units (0 where β is NaN)."""
    return np.nan_to_num(np.asarray(beta_FM) * np.asarray(norms_FM), nan=0.0)


def explained_elsewhere(
    norms_FM: np.ndarray, beta_recon_FM: np.ndarray, beta_error_FM: np.ndarray, classes_F: np.ndarray,
    ratio: float = PRESENCE_RATIO,
) -> tuple[np.ndarray, np.ndarray]:
    """(flag [F] bool, ν [F]): for an exclusive latent of model a, ν = max over the other models m of
    (β_recon^m + β_error^m) ||d_i^m|| / ||d_i^a||, and the flag ν >= ``ratio`` (see the module doc).
    Non-exclusive latents get ν = NaN and no flag."""
    norms_FM = np.asarray(norms_FM, dtype=np.float64)
    held_FM = fitted_norm(beta_recon_FM, norms_FM) + fitted_norm(beta_error_FM, norms_FM)
    owner_F = norms_FM.argmax(axis=1)
    rows_F = np.arange(len(norms_FM))
    exclusive_F = np.char.startswith(np.asarray(classes_F, dtype=str), "exclusive-")
    others_FM = np.where(np.arange(norms_FM.shape[1]) == owner_F[:, None], -np.inf, held_FM)
    with np.errstate(invalid="ignore", divide="ignore"):
        nu_F = np.where(exclusive_F, others_FM.max(axis=1) / norms_FM[rows_F, owner_F], np.nan)
    return exclusive_F & (nu_F >= ratio), nu_F


def latent_table(
    norms_FM: np.ndarray, density_F: np.ndarray, beta_recon_FM: np.ndarray, beta_error_FM: np.ndarray,
    ratio: float = PRESENCE_RATIO,
) -> dict[str, np.ndarray]:
    """One row per latent, as columns: latent, norm_m, share_m, class, density, beta_recon_m, beta_error_m
    (m = 0 .. M-1), explained_ratio (ν) and explained_elsewhere."""
    norms_FM = np.asarray(norms_FM, dtype=np.float64)
    classes_F = classify_latents(norms_FM, density_F, ratio)
    flag_F, nu_F = explained_elsewhere(norms_FM, beta_recon_FM, beta_error_FM, classes_F, ratio)
    shares_FM = norm_shares(norms_FM)
    columns: dict[str, np.ndarray] = {"latent": np.arange(len(norms_FM))}
    for prefix, values_FM in (("norm", norms_FM), ("share", shares_FM)):
        columns |= {f"{prefix}_{m}": values_FM[:, m] for m in range(norms_FM.shape[1])}
    columns |= {"class": classes_F, "density": np.asarray(density_F, dtype=np.float64)}
    for prefix, values_FM in (("beta_recon", beta_recon_FM), ("beta_error", beta_error_FM)):
        columns |= {f"{prefix}_{m}": np.asarray(values_FM)[:, m] for m in range(norms_FM.shape[1])}
    return columns | {"explained_ratio": nu_F, "explained_elsewhere": flag_F}
