"""How good an SAE is: reconstruction and sparsity on held-out activations, and loss recovered
when its reconstruction is spliced into the model."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

from models.transformer import OneLayerTransformer, next_token_loss
from sae.base import SAE
from universality.measures.comparison import compare
from universality.core.config import CompareConfig
from universality.measures.correlation import to_csr
from universality.core.errors import DataError
from universality.measures.similarity import decoder_statistics
from universality.measures.statistics import ULTRALOW_DENSITY  # the paper's cut: rarer than 1 in a million

DENSE_DENSITY = 0.1  # fires on more than 10% of tokens: λ is probably too low
Recorded = Iterable[sp.csr_matrix] | None  # per batch, the SAE's features as the activations stage stored them


Tokens = Iterable[Tensor] | None  # per batch, the current token id of each row (for an SAE that reads them)


def with_recorded(batches: Iterable[Tensor], recorded: Recorded, tokens: Tokens = None
                  ) -> Iterator[tuple[Tensor, sp.csr_matrix | None, Tensor | None]]:
    """Each batch with its recorded features (None: none recorded, the SAE runs on the batch) and its token ids
    (None: none given)."""
    given = [stream for stream in (recorded, tokens) if stream is not None]
    for batch, *rest in zip(batches, *given, strict=True):
        extra = iter(rest)
        yield batch, next(extra) if recorded is not None else None, next(extra) if tokens is not None else None


def reconstruct(sae: SAE, x_BD: Tensor, recorded: sp.csr_matrix | None, tokens_B: Tensor | None = None
                ) -> tuple[Tensor, Tensor, float]:
    """(x̂ [B, D] in x's dtype, how many inputs each feature fires on [F] (float64), the sum of f) of a batch:
    the SAE run on it, or decoded from its ``recorded`` features over the active latents only (f W_dec + the
    decoder bias, the product in float64): the recorded features are the SAE's encoding of the same inputs."""
    if recorded is None:
        out = sae(x_BD, tokens_B)
        return out.x_hat, (out.f > 0).sum(dim=0).double(), float(out.f.double().sum())
    bias = sae.decoder_bias(tokens_B).detach().to(x_BD)
    x_hat = torch.from_numpy(recorded @ sae.W_dec.detach().double().cpu().numpy()).to(x_BD) + bias
    fired = np.bincount(recorded.indices[recorded.data > 0], minlength=sae.d_sae)
    return x_hat, torch.from_numpy(fired).to(x_BD.device, torch.float64), float(recorded.data.sum())


class Reconstruction:
    """Running sums of an SAE's inputs, reconstructions and firings over batches: what ``evaluate_sae`` reports
    (squared error and per-dimension moments in float64)."""

    def __init__(self, sae: SAE):
        self.d_in = sae.d_in
        self.n, self.sq_err, self.l0, self.l1 = 0, 0.0, 0.0, 0.0
        self.fired_F = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_dec.device)
        self.sum_D = self.sum_sq_D = 0.0

    def add(self, x_BD: Tensor, x_hat_BD: Tensor, fired_F: Tensor, l1: float) -> None:
        """One batch: inputs, reconstructions, how many inputs each feature fired on, the sum of f."""
        self.n += len(x_BD)
        self.sq_err += float((x_hat_BD - x_BD).double().pow(2).sum())
        self.l0 += float(fired_F.sum())
        self.l1 += l1
        self.fired_F += fired_F
        x64_BD = x_BD.double()
        self.sum_D = self.sum_D + x64_BD.sum(0)
        self.sum_sq_D = self.sum_sq_D + x64_BD.pow(2).sum(0)

    def metrics(self) -> dict[str, Any]:
        """mse (mean over elements), fvu (squared error / total variance), l0 and l1 per token, the fractions of
        dead (never fired) and dense features, the ultralow-density count, each feature's firing frequency
        ("densities") and a histogram of log10 density over the features that fired."""
        n = self.n
        if n == 0:
            raise DataError("no held-out activations to evaluate the SAE on")
        total_var = float((self.sum_sq_D - self.sum_D.pow(2) / n).sum())
        densities = (self.fired_F / n).cpu().numpy()
        log_d = np.log10(densities[densities > 0])
        counts, edges = np.histogram(log_d, bins=20, range=(min(-8.0, float(log_d.min(initial=0))), 0.0))
        return {
            "tokens": n,
            "mse": self.sq_err / (n * self.d_in),
            "fvu": self.sq_err / total_var if total_var > 0 else float("nan"),
            "l0": self.l0 / n,
            "l1": self.l1 / n,
            "dead_fraction": float((densities == 0).mean()),
            "dense_fraction": float((densities > DENSE_DENSITY).mean()),
            "ultralow_count": int(((densities > 0) & (densities < ULTRALOW_DENSITY)).sum()),
            "densities": densities,
            "log10_density_hist": {"edges": edges.tolist(), "counts": counts.tolist()},
        }


