"""Geometric median by Weiszfeld's algorithm: the paper initialises b_dec with it."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def geometric_median(points_ND: Tensor, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """The point minimising the sum of Euclidean distances to the rows of ``points_ND``.

    Weiszfeld: repeatedly average the points weighted by 1 / distance to the current estimate,
    starting from the mean; computed in float64, returned in the input's dtype.
    """
    points = points_ND.double()
    median_D = points.mean(dim=0)
    for _ in range(max_iter):
        # The clamp keeps a point that coincides with the estimate from getting an infinite weight.
        weights_N = 1.0 / (points - median_D).norm(dim=1).clamp_min(1e-12)
        new_D = weights_N @ points / weights_N.sum()
        moved = (new_D - median_D).norm()
        median_D = new_D
        if moved <= tol * max(1.0, float(median_D.norm())):
            break
    return median_D.to(points_ND.dtype)
