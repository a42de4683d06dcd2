"""Crosscoders: one dictionary over several models' activations at the same tokens (Lindsey et al. 2024).

Shapes: B batch, M models, D dims per model, F latents. Every latent has one encoder vector and one
decoder vector per model: f = σ(Σ_m (x^m − b_dec^m) W_enc^m + b_enc), x̂^m = f W_dec^m + b_dec^m.
A latent whose decoder has weight in every model is shared; one with weight in one model is exclusive to it.

Stored as an SAE on the concatenated input [B, M·D] (``W_enc`` [M·D, F], ``W_dec`` [F, M·D], ``b_dec``
[M·D]): the sum over models in the encoder is exactly the concatenation's matmul, so the SAE's encoder,
bf16 handling, resampling and trainer apply unchanged. ``W_dec_FMD`` views the decoder per model.

Decoder norms. The trainer keeps each latent's *concatenated* decoder row at unit norm (Σ_m ||d^m||² = 1),
not each model's part: per-model unit norms would make every latent's Σ_m ||d^m|| = M, so no latent could
become exclusive and Lindsey's penalty would be plain L1. Both losses here are invariant under f → c·f,
d → d / c (the L1 penalty is f Σ_m ||d^m||, BatchTopK ranks f Σ_m ||d^m||), so fixing that scale with the
row norm loses nothing, while the split of the norm between models stays free.

Models of different widths (``model_dims``, e.g. ``univ crosscoder`` over files of 512 and 2,048 dims) are read
zero-padded to the widest, D: each model's padded dims start with zero decoder and encoder weights and a zero
b_dec, and stay exactly zero in training (their inputs, reconstructions and so every gradient there are zero,
Adam moves nothing with a zero gradient, resampling copies zero-padded inputs), so norms, losses and Latent
Scaling are those of the unpadded models. Each model is normalized to E[||s_m x^m||²] = D, the same for all: its
reconstruction term is then its relative error, as an SAE's is, and decoder norms compare across models of any
width. The file holds each model's own ``W_dec_<m>`` [F, d_m].

Units. The parameters live in the space the trainer normalized each model to (E[||s_m x^m||²] = D, the
per-model input scale s_m as the SAE trainer computes it), so decoder norms compare across models whatever
each model's raw scale. ``fold_input_scale`` stores s_m in ``input_scale_M`` and the crosscoder then reads raw
activations and returns raw reconstructions; latent activations f are in the normalized units.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

from sae.base import SAE, SAELoss, batch_stats
from sae.crosscoder_latents import LatentScalingSums, class_counts, latent_table
from sae.topk import TopKSAE
from universality.core.config import SAEConfig
from universality.core.errors import DataError

THRESHOLD_DECAY = 0.99  # BatchTopK's inference threshold: exponential moving average over training batches


class Crosscoder(SAE):
    """What both variants share. A variant supplies its activation (``activation`` at inference,
    ``training_activation`` in the loss), its ``penalty`` or its ``aux_loss``. Inputs are [B, M, D]."""

    def __init__(self, d_in: int, cfg: SAEConfig, generator: torch.Generator | None = None, n_models: int = 2,
                 model_dims: Sequence[int] | None = None):
        super().__init__(n_models * d_in, cfg, generator)  # ``d_in`` of the SAE: the concatenated M·D dims
        self.n_models, self.d_model = n_models, d_in
        self.model_dims = tuple(model_dims) if model_dims is not None else (d_in,) * n_models  # each model's own width
        if len(self.model_dims) != n_models or not all(1 <= d <= d_in for d in self.model_dims):
            raise DataError(f"model widths {list(self.model_dims)} do not fit {n_models} models of at most {d_in} dims")
        self.register_buffer("input_scale_M", torch.ones(n_models))  # s_m: raw x^m · s_m is what the parameters see
        if min(self.model_dims) < d_in:
            self._zero_padding()

    def padding_mask(self) -> Tensor:
        """[M, D] bool: True at the dims a model does not have (its zero padding)."""
        return torch.arange(self.d_model)[None, :] >= torch.tensor(self.model_dims)[:, None]

    @torch.no_grad()
    def _zero_padding(self) -> None:
        """Zero the weights of every padded dim; each latent's decoder row stays unit-norm and the encoder its transpose."""
        self.W_dec_FMD[:, self.padding_mask()] = 0.0
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_enc.copy_(self.W_dec.T)

    def takes_sparse_step(self, density: float) -> bool:
        """Never: a crosscoder decodes densely (the sparse step of ``sae.sparse`` is written for [B, D] inputs)."""
        return False

    @property
    def W_dec_FMD(self) -> Tensor:
        """The decoder as one vector per latent and model (a view of ``W_dec``)."""
        return self.W_dec.view(self.d_sae, self.n_models, self.d_model)

    def decoder_norms(self) -> Tensor:
        """||d_i^m|| [F, M], in normalized units: the per-model weight of every latent."""
        return self.W_dec_FMD.norm(dim=2)

    def pre_acts(self, x_BMD: Tensor) -> Tensor:
        """Σ_m (s_m x^m − b_dec^m) W_enc^m + b_enc: the SAE's encoder on the normalized, concatenated input."""
        return super().pre_acts((x_BMD * self.input_scale_M[:, None]).flatten(1))

    def decode(self, f_BF: Tensor) -> Tensor:
        """x̂^m = (f W_dec^m + b_dec^m) / s_m, [B, M, D] in raw units."""
        return super().decode(f_BF).view(-1, self.n_models, self.d_model) / self.input_scale_M[:, None]

    def weighted(self, f_BF: Tensor) -> Tensor:
        """f_i Σ_m ||d_i^m||: each activation in reconstruction units (what L1 penalises and BatchTopK ranks)."""
        return f_BF * self.decoder_norms().sum(dim=1)

    def reconstruction_error(self, x_BMD: Tensor, x_hat_BMD: Tensor) -> Tensor:
        """Σ_m of each model's squared error (mean over its D dims), per input [B]: Lindsey's Σ_m ||x^m − x̂^m||²
        up to 1/D, so that λ (and k) weigh a latent against each model's reconstruction as an SAE's do."""
        return (x_hat_BMD - x_BMD).pow(2).mean(dim=2).sum(dim=1)

    def per_input_loss(self, x_BMD: Tensor, tokens_B: Tensor | None = None) -> Tensor:
        """Each input's reconstruction error + penalty [B]: what resampling weights inputs by."""
        out = self(x_BMD)
        return self.reconstruction_error(x_BMD, out.x_hat) + self.penalty(out.f)

    def training_activation(self, pre_BF: Tensor) -> Tensor:
        """The activation the training loss uses; ``activation`` (inference) by default."""
        return self.activation(pre_BF)

    def loss(self, x_BMD: Tensor, dead_F: Tensor | None = None, tokens_B: Tensor | None = None) -> SAELoss:
        """Σ_m each model's MSE + the variant's penalty + its auxiliary loss. ``mse`` is the mean over all
        M·D elements (comparable with an SAE's); ``l1`` is the weighted Σ_i f_i Σ_m ||d_i^m|| (Lindsey's)."""
        pre_BF = self.pre_acts(x_BMD)
        f_BF = self.training_activation(pre_BF)
        x_hat_BMD = self.decode(f_BF)
        recon = self.reconstruction_error(x_BMD, x_hat_BMD).mean()
        aux = self.aux_loss(x_BMD, x_hat_BMD, pre_BF, dead_F)
        _, fires_F = batch_stats(f_BF.detach())
        l1 = self.weighted(f_BF.detach()).sum(dim=1, dtype=torch.float32).mean().detach()
        return SAELoss(recon + self.penalty(f_BF).mean() + aux, recon.detach() / self.n_models, l1, aux, fires_F)

    @torch.no_grad()
    def fold_input_scale(self, scale_M1: Tensor) -> None:  # type: ignore[override]
        """Make a crosscoder trained on s_m x^m read raw x^m: s_m is applied inside (parameters unchanged)."""
        self.input_scale_M.copy_(torch.as_tensor(scale_M1).flatten())


