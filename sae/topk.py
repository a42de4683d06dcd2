"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations; AuxK revives dead latents."""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import SAE, SAELoss
from sae.sparse import Active, active_mse, active_pre_acts


class TopKSAE(SAE):
    arch = "topk"
    resamples_dead = False  # AuxK does this job

    def top_k(self, pre_BF: Tensor) -> tuple[Tensor, Tensor]:
        """(ReLU of the k largest pre-activations [B, k], their feature indices [B, k] in ascending order)."""
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=1, sorted=False)
        idx_BK, order_BK = idx_BK.sort(dim=1)
        return torch.relu(vals_BK.gather(1, order_BK)), idx_BK

    def activation(self, pre_BF: Tensor) -> Tensor:
        """ReLU of the k largest pre-activations of each input; every other feature is 0."""
        vals_BK, idx_BK = self.top_k(pre_BF)
        return torch.zeros_like(pre_BF).scatter_(1, idx_BK, vals_BK)

    def loss(self, x_BD: Tensor, dead_F: Tensor | None = None, tokens_B: Tensor | None = None) -> SAELoss:
        """``SAE.loss`` (the dense reference it is tested against), computed sparse (``sae.sparse``) when
        k latents of d_sae are few enough: only the k active latents are decoded, and only they get
        decoder, encoder and feature gradients."""
        if not self.takes_sparse_step(self.cfg.k / self.d_sae):
            return super().loss(x_BD, dead_F)
        pre_BF = self.pre_acts(x_BD)
        active = Active.at(self.top_k(pre_BF.detach())[1], self.d_sae)
        f_N = self._active_features(x_BD, pre_BF, active)
        mse, residual_BD = active_mse(f_N, active, self.W_dec, self.b_dec, x_BD)
        aux = self.aux_loss(x_BD, x_BD + residual_BD, pre_BF, dead_F)
        f_N = f_N.detach()
        return SAELoss(mse + aux, mse, f_N.sum() / len(x_BD), aux, active.fires(f_N))

    def aux_loss(self, x_BD: Tensor, x_hat_BD: Tensor, pre_BF: Tensor, dead_F: Tensor | None) -> Tensor:
        """AuxK: the top k_aux = d_in/2 dead latents (or all of them, when fewer are dead) reconstruct the
        residual error x − x̂.

        Measured as the MSE between that reconstruction (no decoder bias) and the detached error,
        times ``aux_k_coeff``; zero while no latent is dead. Sparse like the main loss while k_aux
        latents of d_sae are few enough, else dense (gradients through ``pre_BF``'s own graph)."""
        n_dead = 0 if dead_F is None else int(dead_F.sum())
        if n_dead == 0:
            return x_BD.new_zeros(())
        k_aux = min(self.d_in // 2, n_dead)
        idx_BK = pre_BF.detach().masked_fill(~dead_F, float("-inf")).topk(k_aux, dim=1, sorted=False).indices
        error_BD = (x_BD - x_hat_BD).detach()
        if self.takes_sparse_step(k_aux / self.d_sae):
            active = Active.at(idx_BK.sort(dim=1).values, self.d_sae)
            aux_mse, _ = active_mse(self._active_features(x_BD, pre_BF, active), active, self.W_dec, None, error_BD)
        else:
            f_aux_BF = torch.zeros_like(pre_BF).scatter_(1, idx_BK, torch.relu(pre_BF.gather(1, idx_BK)))
            aux_mse = (self.directions_sum(f_aux_BF) - error_BD).pow(2).mean()
        return self.cfg.aux_k_coeff * aux_mse

    def _active_features(self, x_BD: Tensor, pre_BF: Tensor, active: Active) -> Tensor:
        """ReLU of the pre-activations at the active pairs [N], with the sparse encoder backward."""
        return torch.relu(active_pre_acts(x_BD, self.W_enc, self.b_enc, self.b_dec, pre_BF, active))
