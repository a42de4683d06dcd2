"""The SAE every architecture shares: parameters, encode/decode, and the loss template.

Shapes: B batch, D input dims (d_in), F features (d_sae). The weights are SAELens's, in its state-dict
layout: ``W_enc`` [D, F], ``b_enc`` [F], ``W_dec`` [F, D] (one unit-norm decoder vector per row), ``b_dec`` [D].
In memory the encoder is held feature-major, as dictionary_learning holds it: the parameter is ``W_enc_FD``
[F, D] and ``W_enc`` its transposed view. Each feature's encoder vector is then one contiguous row, as its
decoder vector is, because the sparse step builds the encoder's gradient a feature at a time (``sae.sparse``):
a [D, F] parameter would need that gradient transposed (a copy of the whole matrix per step), and the fused
Adam copies a non-contiguous parameter back and forth. ``state_dict`` and ``load_state_dict`` speak ``W_enc``.
The paper's math: x̄ = x − b_dec; f = ReLU(x̄ W_enc + b_enc); x̂ = f W_dec + b_dec.

Precision: the parameters (and Adam's state) are always float32. With ``matmul_dtype = torch.bfloat16``
(what the trainer sets for bf16 training) the two big matmuls and their gradients run on bf16 copies of
the weights, and the gradients come back in float32: explicit casts, not autocast, so that every op's
precision is visible here and the encoder's backward stays one matmul (see ``_Encoder``).

Tokens: every entry point (``encode``, ``forward``, ``loss``, ``per_input_loss``) takes the current token id of each
input, which only an SAE that ``reads_tokens`` uses (``sae.tokenized``: a per-token decoder bias); the others
ignore it.

Sparse steps: while few features are active, ``ReLUSAE.loss`` and ``TopKSAE.loss`` run every product but the
encoder's forward one over the active features only (``sae.sparse``; ``sparse_max_density`` says when).
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from universality.core.config import SAEConfig


class SAEOutput(NamedTuple):
    x_hat: Tensor  # [B, D] reconstruction
    f: Tensor  # [B, F] feature activations
    pre_acts: Tensor  # [B, F] encoder pre-activations x̄ W_enc + b_enc


class SAELoss(NamedTuple):
    loss: Tensor  # scalar: what the optimizer minimizes
    mse: Tensor  # scalar: squared error, mean over vector elements
    l1: Tensor  # scalar: sum over features of |f|, mean over the batch (logged for every arch; detached)
    aux: Tensor  # scalar: the architecture's auxiliary loss (0 when it has none)
    fires_F: Tensor  # [F] int64: inputs of the batch each feature is active on (L0, dead and ultralow bookkeeping)


def stats_dtype(t: Tensor) -> torch.dtype:
    """What sums of ``t`` are accumulated in: float32 for bf16 (or float32) tensors, float64 for float64."""
    return torch.promote_types(t.dtype, torch.float32)


def batch_stats(f_BF: Tensor) -> tuple[Tensor, Tensor]:
    """(L1 per input, firing counts [F]) of a batch of features f ≥ 0, for logging and dead-feature clocks.

    Column sums in f's own dtype (CPU reductions accumulate bf16 in float32, then round the result): a
    float32 cast of [B, F] first, or summing the boolean f > 0, costs 4-8x more. In bf16 a count above
    256 is rounded to 8 significant bits; a count of 0 (dead clocks) or a rare feature's count is exact."""
    sum_F = f_BF.sum(dim=0)
    return sum_F.sum(dtype=stats_dtype(sum_F)) / len(f_BF), torch.sign(f_BF).sum(dim=0).long()


