"""The tokenized SAE (Dooms & Wilhelm 2025, "Tokenized SAEs"): the paper's ReLU SAE with a per-token decoder bias.

x̂ = f W_dec + b_dec + b_tok[t], f = ReLU((x − b_tok[t] − b_dec) W_enc + b_enc), t the input's current token:
a lookup table b_tok [V, D], learned with the rest, reconstructs what the current token alone predicts, so the
dictionary spends its features on context. The encoder reads the activation less the token's bias, as the
paper's encoder reads x − b_dec: on x' = x − b_tok[t] this is exactly the ReLU SAE (same loss, L1, sparse steps,
resampling), with b_tok trained through x'. b_tok starts at each token's mean of x − b_dec over the trainer's
initial sample (``init_token_bias``), as Dooms & Wilhelm start theirs from what the token alone reconstructs.

Every entry point needs the tokens (``SAE.reads_tokens``); the trainer gets them with the activations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae.base import SAELoss, SAEOutput
from sae.relu import ReLUSAE
from universality.core.config import SAEConfig
from universality.core.errors import ConfigError, DataError


class TokenizedReLUSAE(ReLUSAE):
    arch = "relu-tokenized"
    reads_tokens = True

    def __init__(self, d_in: int, cfg: SAEConfig, generator: torch.Generator | None = None, vocab_size: int | None = None):
        super().__init__(d_in, cfg, generator)
        if vocab_size is None or vocab_size < 1:
            raise ConfigError(f"a tokenized SAE ({self.arch}) needs the vocabulary size, not {vocab_size}")
        self.vocab_size = vocab_size
        self.b_tok = nn.Parameter(torch.zeros(vocab_size, d_in))  # [V, D]: the per-token decoder bias

    @torch.no_grad()
    def init_token_bias(self, x_ND: Tensor, tokens_N: Tensor) -> None:
        """b_tok[t] = the mean of x − b_dec over the rows of token t, shrunk toward 0 by n_t / (n_t + 1) (so a token
        seen once does not take that row's features as its own; an unseen token starts at 0)."""
        tokens_N = self._tokens(tokens_N, len(x_ND))
        sums_VD = torch.zeros_like(self.b_tok).index_add_(0, tokens_N, x_ND.to(self.b_tok) - self.b_dec)
        counts_V = torch.bincount(tokens_N, minlength=self.vocab_size).to(self.b_tok)
        self.b_tok.copy_(sums_VD / (counts_V + 1)[:, None])

    def _tokens(self, tokens_B: Tensor | None, n: int) -> Tensor:
        if tokens_B is None or tokens_B.shape != (n,):
            raise DataError(f"a tokenized SAE needs the current token of each of its {n} inputs"
                            + ("" if tokens_B is None else f", got token ids of shape {tuple(tokens_B.shape)}"))
        return tokens_B.to(self.b_tok.device, torch.long)

    def encoder_input(self, x_BD: Tensor, tokens_B: Tensor | None = None) -> Tensor:
        """x − b_tok[t]: the activation less what its current token predicts."""
        return x_BD - self.b_tok[self._tokens(tokens_B, len(x_BD))]

    def decoder_bias(self, tokens_B: Tensor | None = None) -> Tensor:
        """b_dec + b_tok[t], [B, D]."""
        if tokens_B is None:
            raise DataError("a tokenized SAE's decoder needs the current token of each input")
        return self.b_dec + self.b_tok[self._tokens(tokens_B, len(tokens_B))]

    def encode(self, x_BD: Tensor, tokens_B: Tensor | None = None) -> Tensor:
        return super().encode(self.encoder_input(x_BD, tokens_B))

    def forward(self, x_BD: Tensor, tokens_B: Tensor | None = None) -> SAEOutput:
        tokens_B = self._tokens(tokens_B, len(x_BD))
        out = self._forward(x_BD - self.b_tok[tokens_B])
        return out._replace(x_hat=out.x_hat + self.b_tok[tokens_B])

    def per_input_loss(self, x_BD: Tensor, tokens_B: Tensor | None = None) -> Tensor:
        return super().per_input_loss(self.encoder_input(x_BD, tokens_B))

    def loss(self, x_BD: Tensor, dead_F: Tensor | None = None, tokens_B: Tensor | None = None) -> SAELoss:
        """The ReLU SAE's loss on x − b_tok[t] (its sparse step included); b_tok gets its gradient through it."""
        return super().loss(self.encoder_input(x_BD, tokens_B), dead_F)

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        self.b_tok /= scale
