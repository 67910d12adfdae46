"""The ``keops`` backend of nearest: ArgMin / ArgKMin_j d(x_i, y_j) without forming the (N, M) matrix."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._keops import lazy_tensor
from . import pair_distance, per_item


def _knn_item(x: Tensor, y: Tensor, k: int, norm: int) -> Tensor:  # (n, D), (m, D) -> (n, k)
    LazyTensor = lazy_tensor()
    # Explicit axes: with n or m = 1 a (1, 1, D) shape would make KeOps read a parameter.
    x_i = LazyTensor(x.contiguous(), axis=0)  # (n, D) i-variable
    y_j = LazyTensor(y.contiguous(), axis=1)  # (m, D) j-variable
    d = pair_distance(x_i, y_j, norm)
    index = d.argmin(dim=1) if k == 1 else d.argKmin(k, dim=1)  # (n, 1) or (n, k), sorted
    return index.reshape(x.shape[0], k).to(torch.int64)


def knn_index(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    k: int,
    norm: int,
    x_lengths: Tensor | None = None,  # (B,)
    y_lengths: Tensor | None = None,  # (B,)
) -> Tensor:  # (B, N, k) int64
    with torch.no_grad():
        return per_item(_knn_item, x, y, k, norm, x_lengths, y_lengths)
