"""Resampling dead features, as the paper's appendix describes.

A dead feature gets a new direction taken from an input the SAE reconstructs badly: inputs are
sampled with probability ∝ loss², the decoder vector becomes the normalized input (after
subtracting b_dec), the encoder vector the same direction scaled to 0.2 × the mean norm of the
alive encoder vectors, the encoder bias 0; Adam's moments for every touched entry are reset.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from sae.base import SAE

ENCODER_NORM_FACTOR = 0.2  # the paper's 0.2 × mean alive encoder norm


@torch.no_grad()
def resample_dead(
    sae: SAE, optimizer: torch.optim.Optimizer, dead_F: Tensor, inputs_ND: Tensor, generator: torch.Generator,
    tokens_N: Tensor | None = None, chunk: int = 8192,
) -> int:
    """Re-initialise the features marked in ``dead_F`` from ``inputs_ND`` (with their token ids ``tokens_N``, for an SAE
    that reads them: the direction is then taken from what the encoder reads, ``SAE.encoder_input``); returns how many."""
    dead_idx = dead_F.nonzero().squeeze(1)
    n_dead = len(dead_idx)
    if n_dead == 0:
        return 0
    token_chunks = tokens_N.split(chunk) if tokens_N is not None else itertools.repeat(None)
    loss_N = torch.cat([sae.per_input_loss(x, t) for x, t in zip(inputs_ND.split(chunk), token_chunks)])
    weights_N = loss_N.double().pow(2)
    if not weights_N.sum() > 0:  # perfect reconstruction everywhere: sample uniformly
        weights_N = torch.ones_like(weights_N)
    enough = int((weights_N > 0).sum()) >= n_dead
    picks = torch.multinomial(weights_N.cpu(), n_dead, replacement=not enough, generator=generator)
    picked = picks.to(inputs_ND.device)
    encoded_KD = sae.encoder_input(inputs_ND[picked], None if tokens_N is None else tokens_N[picked.to(tokens_N.device)])
    x_bar_KD = encoded_KD.flatten(1) - sae.b_dec  # a crosscoder's [K, M, D] as [K, M·D]
    directions_KD = x_bar_KD / x_bar_KD.norm(dim=1, keepdim=True).clamp_min(1e-12)

    alive_F = ~dead_F
    enc_norms_F = sae.W_enc_FD.norm(dim=1)
    alive_norm = float(enc_norms_F[alive_F].mean()) if bool(alive_F.any()) else 1.0
    sae.W_dec[dead_idx] = directions_KD
    sae.W_enc_FD[dead_idx] = directions_KD * (ENCODER_NORM_FACTOR * alive_norm)
    sae.b_enc[dead_idx] = 0.0

    for param in (sae.W_dec, sae.W_enc_FD, sae.b_enc):  # each a row per feature
        state = optimizer.state.get(param, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name][dead_idx] = 0.0
    return n_dead