class L1Crosscoder(Crosscoder):
    """Lindsey et al.'s crosscoder: ReLU latents, penalty λ Σ_i f_i Σ_m ||d_i^m||. Its gradient on the decoder
    norms is what lets a latent concentrate its norm in one model; dead latents are resampled."""

    arch = "crosscoder-l1"

    def penalty(self, f_BF: Tensor) -> Tensor:
        return self.cfg.l1_coeff * self.weighted(f_BF).sum(dim=1)


class BatchTopKCrosscoder(Crosscoder):
    """Minder et al.'s crosscoder: in training the k · B largest weighted activations f_i Σ_m ||d_i^m|| of
    the whole batch are kept (so L0 is k on average, more on some tokens, fewer on others), and AuxK revives
    dead latents. At inference a token's latents are kept where their weighted activation exceeds
    ``threshold``, the moving average of the batches' smallest kept one, so a token's code does not depend
    on its batch (an untrained crosscoder's threshold, -1, keeps every positive latent)."""

    arch = "crosscoder-batchtopk"
    resamples_dead = False  # AuxK does this job

    def __init__(self, d_in: int, cfg: SAEConfig, generator: torch.Generator | None = None, n_models: int = 2,
                 model_dims: Sequence[int] | None = None):
        super().__init__(d_in, cfg, generator, n_models, model_dims)
        self.register_buffer("threshold", torch.tensor(-1.0))

    def activation(self, pre_BF: Tensor) -> Tensor:
        f_BF = torch.relu(pre_BF)
        return f_BF * (self.weighted(f_BF) > self.threshold)

    def training_activation(self, pre_BF: Tensor) -> Tensor:
        """Batch top-k: ReLU activations at the k · B largest weighted ones of the batch, 0 elsewhere;
        updates the inference threshold."""
        f_BF = torch.relu(pre_BF)
        weighted_BF = self.weighted(f_BF).detach()
        kept = weighted_BF.flatten().topk(self.cfg.k * len(pre_BF), sorted=False)
        mask_BF = torch.zeros_like(weighted_BF, dtype=torch.bool).flatten().index_fill_(0, kept.indices, True)
        mask_BF = mask_BF.view_as(f_BF) & (f_BF > 0)
        self._update_threshold(kept.values[kept.values > 0])
        return f_BF * mask_BF

    @torch.no_grad()
    def _update_threshold(self, kept_values: Tensor) -> None:
        if len(kept_values) == 0:
            return
        smallest = kept_values.min().to(self.threshold.dtype)
        self.threshold.copy_(smallest if self.threshold < 0 else torch.lerp(self.threshold, smallest, 1 - THRESHOLD_DECAY))

    def aux_loss(self, x_BMD: Tensor, x_hat_BMD: Tensor, pre_BF: Tensor, dead_F: Tensor | None) -> Tensor:
        """TopK's AuxK on the concatenated, normalized error (k_aux = M·D/2, TopK's d_in/2 of that input), times M:
        like the reconstruction term, a sum over models of each one's mean squared error."""
        scale_M1 = self.input_scale_M[:, None]
        x_flat, x_hat_flat = (x_BMD * scale_M1).flatten(1), (x_hat_BMD * scale_M1).flatten(1)
        return self.n_models * TopKSAE.aux_loss(self, x_flat, x_hat_flat, pre_BF, dead_F)


