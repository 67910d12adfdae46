"""Triton nearest-neighbour index finder for fastlddmm.distances (kernels/nearest.py).

Only the index comes from Triton; fastlddmm.distances recomputes |x_i - y_{j*}|² in PyTorch from it,
which gives the reference's values and gradients without a backward kernel.
"""

from __future__ import annotations

from torch import Tensor

from ..kernels import nearest as _kernels


def nearest_index(
    x: Tensor,  # (N, D)
    y: Tensor,  # (M, D)
) -> Tensor:  # (N,) int64
    """j* = argmin_j |x_i - y_j|² for each x_i (coordinate differences; smallest j on ties)."""
    return _kernels.nearest_index(x, y)