@torch.no_grad()
def evaluate_sae(sae: SAE, activation_batches: Iterable[Tensor], recorded: Recorded = None,
                 tokens: Tokens = None) -> dict[str, Any]:
    """``Reconstruction.metrics`` over held-out activation batches [B, D] (raw scale, as the saved SAE expects);
    ``recorded``: the SAE's features of the same batches, when stored already (then the SAE is not run again);
    ``tokens``: the batches' token ids (an SAE that reads them needs them)."""
    sums = Reconstruction(sae)
    for batch, features, tokens_B in with_recorded(activation_batches, recorded, tokens):
        x_BD = batch.to(sae.W_dec.device, torch.float32)
        sums.add(x_BD, *reconstruct(sae, x_BD, features, tokens_B))
    return sums.metrics()


@torch.no_grad()
def loss_recovered(
    model: OneLayerTransformer, sae: SAE, token_batches: Iterable[Tensor], device: str | torch.device,
    first_position: int = 0, recorded: Recorded = None, matmul_dtype: torch.dtype | None = None,
    reconstruction: Reconstruction | None = None,
) -> dict[str, float]:
    """Cross-entropy with clean MLP neurons, with the SAE's reconstruction spliced in, and with the
    MLP zero-ablated; loss recovered = 1 − (CE_sae − CE_clean) / (CE_zero − CE_clean). Predictions
    made before ``first_position`` are left out (in a one-layer model the MLP output at a position
    reaches only that position's logits, so splicing there changes nothing else).

    One pass per batch, not three: the model has one layer and its MLP's output is linear in the neurons
    (n W_outᵀ + b_out), so the zero-ablated residual stream (the MLP's output at zero neurons: b_out) and the
    clean neurons give all three residuals, ablated + n W_outᵀ for n = the neurons, their reconstruction, 0,
    and only the unembedding runs three times (``next_token_loss``: the scored positions, in cache-sized chunks).
    ``recorded``: per batch, the SAE's features at positions ``first_position``.. of each context (row-major),
    when stored already (then the SAE is not run again);
    ``matmul_dtype``: the unembedding's matmul dtype (``next_token_loss``; in bf16, loss recovered moves by
    about 1e-5 on quick's SAEs); ``reconstruction``: also add each batch's scored neurons and their reconstruction
    to it (``evaluate_sae``'s metrics in the same pass, without reading the neurons back)."""
    W_out_DM = model.mlp.W_out.weight
    totals = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero_ablation": 0.0}
    n_tokens = 0
    for batch, features, _ in with_recorded(token_batches, recorded):
        tokens_BT = torch.as_tensor(batch, dtype=torch.long).to(device)
        weight = tokens_BT.shape[0] * (tokens_BT.shape[1] - 1 - first_position)  # predicted positions in this batch
        ablated_BTD, acts_BTM = model.ablated_residual(tokens_BT)
        scored_BSM = acts_BTM[:, first_position:]
        x_BM = scored_BSM.reshape(-1, acts_BTM.shape[-1])
        x_hat_BM, fired_F, l1 = reconstruct(sae, x_BM, features, tokens_BT[:, first_position:].reshape(-1))
        if reconstruction is not None:
            reconstruction.add(x_BM, x_hat_BM, fired_F, l1)
        x_hat_BTM = acts_BTM.clone()  # earlier positions predict nothing scored: left clean
        x_hat_BTM[:, first_position:] = x_hat_BM.reshape(scored_BSM.shape)
        residuals = {"ce_clean": ablated_BTD + acts_BTM @ W_out_DM.T, "ce_sae": ablated_BTD + x_hat_BTM @ W_out_DM.T,
                     "ce_zero_ablation": ablated_BTD}
        for key, resid_BTD in residuals.items():
            totals[key] += weight * next_token_loss(model, resid_BTD, tokens_BT, first_position,
                                                        matmul_dtype=matmul_dtype)
        n_tokens += weight
    if n_tokens == 0:
        raise DataError("no token batches to measure loss recovered on")
    ce = {key: total / n_tokens for key, total in totals.items()}
    gap = ce["ce_zero_ablation"] - ce["ce_clean"]
    ce["loss_recovered"] = 1 - (ce["ce_sae"] - ce["ce_clean"]) / gap if gap != 0 else float("nan")
    return ce


@torch.no_grad()
def convergence(final: SAE, earlier: SAE, activation_batches: Iterable[Tensor], cfg: CompareConfig,
                recorded: Recorded = None, tokens: Tokens = None) -> dict[str, float]:
    """How much the dictionary still moved late in training: each feature of the ``final`` SAE matched to
    the ``earlier`` one (e.g. at 75% of training) by activation correlation on held-out activations,
    and by decoder cosine (one-to-one). 1 for an SAE that stopped moving; low for unrelated SAEs.
    ``recorded``: the final SAE's features of the same batches, when stored already (not encoded again)."""
    def chunks():
        for batch, features, tokens_B in with_recorded(activation_batches, recorded, tokens):
            x_BD = batch.to(final.W_dec.device, torch.float32)
            final_features = to_csr(final.encode(x_BD, tokens_B).cpu()) if features is None else features
            yield final_features, to_csr(earlier.encode(x_BD, tokens_B).cpu())

    result = compare(chunks(), cfg)
    decoder = decoder_statistics(final.W_dec.detach().cpu().numpy(), earlier.W_dec.detach().cpu().numpy(),
                                 result.census_a.included, result.census_b.included)
    return {"convergence_corr_median": result.stats["max_corr_median"],
            "convergence_corr_mean": result.stats["max_corr_mean"],
            "convergence_decoder_cos_median": decoder["cos_hungarian_median"]}