def crosscoder_tensors(crosscoder: Crosscoder) -> dict[str, Tensor]:
    """The weights per model, for a safetensors file: W_enc [M, D, F], b_enc [F], W_dec [M, F, D], b_dec [M, D]
    (normalized units), input_scale [M] (raw x^m · input_scale[m] is what they read) and, for BatchTopK, threshold.
    Models of different widths d_m get one W_enc_<m> [d_m, F], W_dec_<m> [F, d_m] and b_dec_<m> [d_m] each instead."""
    M, D, F = crosscoder.n_models, crosscoder.d_model, crosscoder.d_sae
    W_enc_MDF, W_dec_MFD, b_dec_MD = crosscoder.W_enc.view(M, D, F), crosscoder.W_dec_FMD.transpose(0, 1), crosscoder.b_dec.view(M, D)
    if set(crosscoder.model_dims) == {D}:
        tensors = {"W_enc": W_enc_MDF, "W_dec": W_dec_MFD, "b_dec": b_dec_MD}
    else:
        tensors = {}
        for m, d in enumerate(crosscoder.model_dims):
            tensors |= {f"W_enc_{m}": W_enc_MDF[m, :d], f"W_dec_{m}": W_dec_MFD[m, :, :d], f"b_dec_{m}": b_dec_MD[m, :d]}
    tensors |= {"b_enc": crosscoder.b_enc, "input_scale": crosscoder.input_scale_M}
    tensors |= {"threshold": crosscoder.threshold} if isinstance(crosscoder, BatchTopKCrosscoder) else {}
    return {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}


