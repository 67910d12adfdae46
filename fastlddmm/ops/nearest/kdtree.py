"""The ``kdtree`` backend of nearest: scipy's exact cKDTree (float64 coordinates).

Queries run on torch.get_num_threads() workers, so torch.set_num_threads and ``batch --cpus-per-pair``
mean what they say here too. CUDA tensors go through the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import per_item


def _knn_item(x: Tensor, y: Tensor, k: int, norm: int) -> Tensor:  # (n, D), (m, D) -> (n, k)
    from scipy.spatial import cKDTree

    xs = x.cpu().to(torch.float64).numpy()
    ys = y.cpu().to(torch.float64).numpy()
    # p = 1: L1; p = 2: Euclidean, which ranks neighbours as the squared distance does.
    _, index = cKDTree(ys).query(xs, k=k, p=norm, workers=torch.get_num_threads())
    return torch.from_numpy(index.reshape(xs.shape[0], k)).to(device=x.device, dtype=torch.int64)


def knn_index(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    k: int,
    norm: int,
    x_lengths: Tensor | None = None,  # (B,)
    y_lengths: Tensor | None = None,  # (B,)
) -> Tensor:  # (B, N, k) int64
    return per_item(_knn_item, x, y, k, norm, x_lengths, y_lengths)
