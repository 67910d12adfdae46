"""The ``reference`` backend of nearest, and the PyTorch twins of the nearest-neighbour, Chamfer and L2
data terms.

Dense and obviously correct: they form the matrix of squared distances as ``((x_i - y_j)**2).sum(-1)``
(differences, not the |x|² + |y|² - 2 x·y expansion, so clouds far from the origin keep their float32
accuracy). The twins of fl.nearest / fl.chamfer take memory O(B·N·M); ``knn_index`` (the backend) works a
block of rows at a time, O(rows·M).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import pair_distance, per_item

# Bytes of one (rows, M, D) block of the dense search.
CHUNK_BYTES = 32 * 2**20


def squared_distances(x: Tensor, y: Tensor) -> Tensor:  # x: (..., N, D), y: (..., M, D) -> (..., N, M)
    """|x_i - y_j|² for every pair."""
    return (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)


def _knn_item(x: Tensor, y: Tensor, k: int, norm: int) -> Tensor:  # (n, D), (m, D) -> (n, k)
    rows = max(1, CHUNK_BYTES // max(1, y.shape[0] * y.shape[1] * y.element_size()))
    out = []
    for i in range(0, x.shape[0], rows):
        d = pair_distance(x[i : i + rows, None, :], y[None, :, :], norm)  # (rows, m)
        if k == 1:  # min, as the twins below (the same tie-break)
            out.append(d.min(dim=1).indices.unsqueeze(1))
        else:
            out.append(d.topk(k, dim=1, largest=False, sorted=True).indices)
    return torch.cat(out)


def knn_index(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    k: int,
    norm: int,
    x_lengths: Tensor | None = None,  # (B,)
    y_lengths: Tensor | None = None,  # (B,)
) -> Tensor:  # (B, N, k) int64
    """PyTorch implementation of knn_index (the contract of fastlddmm/ops/nearest)."""
    with torch.no_grad():
        return per_item(_knn_item, x, y, k, norm, x_lengths, y_lengths)


def _mask_columns(d2: Tensor, y_lengths: Tensor | None) -> Tensor:
    """Puts +inf on the columns j >= y_lengths[b] of d2: (B, N, M), so padded y points are never nearest."""
    if y_lengths is None:
        return d2
    cols = torch.arange(d2.shape[-1], device=d2.device)
    invalid = cols[None, None, :] >= y_lengths[:, None, None]
    return d2.masked_fill(invalid, float("inf"))


def nearest(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    y_lengths: Tensor | None = None,  # (B,) int64
) -> tuple[Tensor, Tensor]:  # (…, N) squared distance, (…, N) int64 index
    """PyTorch implementation of nearest: for each x_i, |x_i - y_j*|² and j* = argmin_j |x_i - y_j|²."""
    d2 = _mask_columns(squared_distances(x, y), y_lengths)
    sq_dist, index = d2.min(dim=-1)
    return sq_dist, index


def _masked_mean(values: Tensor, lengths: Tensor | None) -> Tensor:  # values: (..., N) -> (...)
    if lengths is None:
        return values.mean(-1)
    valid = torch.arange(values.shape[-1], device=values.device)[None, :] < lengths[:, None]
    total = torch.where(valid, values, values.new_zeros(())).sum(-1)
    return total / lengths.to(values.dtype)


def chamfer(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    x_lengths: Tensor | None = None,  # (B,) int64
    y_lengths: Tensor | None = None,  # (B,) int64
) -> Tensor:  # () or (B,)
    """PyTorch implementation of chamfer: mean_i min_j |x_i - y_j|² + mean_j min_i |x_i - y_j|².

    With lengths (batched inputs only), item b uses x[b, :x_lengths[b]] and y[b, :y_lengths[b]].
    """
    d2 = squared_distances(x, y)
    if x_lengths is not None or y_lengths is not None:
        batch, n, m = d2.shape
        xl = x_lengths if x_lengths is not None else torch.full((batch,), n, device=d2.device)
        yl = y_lengths if y_lengths is not None else torch.full((batch,), m, device=d2.device)
        rows = torch.arange(n, device=d2.device)[None, :, None] >= xl[:, None, None]
        cols = torch.arange(m, device=d2.device)[None, None, :] >= yl[:, None, None]
        d2 = d2.masked_fill(rows | cols, float("inf"))
        return _masked_mean(d2.min(-1).values, xl) + _masked_mean(d2.min(-2).values, yl)
    return d2.min(-1).values.mean(-1) + d2.min(-2).values.mean(-1)


def l2(
    x: Tensor,  # (..., N, D)
    y: Tensor,  # (..., N, D), y_i corresponds to x_i
) -> Tensor:  # (...)
    """PyTorch implementation of the L2 data term with known correspondences: mean_i |x_i - y_i|²."""
    return (x - y).pow(2).sum(-1).mean(-1)