def _per_model(tensors: dict[str, Tensor], name: str) -> list[Tensor]:
    """Model m's ``name`` tensor, from the stacked [M, ...] layout or the per-model ``name_<m>`` one."""
    if name in tensors:
        return list(tensors[name])
    return [tensors[f"{name}_{m}"] for m in range(len(tensors["input_scale"]))]


@torch.no_grad()
def load_crosscoder(tensors: dict[str, Tensor], cfg: SAEConfig) -> Crosscoder:
    """The crosscoder ``crosscoder_tensors`` wrote (``cfg``: the SAEConfig it was trained with), in either layout."""
    from sae.registry import build_sae  # the registry imports this module

    W_dec_m = _per_model(tensors, "W_dec")
    dims = [W.shape[1] for W in W_dec_m]
    M, D, F = len(dims), max(dims), len(tensors["b_enc"])
    crosscoder = build_sae(cfg, D, n_models=M, model_dims=dims)
    for m, (W_enc, W_dec, b_dec) in enumerate(zip(_per_model(tensors, "W_enc"), W_dec_m, _per_model(tensors, "b_dec"))):
        crosscoder.W_enc.view(M, D, F)[m, : dims[m]] = W_enc
        crosscoder.W_dec_FMD[:, m, : dims[m]] = W_dec
        crosscoder.b_dec.view(M, D)[m, : dims[m]] = b_dec
    crosscoder.b_enc.copy_(tensors["b_enc"])
    crosscoder.input_scale_M.copy_(tensors["input_scale"])
    if isinstance(crosscoder, BatchTopKCrosscoder):
        crosscoder.threshold.copy_(tensors["threshold"])
    return crosscoder


@torch.no_grad()
def evaluate_crosscoder(crosscoder: Crosscoder, activation_batches: Iterable[Tensor]) -> dict[str, Any]:
    """Metrics over held-out batches [B, M, D] of raw activations at the same tokens: fvu per model (its
    squared error / its total variance), l0, the dead fraction (never fired), class counts, and the per-latent
    table of ``crosscoder_latents.latent_table`` (norms, shares, class, density, Latent Scaling). Latent
    Scaling is computed in the normalized units the decoder lives in."""
    device, n_models, n_latents = crosscoder.W_dec.device, crosscoder.n_models, crosscoder.d_sae
    W_dec_FMD = crosscoder.W_dec_FMD.detach()
    scaling = LatentScalingSums.new(n_latents, n_models, device)
    fired_F = torch.zeros(n_latents, dtype=torch.float64, device=device)
    sq_err_M = torch.zeros(n_models, dtype=torch.float64, device=device)
    sum_MD, sum_sq_MD = (torch.zeros(n_models, crosscoder.d_model, dtype=torch.float64, device=device) for _ in range(2))
    n = 0
    for batch in activation_batches:
        x_BMD = batch.to(device, torch.float32)
        f_BF = crosscoder.encode(x_BMD)
        x_norm_BMD = x_BMD * crosscoder.input_scale_M[:, None]  # the decoder's units (FVU is the same in raw ones)
        directions_BMD = crosscoder.directions_sum(f_BF).view_as(x_BMD)
        error_BMD = x_norm_BMD - directions_BMD - crosscoder.b_dec.view(n_models, -1)
        scaling.update(f_BF, directions_BMD, error_BMD, W_dec_FMD)
        x64 = x_norm_BMD.double()
        sq_err_M += error_BMD.double().pow(2).sum(dim=(0, 2))
        sum_MD += x64.sum(dim=0)
        sum_sq_MD += x64.pow(2).sum(dim=0)
        fired_F += (f_BF > 0).sum(dim=0)
        n += len(x_BMD)
    if n == 0:
        raise DataError("no held-out activations to evaluate the crosscoder on")
    total_var_M = (sum_sq_MD - sum_MD.pow(2) / n).sum(dim=1)
    density_F = (fired_F / n).cpu().numpy()
    beta_recon_FM, beta_error_FM = scaling.betas(W_dec_FMD)
    table = latent_table(crosscoder.decoder_norms().cpu().numpy(), density_F, beta_recon_FM, beta_error_FM)
    return {"tokens": n, "fvu": (sq_err_M / total_var_M).tolist(), "l0": float(fired_F.sum()) / n,
            "dead_fraction": float((density_F == 0).mean()), "class_counts": class_counts(table["class"]),
            "latents": table}
