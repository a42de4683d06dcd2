"""The sparse SAE step: the encoder's forward product is dense, every other product runs over the active latents.

With L0 ≈ 18 of 2,048 latents, the decoder's forward product, both weight gradients and the gradient into
the features touch under 1% of what their dense [B, F] x [F, D]-sized matmuls do. Here a batch's active
latents are a list of N (row, latent) pairs (``Active``), and the products become:

- decoder forward  x̂_b = Σ_n f_n W_dec[latent_n] over the pairs of row b: ``embedding_bag`` (sum, weighted);
- feature gradient g_f,n = g_x̂[row_n] · W_dec[latent_n]: a sampled product (``torch.sparse.sampled_addmm``);
- weight gradients gW[l] = Σ_n w_n Y[row_n] over the pairs of latent l (W_dec: w = f, Y = g_x̂; W_encᵀ:
  w = g_pre, Y = x̄): ``embedding_bag`` over the pairs grouped by latent.

Each was the fastest of gather/scatter, ``index_add``, CSR products and ``embedding_bag`` on a 2-core
AVX512-BF16 CPU (gathers of [N, D] rows and ``index_add`` were 100x slower; CSR products 1.5-2x).
They run in the parameters' dtype (float32): with bf16 training the features are bf16-rounded already
(they come from the bf16 encoder matmul), and bf16 copies of the [B, D] and [F, D] operands cost what
they saved. The parameters, Adam, the L1 gradient, the unit-norm constraint and resampling see what the
dense step gives them, up to float rounding (tests/test_sparse_step.py: the dense float64 reference,
gradcheck, and the dense bf16 step).

When to use it (``sparse_max_density``): on CPU while at most ``CPU_SPARSE_MAX_DENSITY`` of the batch's
[B, F] entries are active (the first steps of a ReLU SAE are far denser: there the dense step is faster);
on CUDA never, for now: cuBLAS's dense bf16 matmuls are not measured against these kernels there.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# The CSR pattern below is built correct by construction; torch warns once per process that CSR is "beta".
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)

# The density of active [B, F] entries up to which the sparse step is taken on CPU. Its costs grow with the
# active pairs, the dense step's do not; benchmarks/bench_sae.py --densities (the sparse step forced, batch 1,024,
# a busy 2-core machine), bf16 at 2,048: 2.0x the dense step's speed at 2%, 1.5x at 5%, 1.2x at 8%, 0.9x at 10%
# (4,096: 1.5x at 5%, 1.1x at 8%, 1.0x at 10%; float32 crosses later, 1.9x at 8%): the first steps are denser.
CPU_SPARSE_MAX_DENSITY = 0.08
_SIGNED_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # same-width integer views of floats


def sparse_max_density(device: str | torch.device) -> float:
    """The active density up to which the trainer takes the sparse step on ``device`` (0: always dense)."""
    return CPU_SPARSE_MAX_DENSITY if torch.device(device).type == "cpu" else 0.0


class Active(NamedTuple):
    """The active (row, latent) pairs of a [B, F] batch of features, in row-major order, and the same
    pairs grouped by latent (for the weight gradients)."""

    rows_N: Tensor  # [N] int64, ascending
    latents_N: Tensor  # [N] int64, ascending within each row
    flat_N: Tensor  # [N] int64: the pairs' row-major indices into [B, F] (rows_N · F + latents_N)
    row_starts_B: Tensor  # [B] int64: where each row's pairs start (embedding_bag offsets)
    by_latent_N: Tensor  # [N] int64: the pair order grouped by latent (stable: rows ascending within a latent)
    rows_by_latent_N: Tensor  # [N] int64: rows_N in that order
    latent_counts_F: Tensor  # [F] int64: each latent's pairs
    latent_starts_F: Tensor  # [F] int64: where each latent's pairs start in that order
    shape: tuple[int, int]  # (B, F)

    @classmethod
    def from_flat(cls, flat_N: Tensor, shape: tuple[int, int]) -> "Active":
        """The pairs at the row-major indices ``flat_N`` (ascending) of a [B, F] batch."""
        return cls._of_flat(flat_N.cpu().numpy(), shape, flat_N.device)

    @classmethod
    def where(cls, mask_BF: Tensor) -> "Active":
        """The True entries of a boolean [B, F] mask."""
        return cls.from_flat(mask_BF.flatten().nonzero().squeeze(1), tuple(mask_BF.shape))

    @classmethod
    def positive(cls, f_BF: Tensor, max_density: float) -> "Active | None":
        """The entries > 0 of a [B, F] tensor of features f >= 0 (after a ReLU), or None when more than
        ``max_density`` of them are (then the dense step is taken).

        Found 64 bits at a time: a word of 4 bf16 (2 float32) features is nonzero where any of them is, and
        only the nonzero words are then read feature by feature, their bits as signed integers (> 0 exactly
        where the number is > 0: a ReLU's -0.0 is not). At quick's density this takes about a third of the
        time of a [B, F] comparison and nonzero. Too many nonzero words already mean too many active features
        (a -0.0 also makes its word nonzero: at worst a rare dense step, never a wrong one)."""
        (B, n_latents), size = f_BF.shape, f_BF.element_size()
        bits_BF = f_BF.contiguous().view(_SIGNED_OF_SIZE[size])
        lanes = 8 // size if n_latents % (8 // size) == 0 else 1
        words = bits_BF.view(-1).view(torch.int64) if lanes > 1 else bits_BF.view(-1)
        limit = max_density * B * n_latents
        if torch.count_nonzero(words) > limit:  # at least one active feature per nonzero word
            return None
        words_W = words.nonzero().squeeze(1)
        lanes_L = bits_BF.view(-1, lanes).index_select(0, words_W).cpu().numpy().reshape(-1)  # the nonzero words' lanes
        word_N, lane_N = np.divmod(np.flatnonzero(lanes_L > 0), lanes)  # numpy: half of torch's time on these few
        if len(word_N) > limit:
            return None
        flat_N = words_W.cpu().numpy()[word_N] * lanes + lane_N  # ascending
        return cls._of_flat(flat_N, (B, n_latents), f_BF.device)

    @classmethod
    def at(cls, idx_BK: Tensor, n_latents: int) -> "Active":
        """Latents ``idx_BK`` [B, K] of each row, ascending within a row (TopK)."""
        rows_B1 = torch.arange(len(idx_BK), device=idx_BK.device).unsqueeze(1)
        return cls.from_flat((rows_B1 * n_latents + idx_BK).flatten(), (len(idx_BK), n_latents))

    @classmethod
    def _of_flat(cls, flat_N: np.ndarray, shape: tuple[int, int], device: torch.device) -> "Active":
        """Every field from the ascending row-major indices, the index arithmetic in numpy: on the ~20K indices
        of a quick batch each torch op costs several times numpy's (its per-op overhead dominates), and these
        ten ops were about 0.5 ms of a 14 ms sparse step."""
        B, n_latents = shape
        rows_N, latents_N = np.divmod(flat_N, n_latents)
        by_latent_N = _stable_order(latents_N, n_latents)
        row_counts_B, latent_counts_F = np.bincount(rows_N, minlength=B), np.bincount(latents_N, minlength=n_latents)
        fields = (rows_N, latents_N, flat_N, np.cumsum(row_counts_B) - row_counts_B, by_latent_N, rows_N[by_latent_N],
                  latent_counts_F, np.cumsum(latent_counts_F) - latent_counts_F)
        return cls(*(torch.from_numpy(a.astype(np.int64, copy=False)).to(device) for a in fields), shape)

    def __len__(self) -> int:
        return len(self.rows_N)

    def density(self) -> float:
        return len(self) / (self.shape[0] * self.shape[1])

    def fires(self, vals_N: Tensor) -> Tensor:
        """[F] int64: rows each latent is active on (value > 0) — SAELoss.fires_F."""
        return torch.bincount(self.latents_N[vals_N > 0], minlength=self.shape[1])

    def gather(self, t_BF: Tensor) -> Tensor:
        """The entries of a dense [B, F] tensor at the active pairs [N]."""
        return t_BF.reshape(-1).take(self.flat_N)


def _stable_order(latents_N: np.ndarray, n_latents: int) -> np.ndarray:
    """A stable argsort of the latent ids: numpy's radix sort of them as uint16 while they fit 16 bits (about 10x
    torch's stable sort at quick's 18K active pairs), else its stable merge sort."""
    return np.argsort(latents_N.astype(np.uint16) if n_latents <= 1 << 16 else latents_N, kind="stable")


def per_row_sum(active: Active, w_N: Tensor, W_FD: Tensor) -> Tensor:
    """[B, D]: Σ_n w_n W[latent_n] over the pairs of each row (f W for a sparse f)."""
    return F.embedding_bag(active.latents_N, W_FD, active.row_starts_B, mode="sum", per_sample_weights=w_N)


def per_latent_sum(active: Active, w_N: Tensor, Y_BD: Tensor) -> Tensor:
    """[F, D]: Σ_n w_n Y[row_n] over the pairs of each latent (fᵀ Y for a sparse f)."""
    return F.embedding_bag(active.rows_by_latent_N, Y_BD, active.latent_starts_F, mode="sum",
                           per_sample_weights=w_N[active.by_latent_N])


def row_dots(active: Active, A_BD: Tensor, W_FD: Tensor) -> Tensor:
    """[N]: A[row_n] · W[latent_n], the dense A Wᵀ sampled at the active pairs."""
    B, n_latents = active.shape
    crow = torch.cat([active.row_starts_B, active.row_starts_B.new_tensor([len(active)])])
    pattern = torch.sparse_csr_tensor(crow, active.latents_N, A_BD.new_zeros(len(active)), (B, n_latents),
                                      check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, A_BD.contiguous(), W_FD.T, beta=0.0).values()


def active_pre_acts(x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor, pre_BF: Tensor,
                    active: Active) -> Tensor:
    """The pre-activations at the active pairs [N] (in the parameters' dtype), taken from the dense
    ``pre_BF`` already computed (or from its ReLU, where the pairs are those > 0: there they are equal);
    their backward is the encoder's, over the active pairs only."""
    return _ActivePreActs.apply(x_BD, W_enc_DF, b_enc_F, b_dec_D, pre_BF.detach(), active)


def active_mse(vals_N: Tensor, active: Active, W_dec_FD: Tensor, b_D: Tensor | None, target_BD: Tensor) -> tuple[Tensor, Tensor]:
    """(mean((f W_dec + b − target)²), the residual f W_dec + b − target [B, D], detached) for the sparse f with
    ``vals_N`` at the active pairs (b: the decoder bias, or None)."""
    return _ActiveSquaredError.apply(vals_N, W_dec_FD, b_D, target_BD, active)


class _ActivePreActs(torch.autograd.Function):
    """pre_n = x̄[row_n] · W_enc[:, latent_n] + b_enc[latent_n]: the forward gathers them from the dense
    pre-activations; the backward is ``base._Encoder``'s for a gradient that is 0 off the active pairs:
    g_W_enc = x̄ᵀ g_pre over the pairs, g_b_enc their per-latent sums, b_dec's −W_enc g_b_enc."""

    @staticmethod
    def forward(ctx, x_BD: Tensor, W_enc_DF: Tensor, b_enc_F: Tensor, b_dec_D: Tensor, pre_BF: Tensor,
                active: Active) -> Tensor:
        ctx.save_for_backward(x_BD, W_enc_DF, b_dec_D)
        ctx.active = active
        return active.gather(pre_BF).to(W_enc_DF.dtype)

    @staticmethod
    def backward(ctx, g_N: Tensor) -> tuple[Tensor | None, ...]:
        x_BD, W_enc_DF, b_dec_D = ctx.saved_tensors
        active: Active = ctx.active
        g_b_enc_F = g_N.new_zeros(active.shape[1]).index_add_(0, active.latents_N, g_N)
        g_W_enc_DF = g_b_dec_D = g_x_BD = None
        if ctx.needs_input_grad[1]:
            g_W_enc_DF = per_latent_sum(active, g_N, x_BD - b_dec_D).T  # W_enc_FD's gradient, no copy
        if ctx.needs_input_grad[3]:
            g_b_dec_D = -(W_enc_DF @ g_b_enc_F)
        if ctx.needs_input_grad[0]:
            g_x_BD = per_row_sum(active, g_N, W_enc_DF.T.contiguous())  # no copy for an SAE's W_enc (sae.base)
        return g_x_BD, g_W_enc_DF, g_b_enc_F, g_b_dec_D, None, None


class _ActiveSquaredError(torch.autograd.Function):
    """mse = mean(r²), r = f W_dec + b − target, for the sparse f. The forward decodes over the active pairs and
    forms r in place; the backward scales N-vectors instead of r: with c = 2 g_mse / r.numel(), g_f at the active
    pairs is c (r W_decᵀ) sampled there, g_W_dec = fᵀ (c r) (nonzero rows only for latents active in the batch),
    g_b = c Σ_B r, g_target = −c r (a tokenized SAE's token bias learns through its target)."""

    @staticmethod
    def forward(ctx, vals_N: Tensor, W_dec_FD: Tensor, b_D: Tensor | None, target_BD: Tensor,
                active: Active) -> tuple[Tensor, Tensor]:
        r_BD = per_row_sum(active, vals_N.to(W_dec_FD.dtype), W_dec_FD).sub_(target_BD)
        if b_D is not None:
            r_BD.add_(b_D)
        flat = r_BD.view(-1)
        ctx.save_for_backward(vals_N, W_dec_FD, r_BD)
        ctx.active = active
        ctx.mark_non_differentiable(r_BD)
        return torch.dot(flat, flat) / flat.numel(), r_BD

    @staticmethod
    def backward(ctx, g_mse: Tensor, _g_r: Tensor | None) -> tuple[Tensor | None, ...]:
        vals_N, W_dec_FD, r_BD = ctx.saved_tensors
        active: Active = ctx.active
        c = 2 * g_mse / r_BD.numel()
        g_vals_N = (row_dots(active, r_BD, W_dec_FD) * c).to(vals_N.dtype) if ctx.needs_input_grad[0] else None
        g_W_dec_FD = per_latent_sum(active, vals_N * c, r_BD) if ctx.needs_input_grad[1] else None
        g_b_D = r_BD.sum(dim=0) * c if ctx.needs_input_grad[2] else None
        g_target_BD = r_BD * -c if ctx.needs_input_grad[3] else None
        return g_vals_N, g_W_dec_FD, g_b_D, g_target_BD, None
