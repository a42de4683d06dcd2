"""The paper's SAE: ReLU features, loss = MSE + λ · Σ_features |f| ("Towards Monosemanticity")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae.base import SAE, SAELoss, batch_stats
from sae.sparse import Active, active_pre_acts, decode_active


class ReLUSAE(SAE):
    arch = "relu"

    def penalty(self, f_BF: Tensor) -> Tensor:
        """λ · L1 of each input's features (f ≥ 0 after the ReLU, so |f| = f)."""
        return self.cfg.l1_coeff * f_BF.sum(dim=1)

    def loss(self, x_BD: Tensor, dead_F: Tensor | None = None, tokens_B: Tensor | None = None) -> SAELoss:
        """``SAE.loss`` (the reference it is tested against), computed sparse (``sae.sparse``) while few
        features are active, else dense with the L1 gradient fused into the ReLU's backward: the
        penalty's [B, F] gradient is then never built and summed on its own. The returned loss has the
        penalty's value but not its gradient, which the ReLU supplies."""
        pre_BF = self.pre_acts(x_BD)
        active = self._sparse_active(pre_BF)
        if active is not None:
            return self._sparse_loss(x_BD, pre_BF, active)
        f_BF = _ReLUWithL1Grad.apply(pre_BF, self.cfg.l1_coeff / len(x_BD))
        mse = (self.decode(f_BF) - x_BD).pow(2).mean()
        l1, fires_F = batch_stats(f_BF.detach())
        return SAELoss(mse + self.cfg.l1_coeff * l1, mse, l1, mse.new_zeros(()), fires_F)

    def _sparse_active(self, pre_BF: Tensor) -> Active | None:
        """The features with pre-activation > 0 when the sparse step is to be taken on them, else None."""
        if self.sparse_max_density <= 0:
            return None  # always dense: not even the features are looked at
        return Active.positive(torch.relu(pre_BF.detach()), self.sparse_max_density)

    def _sparse_loss(self, x_BD: Tensor, pre_BF: Tensor, active: Active) -> SAELoss:
        """The loss over the active features only: on them the ReLU is the identity and |f| = f, so the
        L1 term is the sum of their pre-activations and its gradient a constant added to theirs."""
        f_N = active_pre_acts(x_BD, self.W_enc, self.b_enc, self.b_dec, pre_BF, active)
        mse = F.mse_loss(decode_active(f_N, active, self.W_dec) + self.b_dec, x_BD)  # one fused kernel each way
        l1 = f_N.sum() / len(x_BD)
        # Every active feature is > 0 (Active.positive), so each latent fires on all of its pairs.
        return SAELoss(mse + self.cfg.l1_coeff * l1, mse, l1.detach(), mse.new_zeros(()), active.latent_counts_F)


class _ReLUWithL1Grad(torch.autograd.Function):
    """f = ReLU(pre) whose backward also adds d(coeff · Σ f)/df = coeff before applying the ReLU mask.
    Works in whatever dtype ``pre`` has (bf16 in bf16 training: coeff is then added in bf16, whose
    exponent range is float32's, so a small coeff is rounded relatively, not flushed to 0)."""

    @staticmethod
    def forward(ctx, pre_BF: Tensor, coeff: float) -> Tensor:
        f_BF = torch.relu(pre_BF)
        ctx.save_for_backward(f_BF)
        ctx.coeff = coeff
        return f_BF

    @staticmethod
    def backward(ctx, grad_BF: Tensor) -> tuple[Tensor, None]:
        (f_BF,) = ctx.saved_tensors
        # The incoming gradient is the decoder matmul's fresh output: add in place when it is a plain
        # dense tensor (an expanded one, e.g. from a sum, must not be written to).
        grad_BF = grad_BF.add_(ctx.coeff) if grad_BF.is_contiguous() else grad_BF + ctx.coeff
        return torch.ops.aten.threshold_backward(grad_BF, f_BF, 0), None
