"""The ``triton`` backend of nearest: streaming min / argmin (kernels/nearest.py), K = 1 and squared
Euclidean distance only (the dispatch table knows). All batch items go in one launch when no lengths are
given. CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was imported."""

from __future__ import annotations

from torch import Tensor

from ...kernels import nearest as _kernels
from . import per_item

cpu_unavailable_reason = _kernels.cpu_unavailable_reason


def knn_index(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    k: int,
    norm: int,
    x_lengths: Tensor | None = None,  # (B,)
    y_lengths: Tensor | None = None,  # (B,)
) -> Tensor:  # (B, N, 1) int64
    if k != 1 or norm != 2:
        raise ValueError(f"the Triton nearest-neighbour kernel finds K = 1 in squared Euclidean distance, got K={k}, norm={norm}")
    if x_lengths is None and y_lengths is None:
        return _kernels.nearest_index(x, y).unsqueeze(-1)
    return per_item(lambda xi, yi, kk, nn: _kernels.nearest_index(xi, yi).unsqueeze(-1), x, y, k, norm,
                    x_lengths, y_lengths)
