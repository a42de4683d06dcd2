"""The SAE every architecture shares: parameters, encode/decode, and the loss template.

Shapes: B batch, D input dims (d_in), F features (d_sae). Parameters are laid out as SAELens's:
``W_enc`` [D, F], ``b_enc`` [F], ``W_dec`` [F, D] (one unit-norm decoder vector per row), ``b_dec`` [D].
The paper's math: x̄ = x − b_dec; f = ReLU(x̄ W_enc + b_enc); x̂ = f W_dec + b_dec.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from universality.config import SAEConfig


class SAEOutput(NamedTuple):
    x_hat: Tensor  # [B, D] reconstruction
    f: Tensor  # [B, F] feature activations
    pre_acts: Tensor  # [B, F] encoder pre-activations x̄ W_enc + b_enc


class SAELoss(NamedTuple):
    loss: Tensor  # scalar: what the optimizer minimizes
    mse: Tensor  # scalar: squared error, mean over vector elements
    l1: Tensor  # scalar: sum over features of |f|, mean over the batch (logged for every arch)
    aux: Tensor  # scalar: the architecture's auxiliary loss (0 when it has none)
    f: Tensor  # [B, F] feature activations (detached)
    fired_F: Tensor  # [F] bool: features active on some input of the batch (dead-feature bookkeeping)


class SAE(nn.Module):
    """Base class: an architecture overrides ``activation`` and its ``penalty`` / ``aux_loss`` only."""

    arch: ClassVar[str]
    resamples_dead: ClassVar[bool] = True  # whether the trainer resamples dead features (the paper's fix)

    def __init__(self, d_in: int, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.d_in, self.d_sae = d_in, cfg.dict_size
        W_dec_FD = torch.empty(self.d_sae, d_in)
        # Kaiming uniform (PyTorch's default for a Linear with fan_in D), then unit-norm rows;
        # the encoder starts as the decoder's transpose, so every feature starts aligned with its direction.
        bound = 1 / math.sqrt(d_in)
        W_dec_FD.uniform_(-bound, bound, generator=generator)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.W_enc = nn.Parameter(W_dec_FD.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """x̄ W_enc + b_enc, written as x W_enc + (b_enc − b_dec W_enc): the same value, but b_dec's
        gradient through the encoder then costs a vector-matrix product instead of a [B, F] x [F, D] matmul."""
        bias_F = torch.addmv(self.b_enc, self.W_enc.T, self.b_dec, alpha=-1)
        return torch.addmm(bias_F, x_BD, self.W_enc)

    def activation(self, pre_BF: Tensor) -> Tensor:
        """Pre-activations -> features; the paper's ReLU by default."""
        return torch.relu(pre_BF)

    def encode(self, x_BD: Tensor) -> Tensor:
        return self.activation(self.pre_acts(x_BD))

    def decode(self, f_BF: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, f_BF, self.W_dec)

    def forward(self, x_BD: Tensor) -> SAEOutput:
        pre_BF = self.pre_acts(x_BD)
        f_BF = self.activation(pre_BF)
        return SAEOutput(self.decode(f_BF), f_BF, pre_BF)

    def penalty(self, f_BF: Tensor) -> Tensor:
        """Per-input sparsity penalty [B] added to the reconstruction loss; none by default."""
        return f_BF.new_zeros(f_BF.shape[0])

    def aux_loss(self, x_BD: Tensor, out: SAEOutput, dead_F: Tensor | None) -> Tensor:
        """An auxiliary loss (e.g. TopK's AuxK on dead features); none by default."""
        return x_BD.new_zeros(())

    def per_input_loss(self, x_BD: Tensor) -> Tensor:
        """Loss of each input [B] (reconstruction + penalty): what resampling weights inputs by."""
        out = self(x_BD)
        return (out.x_hat - x_BD).pow(2).mean(dim=1) + self.penalty(out.f)

    def loss(self, x_BD: Tensor, dead_F: Tensor | None = None) -> SAELoss:
        """The training loss; ``dead_F`` marks features that have not fired lately (for aux losses)."""
        out = self(x_BD)
        mse = (out.x_hat - x_BD).pow(2).mean()
        aux = self.aux_loss(x_BD, out, dead_F)
        f_BF = out.f.detach()
        sum_F = f_BF.sum(dim=0)  # one pass gives both the L1 and which features fired
        return SAELoss(mse + self.penalty(out.f).mean() + aux, mse, sum_F.sum() / len(f_BF), aux, f_BF, sum_F > 0)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` work on raw x: x̂_raw = x̂ / scale and f_raw = f / scale.

        Only the biases change (the directions and the unit-norm decoder are untouched), because
        f = relu((s x − b_dec) W_enc + b_enc) = s · relu((x − b_dec/s) W_enc + b_enc/s)."""
        self.b_enc /= scale
        self.b_dec /= scale