class SAE(nn.Module):
    """Base class: an architecture overrides ``activation`` and its ``penalty`` / ``aux_loss`` only."""

    arch: ClassVar[str]
    resamples_dead: ClassVar[bool] = True  # whether the trainer resamples dead features (the paper's fix)
    reads_tokens: ClassVar[bool] = False  # whether its inputs need their current token ids (sae.tokenized)

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
        self.W_enc_FD = nn.Parameter(W_dec_FD.clone())  # W_enc, feature-major (see the module's docstring)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.matmul_dtype: torch.dtype | None = None  # None: the parameters' dtype; torch.bfloat16 for bf16 training
        # The sparse step (sae.sparse) is taken while at most this fraction of a batch's [B, F] features is
        # active; 0 (the default outside training): always the dense step. The trainer sets it per device.
        self.sparse_max_density = 0.0

    @property
    def W_enc(self) -> Tensor:
        """The encoder [D, F] (SAELens's layout): a view of the feature-major parameter ``W_enc_FD``."""
        return self.W_enc_FD.T

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # type: ignore[no-untyped-def]
        """The state dict holds the encoder as ``W_enc`` [D, F], SAELens's name and layout."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "W_enc"] = destination.pop(prefix + "W_enc_FD").T

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        if prefix + "W_enc" in state_dict:  # load_state_dict hands every module its own copy of the dict
            state_dict[prefix + "W_enc_FD"] = state_dict.pop(prefix + "W_enc").T
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _dtype(self) -> torch.dtype:
        return self.matmul_dtype or self.W_enc.dtype

    def takes_sparse_step(self, density: float) -> bool:
        """Whether a loss whose active features fill ``density`` of the batch's [B, F] entries runs sparse."""
        return 0 < self.sparse_max_density and density <= self.sparse_max_density

    def pre_acts(self, x_BD: Tensor) -> Tensor:
        """x̄ W_enc + b_enc (in the matmul dtype)."""
        return _Encoder.apply(x_BD, self.W_enc, self.b_enc, self.b_dec, self._dtype())

    def activation(self, pre_BF: Tensor) -> Tensor:
        """Pre-activations -> features; the paper's ReLU by default."""
        return torch.relu(pre_BF)

    def encoder_input(self, x_BD: Tensor, tokens_B: Tensor | None = None) -> Tensor:
        """What the encoder reads before b_dec is subtracted: the activations themselves (see ``sae.tokenized``)."""
        return x_BD

    def decoder_bias(self, tokens_B: Tensor | None = None) -> Tensor:
        """What the decoder adds to f W_dec: b_dec (per token for ``sae.tokenized``)."""
        return self.b_dec

    def encode(self, x_BD: Tensor, tokens_B: Tensor | None = None) -> Tensor:
        return self.activation(self.pre_acts(x_BD))

    def directions_sum(self, f_BF: Tensor) -> Tensor:
        """f W_dec: the decoder without its bias, as float32 (or the parameters' dtype) whatever the matmul dtype."""
        dtype = self._dtype()
        return (f_BF.to(dtype) @ self.W_dec.to(dtype)).to(self.W_dec.dtype)

    def decode(self, f_BF: Tensor) -> Tensor:
        return self.directions_sum(f_BF) + self.b_dec

    def forward(self, x_BD: Tensor, tokens_B: Tensor | None = None) -> SAEOutput:
        return self._forward(x_BD)

    def _forward(self, x_BD: Tensor) -> SAEOutput:
        """The SAE's math on inputs that need no tokens (what ``forward`` runs for the architectures that read none)."""
        pre_BF = self.pre_acts(x_BD)
        f_BF = self.activation(pre_BF)
        return SAEOutput(self.decode(f_BF), f_BF, pre_BF)

    def penalty(self, f_BF: Tensor) -> Tensor:
        """Per-input sparsity penalty [B] added to the reconstruction loss; none by default."""
        return f_BF.new_zeros(f_BF.shape[0])

    def aux_loss(self, x_BD: Tensor, x_hat_BD: Tensor, pre_BF: Tensor, dead_F: Tensor | None) -> Tensor:
        """An auxiliary loss (e.g. TopK's AuxK on dead features); none by default."""
        return x_BD.new_zeros(())

    def per_input_loss(self, x_BD: Tensor, tokens_B: Tensor | None = None) -> Tensor:
        """Loss of each input [B] (reconstruction + penalty): what resampling weights inputs by."""
        out = self._forward(x_BD)
        return (out.x_hat - x_BD).pow(2).mean(dim=1) + self.penalty(out.f)

    def loss(self, x_BD: Tensor, dead_F: Tensor | None = None, tokens_B: Tensor | None = None) -> SAELoss:
        """The training loss; ``dead_F`` marks features that have not fired lately (for aux losses)."""
        out = self._forward(x_BD)
        mse = (out.x_hat - x_BD).pow(2).mean()
        aux = self.aux_loss(x_BD, out.x_hat, out.pre_acts, dead_F)
        l1, fires_F = batch_stats(out.f.detach())
        return SAELoss(mse + self.penalty(out.f).mean() + aux, mse, l1, aux, fires_F)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        """Make an SAE trained on ``scale * x`` work on raw x: x̂_raw = x̂ / scale and f_raw = f / scale.

        Only the biases change (the directions and the unit-norm decoder are untouched), because
        f = relu((s x − b_dec) W_enc + b_enc) = s · relu((x − b_dec/s) W_enc + b_enc/s)."""
        self.b_enc /= scale
        self.b_dec /= scale


class _Encoder(torch.autograd.Function):
    """pre = x̄ W_enc + b_enc with x̄ = x − b_dec, the matmul in ``dtype`` (the parameters stay float32).

    Its backward is what autograd would give, in fewer operations: W_enc's gradient is one matmul x̄ᵀ g, taken
    as (gᵀ x̄)ᵀ so that the feature-major parameter receives gᵀ x̄ without a copy (autograd of
    x W_enc + (b_enc − b_dec W_enc) would add an outer product to it), and b_dec's gradient
    through the encoder, −W_enc Σ_B g, is a matrix-vector product instead of a [B, F] x [F, D] matmul."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor, dtype: torch.dtype) -> Tensor:
        xbar_BD = (x_BD - b_dec_D).to(dtype)
        W_DF = W_enc_DF.to(dtype)
        ctx.save_for_backward(xbar_BD, W_enc_DF)
        return torch.addmm(b_enc_F.to(dtype), xbar_BD, W_DF)

    @staticmethod
    def backward(ctx, g_BF: Tensor) -> tuple[Tensor | None, ...]:
        xbar_BD, W_enc_DF = ctx.saved_tensors
        return (*encoder_backward(g_BF, xbar_BD, W_enc_DF, ctx.needs_input_grad), None)


def encoder_backward(g_BF: Tensor, xbar_BD: Tensor, W_enc_DF: Tensor,
                     needs_input_grad: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The gradients (x, W_enc, b_enc, b_dec) of pre = x̄ W_enc + b_enc from g = d loss / d pre (see ``_Encoder``),
    the products in x̄'s dtype (the matmul dtype) and the gradients in W_enc's."""
    g_b_enc_F = g_BF.sum(dim=0).to(W_enc_DF.dtype)  # summed in g's dtype: see batch_stats
    g_W_enc_DF = (g_BF.to(xbar_BD.dtype).T @ xbar_BD).T.to(W_enc_DF.dtype) if needs_input_grad[1] else None
    g_b_dec_D = -(W_enc_DF @ g_b_enc_F) if needs_input_grad[3] else None
    g_x_BD = None
    if needs_input_grad[0]:
        g_x_BD = (g_BF.to(xbar_BD.dtype) @ W_enc_DF.to(xbar_BD.dtype).T).to(W_enc_DF.dtype)
    return g_x_BD, g_W_enc_DF, g_b_enc_F, g_b_dec_D
