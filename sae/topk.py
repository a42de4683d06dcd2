"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations; AuxK revives dead latents."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from sae.base import SAE, SAELoss, stats_dtype

# The CSR matrices below are built correct by construction; torch warns once per process that CSR is "beta".
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)


class TopKSAE(SAE):
    arch = "topk"
    resamples_dead = False  # AuxK does this job

    def top_k(self, pre_BF: Tensor) -> tuple[Tensor, Tensor]:
        """(ReLU of the k largest pre-activations [B, k], their feature indices [B, k] in ascending order:
        the column order a CSR matrix of them needs)."""
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=1, sorted=False)
        idx_BK, order_BK = idx_BK.sort(dim=1)
        return torch.relu(vals_BK.gather(1, order_BK)), idx_BK

    def activation(self, pre_BF: Tensor) -> Tensor:
        """ReLU of the k largest pre-activations of each input; every other feature is 0."""
        vals_BK, idx_BK = self.top_k(pre_BF)
        return torch.zeros_like(pre_BF).scatter_(1, idx_BK, vals_BK)

    def loss(self, x_BD: Tensor, dead_F: Tensor | None = None) -> SAELoss:
        """``SAE.loss`` (the dense reference it is tested against) with a sparse decoder, as EleutherAI's
        sparsify has: only the k active latents are decoded, and only they get decoder gradients. The
        dense decoder's three [B, F] x [F, D]-sized matmuls become sparse products with B·k rows."""
        pre_BF = self.pre_acts(x_BD)
        vals_BK, idx_BK = self.top_k(pre_BF)
        x_hat_BD = _SparseDecode.apply(vals_BK, idx_BK, self.W_dec) + self.b_dec
        mse = (x_hat_BD - x_BD).pow(2).mean()
        aux = self.aux_loss(x_BD, x_hat_BD, pre_BF, dead_F)
        vals_BK = vals_BK.detach()
        fires_F = torch.bincount(idx_BK[vals_BK > 0], minlength=self.d_sae)
        return SAELoss(mse + aux, mse, vals_BK.sum(dtype=stats_dtype(vals_BK)) / len(x_BD), aux, fires_F)

    def aux_loss(self, x_BD: Tensor, x_hat_BD: Tensor, pre_BF: Tensor, dead_F: Tensor | None) -> Tensor:
        """AuxK: the top k_aux = d_in/2 dead latents reconstruct the residual error x − x̂.

        Measured as the MSE between that reconstruction (no decoder bias) and the detached error,
        times ``aux_k_coeff``; zero while no latent is dead. (Decoded densely: with k_aux a sizeable
        fraction of the dictionary, the dense matmul is the faster one.)"""
        if dead_F is None or not bool(dead_F.any()):
            return x_BD.new_zeros(())
        k_aux = min(self.d_in // 2, self.d_sae)
        dead_pre_BF = pre_BF.masked_fill(~dead_F, float("-inf"))
        vals_BK, idx_BK = dead_pre_BF.topk(k_aux, dim=1, sorted=False)
        f_aux_BF = torch.zeros_like(dead_pre_BF).scatter_(1, idx_BK, torch.relu(vals_BK))
        error_BD = (x_BD - x_hat_BD).detach()
        return self.cfg.aux_k_coeff * (self.directions_sum(f_aux_BF) - error_BD).pow(2).mean()


def _csr(vals_BK: Tensor, idx_BK: Tensor, n_features: int) -> Tensor:
    """The [B, F] matrix with vals_BK at idx_BK (ascending within each row), as CSR."""
    B, K = idx_BK.shape
    crow = torch.arange(0, B * K + 1, K, device=idx_BK.device)
    return torch.sparse_csr_tensor(crow, idx_BK.flatten(), vals_BK.flatten(), (B, n_features), check_invariants=False)


class _SparseDecode(torch.autograd.Function):
    """Σ_k vals[b, k] · W_dec[idx[b, k]] as a sparse [B, F] x [F, D] product, in W_dec's dtype (float32 in bf16
    training too: the sparse kernels have no bf16 and need none). Backward: the values' gradient is the dense
    gradient sampled at the k active latents (sampled_addmm), W_dec's has nonzero rows only for latents that
    were active (fᵀ g with f sparse)."""

    @staticmethod
    def forward(ctx, vals_BK: Tensor, idx_BK: Tensor, W_dec_FD: Tensor) -> Tensor:
        f_BF = _csr(vals_BK.to(W_dec_FD.dtype), idx_BK, W_dec_FD.shape[0])
        ctx.save_for_backward(vals_BK, idx_BK, W_dec_FD)
        return f_BF @ W_dec_FD

    @staticmethod
    def backward(ctx, g_BD: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        vals_BK, idx_BK, W_dec_FD = ctx.saved_tensors
        g_BD = g_BD.contiguous()
        f_BF = _csr(vals_BK.to(W_dec_FD.dtype), idx_BK, W_dec_FD.shape[0])
        g_vals_BK = None
        if ctx.needs_input_grad[0]:
            sampled = torch.sparse.sampled_addmm(f_BF, g_BD, W_dec_FD.T, beta=0.0)
            g_vals_BK = sampled.values().view(vals_BK.shape).to(vals_BK.dtype)
        g_W_dec_FD = f_BF.t() @ g_BD if ctx.needs_input_grad[2] else None
        return g_vals_BK, None, g_W_dec_FD
