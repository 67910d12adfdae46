"""KeOps nearest neighbour: ArgMin_j |x_i - y_j|² without forming the (N, M) matrix.

Only the index comes from KeOps; fastlddmm.distances recomputes |x_i - y_{j*}|² in PyTorch from
it, which gives the same values and gradients as the dense reference (the gradient of a min is the
gradient of its minimiser) without a second, differentiated KeOps formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._lazy import lazy_tensor


def nearest_index(
    x: Tensor,  # (N, D)
    y: Tensor,  # (M, D)
) -> Tensor:  # (N,) int64
    """j* = argmin_j |x_i - y_j|² for each x_i (differences, not the |x|² + |y|² - 2 x·y expansion)."""
    LazyTensor = lazy_tensor()
    with torch.no_grad():
        # Explicit axes: with N or M = 1 a (1, 1, D) shape would make KeOps read a parameter.
        x_i = LazyTensor(x.detach().contiguous(), axis=0)  # (N, D) as an i-variable
        y_j = LazyTensor(y.detach().contiguous(), axis=1)  # (M, D) as a j-variable
        index = ((x_i - y_j) ** 2).sum(-1).argmin(dim=1)  # (N, 1)
    return index.view(-1).to(torch.int64)
