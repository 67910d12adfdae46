"""The nearest op: the indices of the K nearest neighbours (fl.nearest, fl.chamfer, compat.knn_points).

The room (which backend runs is decided in fastlddmm/dispatch.py, rule ``_auto_nearest``):

    reference.py    dense search, a block of rows at a time (O(rows·M) memory), and the PyTorch twins of
                    fl.nearest / fl.chamfer / the L2 data term: the ground truth
    cpu.py          C++/OpenMP exact k-d tree (csrc/nearest/), K >= 1, L1 and L2, D <= 64
    kdtree.py       scipy's exact cKDTree (float64 coordinates), torch.get_num_threads() workers
    keops.py        KeOps ArgMin / ArgKMin reductions, memory O(N + M)
    triton.py       streaming Triton min / argmin (kernels/nearest.py): K = 1, squared Euclidean only

The contract: each backend module has

    knn_index(x (B, N, D), y (B, M, D), k, norm, x_lengths (B,) | None, y_lengths (B,) | None)
        -> (B, N, k) int64, no gradient

with neighbours sorted by increasing distance (squared Euclidean for norm=2, L1 for norm=1), and 0 in
the padded places: rows i >= x_lengths[b], and columns k >= y_lengths[b] when cloud b has fewer than k
points (pytorch3d's convention). Ties may be broken differently by different backends. Distances are
never taken from a backend: the front-ends recompute them from the indices with ``gather_distances``,
the reference's formula, so values and gradients are the reference's whenever the same neighbours are
found.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

NORMS = (1, 2)


def pair_distance(x: Tensor, y: Tensor, norm: int) -> Tensor:  # (..., D), (..., D) -> (...)
    """The distance the neighbours are ranked by: squared Euclidean (norm=2) or L1 (norm=1), from
    coordinate differences (accurate far from the origin)."""
    diff = x - y
    return (diff**2).sum(-1) if norm == 2 else diff.abs().sum(-1)  # ** and abs(): torch and KeOps alike


def gather_distances(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    index: Tensor,  # (B, N, K) int64
    norm: int = 2,
) -> Tensor:  # (B, N, K)
    """d(x_i, y_{index[i, k]}), differentiable in x and y (the gradient flows to the neighbours found)."""
    batch, n, k = index.shape
    neighbours = torch.gather(y, 1, index.reshape(batch, n * k, 1).expand(-1, -1, y.shape[-1]))
    return pair_distance(x.unsqueeze(-2), neighbours.reshape(batch, n, k, -1), norm)


def item_lengths(lengths: Tensor | None, full: int, batch: int) -> list[int]:
    return [full] * batch if lengths is None else [int(v) for v in lengths.tolist()]


def per_item(
    find: Callable[[Tensor, Tensor, int, int], Tensor],  # (x (n, D), y (m, D), k <= m, norm) -> (n, k)
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    k: int,
    norm: int,
    x_lengths: Tensor | None,
    y_lengths: Tensor | None,
) -> Tensor:  # (B, N, k)
    """The batched contract from a finder of one cloud pair: items are sliced to their lengths and the
    result padded with 0 (rows past x_lengths, neighbours past y_lengths)."""
    batch, n = x.shape[:2]
    out = torch.zeros((batch, n, k), dtype=torch.int64, device=x.device)
    xl = item_lengths(x_lengths, n, batch)
    yl = item_lengths(y_lengths, y.shape[1], batch)
    for b in range(batch):
        kk = min(k, yl[b])
        if xl[b] and kk:
            out[b, : xl[b], :kk] = find(x[b, : xl[b]].detach(), y[b, : yl[b]].detach(), kk, norm)
    return out


def knn_index(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    *,
    k: int = 1,
    norm: int = 2,
    x_lengths: Tensor | None = None,  # (B,) int64
    y_lengths: Tensor | None = None,  # (B,) int64
    backend: str = "auto",
) -> Tensor:  # (B, N, k) int64
    """The contract's knn_index, by the backend fastlddmm.dispatch picks for this problem (inputs checked
    by the caller: fl.nearest, fl.chamfer, compat.knn_points)."""
    from ... import dispatch

    pr = dispatch.problem(x, y, k=k, norm=norm)
    impl = dispatch.implementation("nearest", backend, pr)
    return impl.knn_index(x.detach(), y.detach(), k, norm, x_lengths, y_lengths)
