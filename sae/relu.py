"""The paper's SAE: ReLU features, loss = MSE + λ · Σ_features |f| ("Towards Monosemanticity")."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sae.base import SAE, SAELoss, batch_stats, encoder_backward
from sae.sparse import Active, active_mse, active_pre_acts


class ReLUSAE(SAE):
    arch = "relu"

    def penalty(self, f_BF: Tensor) -> Tensor:
        """λ · L1 of each input's features (f ≥ 0 after the ReLU, so |f| = f)."""
        return self.cfg.l1_coeff * f_BF.sum(dim=1)

    def encode(self, x_BD: Tensor, tokens_B: Tensor | None = None) -> Tensor:
        """ReLU(x̄ W_enc + b_enc), the bias and ReLU fused into the product (``linear_relu``)."""
        return _ReLUEncoder.apply(x_BD, self.W_enc, self.b_enc, self.b_dec, self._dtype(), 0.0)

    def loss(self, x_BD: Tensor, dead_F: Tensor | None = None, tokens_B: Tensor | None = None) -> SAELoss:
        """``SAE.loss`` (the reference it is tested against), computed sparse (``sae.sparse``) while few
        features are active, else dense with the L1 gradient fused into the encoder's backward: the
        penalty's [B, F] gradient is then never built and summed on its own. The returned loss has the
        penalty's value but not its gradient, which the encoder supplies."""
        f_BF = _ReLUEncoder.apply(x_BD, self.W_enc, self.b_enc, self.b_dec, self._dtype(), self.cfg.l1_coeff / len(x_BD))
        active = self._sparse_active(f_BF)
        if active is not None:
            return self._sparse_loss(x_BD, f_BF, active)
        mse = (self.decode(f_BF) - x_BD).pow(2).mean()
        l1, fires_F = batch_stats(f_BF.detach())
        return SAELoss(mse + self.cfg.l1_coeff * l1, mse, l1, mse.new_zeros(()), fires_F)

    def _sparse_active(self, f_BF: Tensor) -> Active | None:
        """The active features when the sparse step is to be taken on them, else None."""
        if self.sparse_max_density <= 0:
            return None  # always dense: not even the features are looked at
        return Active.positive(f_BF.detach(), self.sparse_max_density)

    def _sparse_loss(self, x_BD: Tensor, f_BF: Tensor, active: Active) -> SAELoss:
        """The loss over the active features only: on them the ReLU is the identity and |f| = f, so the
        L1 term is the sum of their pre-activations and its gradient a constant added to theirs."""
        f_N = active_pre_acts(x_BD, self.W_enc, self.b_enc, self.b_dec, f_BF, active)  # f = pre where f > 0
        mse, _ = active_mse(f_N, active, self.W_dec, self.b_dec, x_BD)
        l1 = f_N.sum() / len(x_BD)
        # Every active feature is > 0 (Active.positive), so each latent fires on all of its pairs.
        return SAELoss(mse + self.cfg.l1_coeff * l1, mse, l1.detach(), mse.new_zeros(()), active.latent_counts_F)


def linear_relu(x_BD: Tensor, W_FD: Tensor, b_F: Tensor) -> Tensor:
    """ReLU(x Wᵀ + b). On CPU in float32 or bf16, one oneDNN primitive that adds the bias and applies the ReLU
    as it writes the product (``torch.ops.mkldnn._linear_pointwise``, the kernel torch's compiler fuses a
    linear and its ReLU into): at quick's 1,024 x 512 x 2,048 about 1 ms of a 14 ms sparse step faster than
    addmm then ReLU, which is what runs elsewhere (and where the probe below finds the kernel missing)."""
    if x_BD.device.type == "cpu" and _onednn_fuses_linear_relu(x_BD.dtype):
        return torch.ops.mkldnn._linear_pointwise(x_BD, W_FD, b_F, "relu", [], "")
    return torch.addmm(b_F, x_BD, W_FD.T).relu_()


@functools.cache
def _onednn_fuses_linear_relu(dtype: torch.dtype) -> bool:
    """Whether this torch build has the fused CPU kernel for ``dtype`` (a private op: probed once on a 2 x 2
    case, not assumed)."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False  # no bf16 instructions: oneDNN would emulate them
    x, W, b = (torch.tensor(v, dtype=dtype) for v in ([[1.0, 2.0], [3.0, -4.0]], [[1.0, 0.0], [0.0, 1.0]], [0.5, -1.0]))
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, W, b, "relu", [], "")
    except (AttributeError, RuntimeError):
        return False
    return torch.equal(got, torch.tensor([[1.5, 1.0], [3.5, 0.0]], dtype=dtype))


class _ReLUEncoder(torch.autograd.Function):
    """f = ReLU(x̄ W_enc + b_enc) with x̄ = x − b_dec, the product in ``dtype`` with its bias and ReLU fused
    (``linear_relu``). Its backward adds d(coeff · Σ f)/df = coeff (the L1 gradient, so that it is never built
    as a [B, F] tensor of its own) before applying the ReLU's mask, then is the encoder's
    (``base.encoder_backward``). coeff is added in f's dtype (bf16 in bf16 training: its exponent range is
    float32's, so a small coeff is rounded relatively, not flushed to 0)."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor, dtype: torch.dtype,
                coeff: float) -> Tensor:
        xbar_BD = (x_BD - b_dec_D).to(dtype)
        f_BF = linear_relu(xbar_BD, W_enc_DF.T.to(dtype), b_enc_F.to(dtype))
        ctx.save_for_backward(xbar_BD, W_enc_DF, f_BF)
        ctx.coeff = coeff
        return f_BF

    @staticmethod
    def backward(ctx, g_BF: Tensor) -> tuple[Tensor | None, ...]:
        xbar_BD, W_enc_DF, f_BF = ctx.saved_tensors
        if ctx.coeff:
            # The incoming gradient is the decoder matmul's fresh output: add in place when it is a plain
            # dense tensor (an expanded one, e.g. from a sum, must not be written to).
            g_BF = g_BF.add_(ctx.coeff) if g_BF.is_contiguous() else g_BF + ctx.coeff
        g_pre_BF = torch.ops.aten.threshold_backward(g_BF, f_BF, 0)
        return (*encoder_backward(g_pre_BF, xbar_BD, W_enc_DF, ctx.needs_input_grad), None, None)
