"""Adam that keeps the decoder vectors at unit norm, as the paper does.

Before each step the gradient component parallel to each decoder vector is removed (a step along
it would only change the vector's length); after the step the vectors are renormalized.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


@torch.no_grad()
def remove_parallel_grad_(W_FD: Tensor) -> None:
    """grad_f -= (grad_f · w_f) w_f for each unit-norm row w_f of ``W_FD``, in place."""
    if W_FD.grad is not None:
        parallel_F1 = torch.linalg.vecdot(W_FD.grad, W_FD).unsqueeze(1)
        W_FD.grad.addcmul_(parallel_F1, W_FD, value=-1)


@torch.no_grad()
def normalize_rows_(W_FD: Tensor) -> None:
    W_FD.div_(W_FD.norm(dim=1, keepdim=True).clamp_min(1e-12))


class ConstrainedAdam(torch.optim.Adam):
    """``torch.optim.Adam`` whose ``constrained`` parameters keep unit-norm rows."""

    def __init__(self, params: Iterable[nn.Parameter], constrained: Iterable[nn.Parameter], lr: float):
        params = list(params)
        # The fused kernel (one pass over all parameters) exists for CPU and CUDA in recent torch.
        super().__init__(params, lr=lr, fused=params[0].device.type in ("cpu", "cuda"))
        self.constrained = list(constrained)

    def step(self, closure=None):  # type: ignore[override]
        for W_FD in self.constrained:
            remove_parallel_grad_(W_FD)
        loss = super().step(closure)
        for W_FD in self.constrained:
            normalize_rows_(W_FD)
        return loss
