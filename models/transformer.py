"""A one-layer transformer in the style of "Towards Monosemanticity".

Token + learned position embeddings, one pre-LayerNorm causal attention block, one MLP block
whose hidden activations (after the nonlinearity) are the "neurons" the SAE decomposes,
a final LayerNorm and the unembedding. Shapes: B batch, T positions, D d_model, M d_mlp, V vocab.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

MLPHook = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int
    ctx_len: int
    d_model: int = 128
    d_mlp: int = 512
    n_heads: int = 4
    act_fn: str = "relu"

    def to_dict(self) -> dict:
        return asdict(self)


class ForwardOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]
    mlp_acts: torch.Tensor | None  # [B, T, M] post-nonlinearity neurons, when asked for


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with its affine part as plain elementwise ops. The fused CPU kernel reduces
    the weight and bias gradients in a thread-count-dependent order; these ops do not, so a seed
    trains to bit-identical weights with 1 thread or several (parallel seeds change thread counts)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, eps=self.eps) * self.weight + self.bias


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.W_qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.W_o = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.W_qkv(x_BTD).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        z_BHTd = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.W_o(z_BHTd.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.W_in = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.W_out = nn.Linear(cfg.d_mlp, cfg.d_model)
        self.act = nn.ReLU() if cfg.act_fn == "relu" else nn.GELU()

    def neurons(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.act(self.W_in(x_BTD))

    def forward(self, x_BTD: torch.Tensor, hook: MLPHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, neurons); ``hook`` may replace the neurons before the output projection."""
        acts_BTM = self.neurons(x_BTD)
        used_BTM = acts_BTM if hook is None else hook(acts_BTM)
        return self.W_out(used_BTM), acts_BTM


class OneLayerTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.W_pos = nn.Embedding(cfg.ctx_len, cfg.d_model)
        self.ln_attn = LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln_mlp = LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.ln_final = LayerNorm(cfg.d_model)
        self.W_U = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(_init_weights)

    def forward(self, tokens_BT: torch.Tensor, return_mlp: bool = False, mlp_hook: MLPHook | None = None) -> ForwardOutput:
        """Logits for every position; the MLP neurons too when ``return_mlp`` (same pass, no extra cost).

        ``mlp_hook`` maps the neurons [B, T, M] to what the MLP's output projection sees instead:
        an SAE reconstruction splices it in, ``torch.zeros_like`` ablates the MLP.
        """
        resid_BTD, acts_BTM = self.residual(tokens_BT, mlp_hook)
        return ForwardOutput(self.unembed(resid_BTD), acts_BTM if return_mlp else None)

    def residual(self, tokens_BT: torch.Tensor, mlp_hook: MLPHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the residual stream after the MLP [B, T, D], the MLP neurons [B, T, M]): ``forward`` before its
        unembedding. With one layer, a change to the MLP's output at a position changes only that position's
        residual: interventions on the neurons need ``unembed`` only where they change something."""
        resid_BTD = self._before_mlp(tokens_BT)
        mlp_out_BTD, acts_BTM = self.mlp(self.ln_mlp(resid_BTD), mlp_hook)
        return resid_BTD + mlp_out_BTD, acts_BTM

    def ablated_residual(self, tokens_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the residual stream after the MLP with its neurons zero-ablated [B, T, D], the clean neurons [B, T, M]).
        The MLP's output is linear in its neurons, so neurons n give the residual ``ablated + n @ W_out.weight.T``:
        ``residual`` with any hook, without running the output projection on zeros."""
        resid_BTD = self._before_mlp(tokens_BT)
        return resid_BTD + self.mlp.W_out.bias, self.mlp.neurons(self.ln_mlp(resid_BTD))

    def _before_mlp(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        """The residual stream the MLP reads [B, T, D]: embeddings plus the attention layer's output."""
        T = tokens_BT.shape[1]
        resid_BTD = self.W_E(tokens_BT) + self.W_pos(torch.arange(T, device=tokens_BT.device))
        return resid_BTD + self.attn(self.ln_attn(resid_BTD))

    def unembed(self, resid_XD: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of residual-stream vectors [..., D]: the final LayerNorm, then W_U."""
        return self.W_U(self.ln_final(resid_XD))

    def neuron_logit_weights(self) -> torch.Tensor:
        """Direct effect of each neuron on the logits [M, V]: W_out, then the final LayerNorm's
        linear part (centring over d_model and its gain; the 1/std treated as constant: the paper's
        LayerNorm approximation), then W_U."""
        W_out_DM = self.mlp.W_out.weight
        centred_DM = W_out_DM - W_out_DM.mean(dim=0, keepdim=True)
        return (centred_DM.T * self.ln_final.weight) @ self.W_U.weight.T


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


def cross_entropy(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, first_position: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy (nats): position t predicts token t + 1, for t >= ``first_position``."""
    logits = logits_BTV[:, first_position:-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens_BT[:, first_position + 1 :].reshape(-1))


LOSS_CHUNK_ROWS = 512  # positions unembedded at once by ``next_token_loss``: their logits stay in cache


def next_token_loss(model: OneLayerTransformer, resid_BTD: torch.Tensor, tokens_BT: torch.Tensor,
                    first_position: int = 0, chunk_rows: int = LOSS_CHUNK_ROWS,
                    matmul_dtype: torch.dtype | None = None) -> float:
    """``cross_entropy(model.unembed(resid_BTD), tokens_BT, first_position)`` as a float, without its [B, T, V] logits:
    only the scored positions are unembedded, ``chunk_rows`` at a time, their losses summed in float64. The
    whole-batch logits of a quick-sized model are tens of MiB, written, copied by the slice and read again; in
    cache-sized chunks the same loss costs about 2.5x less (measured in the evaluation stage).

    ``matmul_dtype``: the unembedding's matmul on copies of the normalized residual and W_U in this dtype (bf16
    where the hardware runs it fast: about 1.8x on one CPU core with AVX512-BF16), the logits back in the
    residual's dtype for the softmax; None: the residual's dtype throughout."""
    resid_ND = resid_BTD[:, first_position:-1].reshape(-1, resid_BTD.shape[-1])
    targets_N = tokens_BT[:, first_position + 1 :].reshape(-1)
    W_U_VD = model.W_U.weight if matmul_dtype is None else model.W_U.weight.to(matmul_dtype)

    def summed(lo: int) -> float:
        normed_XD = model.ln_final(resid_ND[lo : lo + chunk_rows])
        logits_XV = F.linear(normed_XD.to(W_U_VD.dtype), W_U_VD).to(resid_ND.dtype)
        return float(F.cross_entropy(logits_XV, targets_N[lo : lo + chunk_rows], reduction="sum"))

    return sum(summed(lo) for lo in range(0, len(resid_ND), chunk_rows)) / len(resid_ND)
