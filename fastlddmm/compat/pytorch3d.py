"""pytorch3d's ``knn_points``, ``knn_gather`` and ``chamfer_distance`` with fastlddmm underneath.

    from pytorch3d.ops import knn_points                 # before
    from pytorch3d.loss import chamfer_distance
    from fastlddmm.compat import knn_points, chamfer_distance   # after

Same signatures, return types and values as pytorch3d (read from pytorch3d/ops/knn.py and
pytorch3d/loss/chamfer.py, v0.7.x), plus a keyword-only ``backend=`` (a name of fl.backends() with a
nearest-neighbour search: "auto", "reference", "kdtree", "keops", "triton"; fastlddmm/dispatch.py decides).
Conventions followed (each one is tested against a brute-force twin in tests/test_compat.py):

knn_points(p1, p2, lengths1=None, lengths2=None, norm=2, K=1, version=-1, return_nn=False,
           return_sorted=True) -> KNN(dists, idx, knn), a namedtuple "KNN"
* Inputs are batched tensors ``(N, P1, D)``, ``(N, P2, D)``; ``lengths`` are ``(N,)`` integers in
  [0, P] (None: every cloud is full). Cloud n uses ``p1[n, :lengths1[n]]``, ``p2[n, :lengths2[n]]``.
* ``dists`` (N, P1, K): norm=2 gives *squared* Euclidean distances Σ_d (p1 - p2)²; norm=1 gives
  the L1 distance Σ_d |p1 - p2| (not squared). Same dtype as the points.
* ``idx`` (N, P1, K) int64, not differentiable; ``dists`` is differentiable in p1 and p2.
* Padding: where i >= lengths1[n] (a padded p1 point) or k >= lengths2[n] (fewer than K points in
  p2[n]), ``dists`` is 0 and ``idx`` is 0 (and no gradient flows from those entries).
* ``return_sorted=True``: neighbours in ascending distance (the padded k's last). With
  ``return_sorted=False`` pytorch3d promises no order; ours are sorted all the same.
  Ties between equidistant points may be broken in any order (as in pytorch3d).
* ``knn`` (N, P1, K, D) when ``return_nn`` (else None): ``knn_gather(p2, idx, lengths2)``, i.e.
  ``p2[n, idx[n, i, k]]``, set to 0 where k >= lengths2[n]; on a padded p1 row (i >= lengths1[n])
  idx is 0, so that row holds ``p2[n, 0]`` (pytorch3d's behaviour, kept). Differentiable in p2.
* ``version`` selects one of pytorch3d's CUDA kernels: accepted and ignored (results do not depend on it).

chamfer_distance(x, y, x_lengths=None, y_lengths=None, x_normals=None, y_normals=None, weights=None,
                 batch_reduction="mean", point_reduction="mean", norm=2, single_directional=False,
                 abs_cosine=True) -> (loss, loss_normals)
* Per point: cham_x[n, i] = dists of x[n, i] to its nearest y (squared L2 for norm=2, L1 for
  norm=1), 0 on padded points; the same from y to x unless ``single_directional``.
* Normals (both given, else ``loss_normals`` is None): 1 - |cos(n_x, n_y(nn))| (``abs_cosine``) or
  1 - cos(...), with torch's ``cosine_similarity(..., eps=1e-6)``, n_y(nn) the normal of the nearest
  neighbour; 0 on padded points.
* ``weights`` (N,) >= 0 multiply every per-point term of cloud n. If they sum to 0, pytorch3d
  returns early from each direction ``(0·Σx, 0·Σx)`` (a zero that keeps the graph): scalars when
  batch_reduction is set, an (N, N) zero matrix otherwise (pytorch3d's broadcasting, kept as is);
  ``loss_normals`` is then that zero, not None, and both are combined as below.
* point_reduction: "sum" sums over points, "mean" divides the sum by max(lengths, 1); None keeps the
  per-point terms and requires batch_reduction=None: then ``loss`` is the pair (cham_x (N, P1),
  cham_y (N, P2)) (just cham_x with ``single_directional``) and ``loss_normals`` likewise.
* batch_reduction: "sum" over clouds, "mean" divides that sum by N (by Σ weights when weights
  are given), None keeps (N,). The two directions are reduced separately, then added.
* Inputs must be (N, P, D) tensors (pytorch3d's Pointclouds objects are not supported here).
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ..ops import nearest as _nearest

KNN = collections.namedtuple("KNN", "dists idx knn")

_NORMS = _nearest.NORMS


# ------------------------------------------------------------------------------------------------
# Input checks, in pytorch3d's terms
# ------------------------------------------------------------------------------------------------


def _check_cloud(t, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (N, P, D), got {type(t).__name__} "
            "(pytorch3d Pointclouds objects are not supported: pass points_padded() and num_points_per_cloud())"
        )
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape (N, P, D), got {tuple(t.shape)}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}")
    return t


def _check_lengths(lengths, name: str, points: Tensor) -> Tensor:
    N, P = points.shape[0], points.shape[1]
    if lengths is None:
        return torch.full((N,), P, dtype=torch.int64, device=points.device)
    if not isinstance(lengths, Tensor):
        raise TypeError(f"{name} must be a LongTensor of shape ({N},) or None, got {type(lengths).__name__}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {lengths.dtype}")
    if lengths.shape != (N,):
        raise ValueError(f"{name} must have shape ({N},), got {tuple(lengths.shape)}")
    if N and (int(lengths.min()) < 0 or int(lengths.max()) > P):
        raise ValueError(f"{name} must lie in [0, {P}], got values in [{int(lengths.min())}, {int(lengths.max())}]")
    return lengths.to(device=points.device, dtype=torch.int64)


def _check_pair(p1: Tensor, p2: Tensor, n1: str, n2: str) -> None:
    if p1.shape[0] != p2.shape[0]:
        raise ValueError(f"{n1} and {n2} must have the same batch dimension, got {p1.shape[0]} and {p2.shape[0]}")
    if p1.shape[2] != p2.shape[2]:
        raise ValueError(f"{n1} and {n2} must have the same point dimension, got {p1.shape[2]} and {p2.shape[2]}")
    if p1.dtype != p2.dtype:
        raise TypeError(f"{n1} and {n2} must have the same dtype, got {p1.dtype} and {p2.dtype}")
    if p1.device != p2.device:
        raise ValueError(f"{n1} and {n2} must be on the same device, got {p1.device} and {p2.device}")


# ------------------------------------------------------------------------------------------------
# knn_gather, knn_points
# ------------------------------------------------------------------------------------------------


def knn_gather(
    x: Tensor,  # (N, M, U)
    idx: Tensor,  # (N, L, K) int64
    lengths: Tensor | None = None,  # (N,) int, in [0, M]
) -> Tensor:  # (N, L, K, U)
    """out[n, l, k] = x[n, idx[n, l, k]], and 0 where k >= lengths[n] (pytorch3d's knn_gather)."""
    N, M, U = x.shape
    if idx.dim() != 3 or idx.shape[0] != N:
        raise ValueError(f"idx must have shape ({N}, L, K), got {tuple(idx.shape)}")
    _, L, K = idx.shape
    lengths = _check_lengths(lengths, "lengths", x)
    out = x[:, None, :, :].expand(N, L, M, U).gather(2, idx[:, :, :, None].expand(N, L, K, U))
    absent = lengths[:, None] <= torch.arange(K, device=x.device)[None]  # (N, K): fewer than K points
    return torch.where(absent[:, None, :, None], out.new_zeros(()), out)


def knn_points(
    p1: Tensor,  # (N, P1, D)
    p2: Tensor,  # (N, P2, D)
    lengths1: Tensor | None = None,  # (N,) int in [0, P1]
    lengths2: Tensor | None = None,  # (N,) int in [0, P2]
    norm: int = 2,
    K: int = 1,
    version: int = -1,
    return_nn: bool = False,
    return_sorted: bool = True,
    *,
    backend: str = "auto",
) -> KNN:  # dists (N, P1, K), idx (N, P1, K) int64, knn (N, P1, K, D) or None
    """The K nearest neighbours in p2 of each point of p1, with pytorch3d's conventions (module docstring).

    Only the indices come from the search (fastlddmm/ops/nearest: the backend fastlddmm.dispatch picks, or
    the one named); the distances are then recomputed in PyTorch from the gathered points, so they are
    exact and differentiable in p1 and p2 whichever backend found the neighbours.
    """
    _check_cloud(p1, "p1")
    _check_cloud(p2, "p2")
    _check_pair(p1, p2, "p1", "p2")
    if norm not in _NORMS or isinstance(norm, bool):
        raise ValueError(f"norm must be 1 or 2, got {norm!r}")
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    dispatch.check_name(backend)
    lengths1 = _check_lengths(lengths1, "lengths1", p1)
    lengths2 = _check_lengths(lengths2, "lengths2", p2)
    N, P1, _ = p1.shape

    idx = _nearest.knn_index(p1, p2, k=K, norm=norm, x_lengths=lengths1, y_lengths=lengths2, backend=backend)
    valid = (torch.arange(P1, device=p1.device)[None, :, None] < lengths1[:, None, None]) & (
        torch.arange(K, device=p1.device)[None, None, :] < lengths2[:, None, None]
    )  # (N, P1, K)
    dists = torch.where(valid, _nearest.gather_distances(p1, p2, idx, norm), p1.new_zeros(()))
    knn = knn_gather(p2, idx, lengths2) if return_nn else None
    return KNN(dists=dists, idx=idx, knn=knn)


# ------------------------------------------------------------------------------------------------
# chamfer_distance
# ------------------------------------------------------------------------------------------------


def _check_reductions(batch_reduction, point_reduction) -> None:
    if batch_reduction is not None and batch_reduction not in ("mean", "sum"):
        raise ValueError(f'batch_reduction must be one of ["mean", "sum"] or None, got {batch_reduction!r}')
    if point_reduction is not None and point_reduction not in ("mean", "sum"):
        raise ValueError(f'point_reduction must be one of ["mean", "sum"] or None, got {point_reduction!r}')
    if point_reduction is None and batch_reduction is not None:
        raise ValueError(f"batch_reduction must be None when point_reduction is None, got {batch_reduction!r}")


def _one_direction(
    x: Tensor,  # (N, P1, D)
    y: Tensor,  # (N, P2, D)
    x_lengths: Tensor,  # (N,)
    y_lengths: Tensor,  # (N,)
    x_normals: Tensor | None,  # (N, P1, D)
    y_normals: Tensor | None,  # (N, P2, D)
    weights: Tensor | None,  # (N,)
    batch_reduction: str | None,
    point_reduction: str | None,
    norm: int,
    abs_cosine: bool,
    backend: str,
) -> tuple[Tensor, Tensor | None]:
    """The x -> y half of pytorch3d's chamfer_distance, reductions included."""
    N, P1, _ = x.shape
    if weights is not None and float(weights.sum()) == 0.0:
        # pytorch3d's early exit: a zero that keeps x in the graph, for the loss and for the normals
        # alike; (N,) * (N, 1) broadcasts to (N, N) there, and we keep that shape.
        zero = x.sum((1, 2)) * weights.view(N, 1) * 0.0
        if batch_reduction is not None:
            zero = zero.sum()
        return zero, zero
    with_normals = x_normals is not None and y_normals is not None
    padded = torch.arange(P1, device=x.device)[None] >= x_lengths[:, None]  # (N, P1)
    zero = x.new_zeros(())

    nn = knn_points(x, y, x_lengths, y_lengths, norm=norm, K=1, backend=backend)
    cham = torch.where(padded, zero, nn.dists[..., 0])  # (N, P1)
    if weights is not None:
        cham = cham * weights.view(N, 1)
    cham_normals = x.new_zeros(())
    if with_normals:
        near = knn_gather(y_normals, nn.idx, y_lengths)[..., 0, :]  # (N, P1, D)
        cos = F.cosine_similarity(x_normals, near, dim=2, eps=1e-6)
        cham_normals = torch.where(padded, zero, 1 - (cos.abs() if abs_cosine else cos))
        if weights is not None:
            cham_normals = cham_normals * weights.view(N, 1)

    if point_reduction is not None:
        cham = cham.sum(1)  # (N,)
        if with_normals:
            cham_normals = cham_normals.sum(1)
        if point_reduction == "mean":
            count = x_lengths.clamp(min=1)
            cham = cham / count
            if with_normals:
                cham_normals = cham_normals / count
        if batch_reduction is not None:
            cham = cham.sum()
            if with_normals:
                cham_normals = cham_normals.sum()
            if batch_reduction == "mean":
                div = weights.sum() if weights is not None else max(N, 1)
                cham = cham / div
                if with_normals:
                    cham_normals = cham_normals / div
    return cham, (cham_normals if with_normals else None)


def chamfer_distance(
    x: Tensor,  # (N, P1, D)
    y: Tensor,  # (N, P2, D)
    x_lengths: Tensor | None = None,  # (N,) int in [0, P1]
    y_lengths: Tensor | None = None,  # (N,) int in [0, P2]
    x_normals: Tensor | None = None,  # (N, P1, D)
    y_normals: Tensor | None = None,  # (N, P2, D)
    weights: Tensor | None = None,  # (N,) non-negative
    batch_reduction: str | None = "mean",
    point_reduction: str | None = "mean",
    norm: int = 2,
    single_directional: bool = False,
    abs_cosine: bool = True,
    *,
    backend: str = "auto",
):
    """pytorch3d's Chamfer distance between two batches of clouds: ``(loss, loss_normals)``.

    With the defaults (norm=2, "mean" reductions) it is the batch mean of fl.chamfer. Every
    convention (padding, reductions, weights, normals) is listed in the module docstring.
    """
    _check_reductions(batch_reduction, point_reduction)
    if norm not in _NORMS or isinstance(norm, bool):
        raise ValueError(f"norm must be 1 or 2, got {norm!r}")
    _check_cloud(x, "x")
    _check_cloud(y, "y")
    _check_pair(x, y, "x", "y")
    dispatch.check_name(backend)
    x_lengths = _check_lengths(x_lengths, "x_lengths", x)
    y_lengths = _check_lengths(y_lengths, "y_lengths", y)
    for normals, points, name in ((x_normals, x, "x_normals"), (y_normals, y, "y_normals")):
        if normals is not None and (not isinstance(normals, Tensor) or normals.shape != points.shape):
            raise ValueError(f"{name} must be a tensor of shape {tuple(points.shape)} or None")
    N = x.shape[0]
    if weights is not None:
        if not isinstance(weights, Tensor) or weights.shape != (N,):
            raise ValueError(f"weights must be a tensor of shape ({N},) or None")
        if not bool((weights >= 0).all()):
            raise ValueError("weights cannot be negative")

    args = (batch_reduction, point_reduction, norm, abs_cosine, backend)
    cham_x, normals_x = _one_direction(x, y, x_lengths, y_lengths, x_normals, y_normals, weights, *args)
    if single_directional:
        return cham_x, normals_x
    cham_y, normals_y = _one_direction(y, x, y_lengths, x_lengths, y_normals, x_normals, weights, *args)
    if point_reduction is not None:
        return cham_x + cham_y, (normals_x + normals_y if normals_x is not None else None)
    return (cham_x, cham_y), ((normals_x, normals_y) if normals_x is not None else None)
