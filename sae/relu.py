"""The paper's SAE: ReLU features, loss = MSE + λ · Σ_features |f| ("Towards Monosemanticity")."""

from __future__ import annotations

from torch import Tensor

from sae.base import SAE


class ReLUSAE(SAE):
    arch = "relu"

    def penalty(self, f_BF: Tensor) -> Tensor:
        """λ · L1 of each input's features (f ≥ 0 after the ReLU, so |f| = f)."""
        return self.cfg.l1_coeff * f_BF.sum(dim=1)
