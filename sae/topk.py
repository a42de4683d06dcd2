"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations; AuxK revives dead latents."""

from __future__ import annotations

import torch
from torch import Tensor

from sae.base import SAE, SAEOutput


class TopKSAE(SAE):
    arch = "topk"
    resamples_dead = False  # AuxK does this job

    def activation(self, pre_BF: Tensor) -> Tensor:
        """ReLU of the k largest pre-activations of each input; every other feature is 0."""
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(1, idx_BK, torch.relu(vals_BK))

    def aux_loss(self, x_BD: Tensor, out: SAEOutput, dead_F: Tensor | None) -> Tensor:
        """AuxK: the top k_aux = d_in/2 dead latents reconstruct the residual error x − x̂.

        Measured as the MSE between that reconstruction (no decoder bias) and the detached error,
        times ``aux_k_coeff``; zero while no latent is dead."""
        if dead_F is None or not bool(dead_F.any()):
            return x_BD.new_zeros(())
        k_aux = min(self.d_in // 2, self.d_sae)
        dead_pre_BF = out.pre_acts.masked_fill(~dead_F, float("-inf"))
        vals_BK, idx_BK = dead_pre_BF.topk(k_aux, dim=1, sorted=False)
        f_aux_BF = torch.zeros_like(dead_pre_BF).scatter_(1, idx_BK, torch.relu(vals_BK))
        error_BD = (x_BD - out.x_hat).detach()
        return self.cfg.aux_k_coeff * (f_aux_BF @ self.W_dec - error_BD).pow(2).mean()
