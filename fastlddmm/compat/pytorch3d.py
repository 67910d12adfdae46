"""pytorch3d's ``knn_points``, ``knn_gather`` and ``chamfer_distance`` with fastlddmm underneath.

    from pytorch3d.ops import knn_points                 # before
    from pytorch3d.loss import chamfer_distance
    from fastlddmm.compat import knn_points, chamfer_distance   # after

Same signatures, return types, values, gradients, empty-input results and exception types as pytorch3d
0.7.9 (read from pytorch3d/loss/chamfer.py, pytorch3d/ops/knn.py, csrc/knn/knn_cpu.cpp and
pytorch3d/structures/pointclouds.py at facebookresearch/pytorch3d@9381c40), plus a keyword-only
``backend=`` (a name of fl.backends() with a nearest-neighbour search: "auto", "reference", "kdtree",
"keops", "triton"; fastlddmm/dispatch.py decides). pytorch3d is never imported. Each convention below is
tested against a brute-force twin in tests/test_compat.py.

Inputs
 1. Point clouds are ``(N, P, D)`` tensors, or pytorch3d ``Pointclouds`` objects: any object (not a
    tensor) with ``points_padded()`` and ``num_points_per_cloud()`` is read as pytorch3d's
    ``_handle_pointcloud_input`` reads a Pointclouds: points = ``points_padded()``, lengths =
    ``num_points_per_cloud()`` and normals = ``normals_padded()`` (None when it has none, or no such
    method), *replacing* the ``x_lengths`` / ``x_normals`` arguments, which are then ignored (as in
    pytorch3d). knn_points takes such objects too (pytorch3d's does not: an extension), the same way.
 2. ``lengths`` (N,) integers in [0, P] (None: every cloud is full); cloud n is ``x[n, :lengths[n]]``.
 3. Where x has normals and y has none (or the reverse), there is no normal term (``loss_normals`` is None).

knn_points(p1, p2, lengths1=None, lengths2=None, norm=2, K=1, version=-1, return_nn=False,
           return_sorted=True) -> KNN(dists, idx, knn), a namedtuple "KNN"
 4. ``dists`` (N, P1, K): norm=2 gives squared Euclidean distances Σ_d (p1 - p2)²; norm=1 the L1
    distance Σ_d |p1 - p2| (not squared); same dtype as the points; differentiable in p1 and p2.
    The norm=1 gradient takes pytorch3d's sign at a tie: d|t|/dt = -1 at t = 0 (its kernel's
    ``p1 > p2 ? 1 : -1``), not torch's 0.
 5. ``idx`` (N, P1, K) int64, not differentiable.
 6. Padding: where i >= lengths1[n] or k >= lengths2[n] (fewer than K points in p2[n]), ``dists`` is 0
    and ``idx`` is 0, and no gradient flows from those entries. So a cloud of p2 with no point gives
    distance 0 (not +inf) to every point of p1.
 7. Neighbours in ascending distance (``return_sorted=False``: pytorch3d promises no order; ours are
    sorted all the same). Ties between equidistant points may be broken in any order.
 8. ``knn`` (N, P1, K, D) when ``return_nn`` (else None) = ``knn_gather(p2, idx, lengths2)``; on a
    padded p1 row idx is 0, so that row holds ``p2[n, 0]`` where k < lengths2[n] (kept as in pytorch3d).
 9. ``version`` picks one of pytorch3d's CUDA kernels: accepted, ignored (the results do not depend on it).
10. Empty inputs: an empty batch (N = 0) or clouds with no points (P1 = 0 or P2 = 0) give the
    empty / zero results of 4-6, with a graph to p1 and p2 (their gradient is 0), except where
    pytorch3d raises, and there we raise the same type with a message saying why: RuntimeError for
    N = 0 with K > 1 and return_sorted (pytorch3d takes ``lengths2.min()`` of an empty tensor), and
    for return_nn with N = 0 or with P2 = 0 < P1 (see knn_gather).

knn_gather(x, idx, lengths=None) -> (N, L, K, U)
11. ``out[n, l, k] = x[n, idx[n, l, k]]``, 0 where k >= lengths[n]; differentiable in x. As pytorch3d:
    RuntimeError for N = 0 (it takes ``lengths.min()`` of an empty tensor) and for an index out of
    range, e.g. any index into a cloud tensor with M = 0 points; ValueError for a batch mismatch.

chamfer_distance(x, y, x_lengths=None, y_lengths=None, x_normals=None, y_normals=None, weights=None,
                 batch_reduction="mean", point_reduction="mean", norm=2, single_directional=False,
                 abs_cosine=True) -> (loss, loss_normals)
12. Per point: cham_x[n, i] = dists of x[n, i] to its nearest y (4; 0 where y[n] has no point),
    0 on padded points; the same from y to x unless ``single_directional``.
13. Normals (both present, 3): 1 - |cos(n_x, n_y(nn))| (``abs_cosine``) or 1 - cos(...), with torch's
    ``cosine_similarity(..., eps=1e-6)`` and n_y(nn) = knn_gather(y_normals, idx, y_lengths), so 1
    where y[n] has no point (cos with a zero normal is 0); 0 on padded points.
14. ``weights`` (N,) >= 0 multiply every per-point term of cloud n (in the points' dtype).
15. All-zero weights: pytorch3d's early exit, per direction, before any search: ``(0·Σ_points x, 0·Σ x)``
    with the weights as an (N, 1) column, i.e. an (N, N) zero matrix (a zero that keeps the graph);
    ``loss_normals`` is then that zero too (not None), even without normals, except with "max"
    (both directions: None). The batch "mean" of it divides by 1.
16. point_reduction: "sum" sums over points; "mean" divides that by max(lengths, 1); "max" (pytorch3d
    >= 0.7.8, the directed Hausdorff distance) takes the max over the points (padded points count as
    0), and the two directions are combined by ``torch.maximum`` (single_directional: x -> y alone);
    None keeps the per-point terms (N, P1), (N, P2) as the pair ``(cham_x, cham_y)`` (just cham_x with
    ``single_directional``), and ``loss_normals`` likewise. Otherwise the two directions are added.
17. "max" refuses normals: ValueError when x_normals or y_normals is passed; AssertionError when they
    come from Pointclouds objects on both sides (pytorch3d's ``assert not return_normals``; ours is
    also a ValueError). "max" over a cloud tensor with no points (P1 = 0, or P2 = 0 both ways) is
    pytorch3d's IndexError (the max of an empty dimension); loss_normals is None with "max".
18. batch_reduction, applied after the directions are combined: "sum" over clouds, "mean" divides that
    sum by N (max(N, 1): 0 for an empty batch), or by Σ weights when weights are given (1 if that is 0);
    None keeps (N,). point_reduction=None requires batch_reduction=None.
19. Empty inputs: an empty batch (N = 0) gives 0 (batch reduced) or (0,)-shaped terms; clouds with no
    points give 0 for their direction (12). As in pytorch3d: RuntimeError for an empty batch with
    explicit x_lengths / y_lengths (its ``lengths.max()`` of an empty tensor) or with normals on both
    sides (its knn_gather), and for normals on both sides when one cloud tensor has no points and the
    other has some (knn_gather's index out of range). pytorch3d's own tests hold: Pointclouds of
    [(0, 3), (10, 3)] zeros against 40 ones -> [0, 6] (batch_reduction=None); two empty Pointclouds -> 0.

Errors, in pytorch3d's words and types (our messages add the values; tests written with
``assertRaisesRegex`` against pytorch3d pass):
20. ValueError, with pytorch3d's message: 'batch_reduction must be one of ["mean", "sum"] or None',
    'point_reduction must be one of ["mean", "sum", "max"] or None', "Batch reduction must be None if
    point_reduction is None", "Support for 1 or 2 norm." (norm must == 1 or 2; knn_points too),
    'Normals must be None if point_reduction is "max"', "Expected points to be of shape (N, P, D)",
    "Expected lengths to be of shape (N,)", "A length value was too long", "Expected normals to be of
    shape (N, P, 3", "y does not have the correct shape.", "weights must be of shape (N,).", "weights
    cannot be negative.", "pts1 and pts2 must have the same batch dimension." / "... point dimension."
    (knn_points), "x and idx must have same batch dimension." (knn_gather).
21. Not a tensor (nor a Pointclouds) where one is expected: NotATensorError, which is a ValueError
    (pytorch3d's chamfer: "The input pointclouds should be either Pointclouds objects or torch.Tensor of
    shape (minibatch, num_points, 3).") and an AttributeError (what pytorch3d's knn_points and its
    lengths / normals / weights checks raise on such an object: "'list' object has no attribute
    'shape'") and a TypeError.
22. Where pytorch3d only fails inside torch or its C++ kernel, with a RuntimeError (or IndexError), we
    check first and raise a class that is that type and ours: InconsistentInputsError (ValueError,
    RuntimeError) for normals whose 3-D shape does not fit their points, for x and y on different
    devices, and for weights with more than N entries; InputDtypeError (TypeError, RuntimeError) for
    points that are not float32 / float64, x and y of different dtypes, and non-integer lengths;
    BadShapeError (ValueError, IndexError) for knn_points points that are not 3-D and 0-d weights.
23. Stricter than pytorch3d (it reads them unchecked): negative lengths (ValueError), lengths of
    knn_points outside [0, P] or of the wrong shape (ValueError, pytorch3d's chamfer wording), K < 1
    (ValueError; pytorch3d's kernel is undefined there).
24. More permissive: float64 on the CPU (pytorch3d's CPU kernel is float32 only) and lengths of any
    integer dtype; float64 gradients are computed in float64 (pytorch3d casts them to float32).
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import dispatch
from ..ops import nearest as _nearest

KNN = collections.namedtuple("KNN", "dists idx knn")

_POINT_DTYPES = (torch.float32, torch.float64)


# ------------------------------------------------------------------------------------------------
# Exceptions: pytorch3d's types, so that code catching what pytorch3d raises catches ours
# ------------------------------------------------------------------------------------------------


class NotATensorError(ValueError, TypeError, AttributeError):
    """A tensor (or a Pointclouds object) was expected: ValueError as pytorch3d's chamfer_distance, AttributeError
    as pytorch3d's knn_points and its lengths / normals / weights checks ('list' object has no attribute ...)."""


class InconsistentInputsError(ValueError, RuntimeError):
    """Inputs that do not fit together where pytorch3d fails inside torch or its kernel with a RuntimeError."""


class InputDtypeError(TypeError, RuntimeError):
    """A dtype that pytorch3d's kernels refuse with a RuntimeError ("expected scalar type ...")."""


class BadShapeError(ValueError, IndexError):
    """Too few dimensions where pytorch3d indexes the shape (an IndexError there)."""


class MaxWithNormalsError(AssertionError, ValueError):
    """point_reduction="max" with normals on both sides, from Pointclouds objects (pytorch3d: a bare assert)."""


def _not_a_tensor(obj, name: str, what: str, attribute: str) -> NotATensorError:
    kind = type(obj).__name__
    return NotATensorError(f"{name} must be {what}, got {kind} ('{kind}' object has no attribute '{attribute}')")


# ------------------------------------------------------------------------------------------------
# Reading point clouds, in pytorch3d's order and words
# ------------------------------------------------------------------------------------------------


def is_pointclouds(obj) -> bool:
    """True for a pytorch3d Pointclouds, or any object with its interface (not a tensor)."""
    return not torch.is_tensor(obj) and all(
        callable(getattr(obj, method, None)) for method in ("points_padded", "num_points_per_cloud"))


def _check_lengths(lengths, name: str, points: Tensor, *, empty_batch_raises: bool = False) -> Tensor:  # -> (N,) int64
    N, P = points.shape[0], points.shape[1]
    if not torch.is_tensor(lengths):
        raise _not_a_tensor(lengths, name, f"a LongTensor of shape ({N},) or None", "ndim")
    if lengths.ndim != 1 or lengths.shape[0] != N:
        raise ValueError(f"Expected lengths to be of shape (N,): {name} must have shape ({N},), got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise InputDtypeError(f"{name} must hold integers (expected scalar type Long), got {lengths.dtype}")
    if N == 0:
        if empty_batch_raises:  # chamfer_distance's tensor inputs (19)
            raise RuntimeError(
                f"{name} given for an empty batch (N = 0): pytorch3d raises here (its check lengths.max() > P takes "
                "the max of an empty tensor: 'max(): Expected reduction dim to be specified for input.numel() == 0'); "
                f"pass {name}=None for an empty batch")
        return lengths.to(device=points.device, dtype=torch.int64)
    if int(lengths.max()) > P:
        raise ValueError(f"A length value was too long: {name} must lie in [0, {P}], got a max of {int(lengths.max())}")
    if int(lengths.min()) < 0:
        raise ValueError(f"{name} must lie in [0, {P}], got a min of {int(lengths.min())}")
    return lengths.to(device=points.device, dtype=torch.int64)


def _check_points(points: Tensor, name: str, *, indexed: bool = False) -> Tensor:
    if points.ndim != 3:
        cls = BadShapeError if indexed else ValueError
        raise cls(f"Expected points to be of shape (N, P, D): {name} has shape {tuple(points.shape)}")
    if points.dtype not in _POINT_DTYPES:
        raise InputDtypeError(f"{name} must be float32 or float64, got {points.dtype}")
    return points


def _read_cloud(points, lengths, normals, name: str, *, for_chamfer: bool):
    """pytorch3d's _handle_pointcloud_input: (points (N, P, D), lengths (N,) int64, normals or None)."""
    if is_pointclouds(points):
        X = points.points_padded()
        if not torch.is_tensor(X):
            raise _not_a_tensor(X, f"{name}.points_padded()", "a tensor of shape (N, P, D)", "shape")
        _check_points(X, f"{name}.points_padded()")
        read_normals = getattr(points, "normals_padded", None)
        normals = read_normals() if callable(read_normals) else None
        lengths = _check_lengths(points.num_points_per_cloud(), f"{name}.num_points_per_cloud()", X)
        return X, lengths, normals
    if not torch.is_tensor(points):
        if for_chamfer:
            raise NotATensorError(
                "The input pointclouds should be either Pointclouds objects or torch.Tensor of shape "
                f"(minibatch, num_points, 3). Got {type(points).__name__} for {name} "
                f"('{type(points).__name__}' object has no attribute 'shape')")
        raise _not_a_tensor(points, name, "a torch.Tensor of shape (N, P, D) or a Pointclouds object", "shape")
    _check_points(points, name, indexed=not for_chamfer)
    if lengths is None:
        lengths = torch.full((points.shape[0],), points.shape[1], dtype=torch.int64, device=points.device)
    else:
        lengths = _check_lengths(lengths, f"{name}_lengths" if for_chamfer else f"lengths{name[-1]}", points,
                                 empty_batch_raises=for_chamfer)
    if normals is not None:
        if not torch.is_tensor(normals):
            raise _not_a_tensor(normals, f"{name}_normals", "a tensor of shape (N, P, D) or None", "ndim")
        if normals.ndim != 3:
            raise ValueError(f"Expected normals to be of shape (N, P, 3): {name}_normals has shape {tuple(normals.shape)}")
    return points, lengths, normals


def _check_pair(p1: Tensor, p2: Tensor, n1: str, n2: str) -> None:
    if p1.dtype != p2.dtype:
        raise InputDtypeError(f"{n1} and {n2} must have the same dtype, got {p1.dtype} and {p2.dtype}")
    if p1.device != p2.device:
        raise InconsistentInputsError(f"{n1} and {n2} must be on the same device, got {p1.device} and {p2.device}")


def _check_norm(norm) -> int:
    if not (norm == 1 or norm == 2):  # pytorch3d's test, word for word: 2.0 and True pass it
        raise ValueError(f"Support for 1 or 2 norm. Got norm={norm!r}")
    return int(norm)


def _graph_zero(*tensors: Tensor) -> Tensor:
    """0, in the graph of every tensor (as an autograd Function's output is, even when empty)."""
    return sum(t.sum() for t in tensors) * 0.0


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
    _N, L, K = idx.shape
    if N != _N:
        raise ValueError(f"x and idx must have same batch dimension. Got {N} and {_N}")
    if lengths is None:
        lengths = torch.full((N,), M, dtype=torch.int64, device=x.device)
    if N == 0:
        raise RuntimeError(
            "knn_gather of an empty batch (N = 0): pytorch3d raises here (it takes lengths.min() of an empty tensor: "
            "'min(): Expected reduction dim to be specified for input.numel() == 0')")
    if M == 0 and idx.numel():
        raise RuntimeError(
            f"knn_gather from clouds with no points (x has shape {tuple(x.shape)}) at {L} x {K} indices: pytorch3d "
            "raises here (torch.gather: 'index 0 is out of bounds for dimension 1 with size 0')")
    out = x[:, :, None, :].expand(N, M, K, U).gather(1, idx[:, :, :, None].expand(N, L, K, U))
    absent = lengths.to(x.device)[:, None] <= torch.arange(K, device=x.device)[None]  # (N, K): fewer than K points
    return torch.where(absent[:, None, :, None], out.new_zeros(()), out)


def _distances(p1: Tensor, p2: Tensor, idx: Tensor, norm: int) -> Tensor:  # (N, P1, D), (N, P2, D), (N, P1, K) -> (N, P1, K)
    """d(p1[n, i], p2[n, idx[n, i, k]]); for norm 1 the subgradient of |t| at 0 is -1, as pytorch3d's kernel."""
    N, P1, K = idx.shape
    D = p1.shape[2]
    near = torch.gather(p2, 1, idx.reshape(N, P1 * K, 1).expand(N, P1 * K, D)).reshape(N, P1, K, D)
    diff = p1[:, :, None, :] - near
    if norm == 2:
        return (diff * diff).sum(-1)
    return torch.where(diff > 0, diff, -diff).sum(-1)


def knn_points(
    p1: Tensor,  # (N, P1, D), or a Pointclouds
    p2: Tensor,  # (N, P2, D), or a Pointclouds
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
    p1, lengths1, _ = _read_cloud(p1, lengths1, None, "p1", for_chamfer=False)
    p2, lengths2, _ = _read_cloud(p2, lengths2, None, "p2", for_chamfer=False)
    if p1.shape[0] != p2.shape[0]:
        raise ValueError(f"pts1 and pts2 must have the same batch dimension. Got {p1.shape[0]} and {p2.shape[0]}")
    if p1.shape[2] != p2.shape[2]:
        raise ValueError(f"pts1 and pts2 must have the same point dimension. Got {p1.shape[2]} and {p2.shape[2]}")
    _check_pair(p1, p2, "p1", "p2")
    norm = _check_norm(norm)
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be a positive integer, got {K!r}")
    dispatch.check_name(backend)
    N, P1, _ = p1.shape
    P2 = p2.shape[1]
    if N == 0 and K > 1 and return_sorted:
        raise RuntimeError(
            "knn_points of an empty batch (N = 0) with K > 1 and return_sorted=True: pytorch3d raises here (it takes "
            "lengths2.min() of an empty tensor: 'min(): Expected reduction dim to be specified for input.numel() == 0')")

    if N == 0 or P1 == 0 or P2 == 0:  # nothing to search: every entry is padding (6)
        idx = torch.zeros((N, P1, K), dtype=torch.int64, device=p1.device)
        dists = p1.new_zeros((N, P1, K)) + _graph_zero(p1, p2)
    else:
        idx = _nearest.knn_index(p1, p2, k=K, norm=norm, x_lengths=lengths1, y_lengths=lengths2, backend=backend)
        valid = (torch.arange(P1, device=p1.device)[None, :, None] < lengths1[:, None, None]) & (
            torch.arange(K, device=p1.device)[None, None, :] < lengths2[:, None, None]
        )  # (N, P1, K)
        dists = torch.where(valid, _distances(p1, p2, idx, norm), p1.new_zeros(()))
    knn = knn_gather(p2, idx, lengths2) if return_nn else None
    return KNN(dists=dists, idx=idx, knn=knn)


# ------------------------------------------------------------------------------------------------
# chamfer_distance
# ------------------------------------------------------------------------------------------------


def _check_reductions(batch_reduction, point_reduction) -> None:
    if batch_reduction is not None and batch_reduction not in ("mean", "sum"):
        raise ValueError(f'batch_reduction must be one of ["mean", "sum"] or None, got {batch_reduction!r}')
    if point_reduction is not None and point_reduction not in ("mean", "sum", "max"):
        raise ValueError(f'point_reduction must be one of ["mean", "sum", "max"] or None, got {point_reduction!r}')
    if point_reduction is None and batch_reduction is not None:
        raise ValueError(f"Batch reduction must be None if point_reduction is None, got batch_reduction={batch_reduction!r}")


def _check_weights(weights, N: int) -> None:
    if not torch.is_tensor(weights):
        raise _not_a_tensor(weights, "weights", f"a tensor of shape ({N},) or None", "size")
    if weights.dim() == 0:
        raise BadShapeError(f"weights must be of shape (N,). Got a 0-d tensor for N = {N}")
    if weights.size(0) != N:
        raise ValueError(f"weights must be of shape (N,). Got {tuple(weights.shape)} for N = {N}")
    if weights.numel() != N:  # pytorch3d: view(N, 1) fails
        raise InconsistentInputsError(f"weights must be of shape (N,). Got {tuple(weights.shape)} for N = {N}")
    if not bool((weights >= 0).all()):
        raise ValueError("weights cannot be negative.")


def _check_normals_fit(x: Tensor, y: Tensor, x_normals: Tensor, y_normals: Tensor) -> None:
    """Normals used on both sides: (N, P1, C) and (N, P2, C) (pytorch3d fails in torch otherwise)."""
    for normals, points, name in ((x_normals, x, "x_normals"), (y_normals, y, "y_normals")):
        if normals.shape[:2] != points.shape[:2] or normals.shape[2] != x_normals.shape[2]:
            raise InconsistentInputsError(
                f"Expected normals to be of shape (N, P, 3) matching their points: {name} has shape "
                f"{tuple(normals.shape)}, its points {tuple(points.shape)} (x_normals: {tuple(x_normals.shape)})")
        if normals.device != points.device:
            raise InconsistentInputsError(f"{name} must be on the points' device {points.device}, got {normals.device}")


def _single_direction(
    x: Tensor,  # (N, P1, D)
    y: Tensor,  # (N, P2, D)
    x_lengths: Tensor,  # (N,)
    y_lengths: Tensor,  # (N,)
    x_normals: Tensor | None,  # (N, P1, C)
    y_normals: Tensor | None,  # (N, P2, C)
    weights: Tensor | None,  # (N,)
    point_reduction: str | None,
    norm: int,
    abs_cosine: bool,
    backend: str,
):
    """The x -> y half of pytorch3d's chamfer_distance, point reduction included (12-17)."""
    return_normals = x_normals is not None and y_normals is not None
    N, P1, D = x.shape
    padded = torch.arange(P1, device=x.device)[None] >= x_lengths[:, None]  # (N, P1)
    if y.shape[0] != N or y.shape[2] != D:
        raise ValueError(f"y does not have the correct shape. Got {tuple(y.shape)} for x of shape {tuple(x.shape)}")
    if weights is not None:
        _check_weights(weights, N)
        if float(weights.detach().sum()) == 0.0:  # pytorch3d's early exit (15), dtype promotion included
            zero = (x.sum((1, 2)) * weights.view(N, 1)) * 0.0
            return zero, (x.sum((1, 2)) * weights.view(N, 1)) * 0.0
    if return_normals:
        _check_normals_fit(x, y, x_normals, y_normals)

    nn = knn_points(x, y, x_lengths, y_lengths, norm=norm, K=1, backend=backend)
    zero = x.new_zeros(())
    cham = torch.where(padded, zero, nn.dists[..., 0])  # (N, P1)
    if weights is not None:
        cham = (cham * weights.view(N, 1)).to(x.dtype)
    cham_normals = None
    if return_normals:
        near = knn_gather(y_normals, nn.idx, y_lengths)[..., 0, :]  # (N, P1, C)
        cos = F.cosine_similarity(x_normals, near, dim=2, eps=1e-6)
        cham_normals = torch.where(padded, zero, 1 - (cos.abs() if abs_cosine else cos))
        if weights is not None:
            cham_normals = (cham_normals * weights.view(N, 1)).to(cham_normals.dtype)

    if point_reduction == "max":
        if return_normals:
            raise MaxWithNormalsError(
                'Normals must be None if point_reduction is "max": here they come from Pointclouds objects on both '
                "sides (pytorch3d: AssertionError); drop the normals from the clouds")
        if P1 == 0:
            raise IndexError(
                f'point_reduction="max" over clouds with no points (shape {tuple(x.shape)}): pytorch3d raises here '
                "(its max over the points: 'max(): Expected reduction dim 1 to have non-zero size.')")
        cham = cham.max(1).values  # (N,)
    elif point_reduction is not None:
        cham = cham.sum(1)  # (N,)
        if return_normals:
            cham_normals = cham_normals.sum(1)
        if point_reduction == "mean":
            count = x_lengths.clamp(min=1)
            cham = (cham / count).to(cham.dtype)
            if return_normals:
                cham_normals = (cham_normals / count).to(cham_normals.dtype)
    return cham, cham_normals


def _apply_batch_reduction(loss, loss_normals, weights, batch_reduction):
    if batch_reduction is None:
        return loss, loss_normals
    N = loss.shape[0]
    loss = loss.sum()
    if loss_normals is not None:
        loss_normals = loss_normals.sum()
    if batch_reduction == "mean":
        if weights is None:
            div = max(N, 1)
        elif float(weights.detach().sum()) == 0.0:
            div = 1
        else:
            div = weights.sum()
        loss = (loss / div).to(loss.dtype)
        if loss_normals is not None:
            loss_normals = (loss_normals / div).to(loss_normals.dtype)
    return loss, loss_normals


def chamfer_distance(
    x: Tensor,  # (N, P1, D), or a Pointclouds
    y: Tensor,  # (N, P2, D), or a Pointclouds
    x_lengths: Tensor | None = None,  # (N,) int in [0, P1]
    y_lengths: Tensor | None = None,  # (N,) int in [0, P2]
    x_normals: Tensor | None = None,  # (N, P1, C)
    y_normals: Tensor | None = None,  # (N, P2, C)
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

    With the defaults (norm=2, "mean" reductions) it is the batch mean of fl.chamfer; point_reduction="max"
    gives the Hausdorff distance. Every convention (Pointclouds, padding, reductions, weights, normals, empty
    inputs, errors) is listed in the module docstring.
    """
    _check_reductions(batch_reduction, point_reduction)
    norm = _check_norm(norm)
    if point_reduction == "max" and (x_normals is not None or y_normals is not None):
        raise ValueError('Normals must be None if point_reduction is "max"')
    x, x_lengths, x_normals = _read_cloud(x, x_lengths, x_normals, "x", for_chamfer=True)
    y, y_lengths, y_normals = _read_cloud(y, y_lengths, y_normals, "y", for_chamfer=True)
    _check_pair(x, y, "x", "y")
    dispatch.check_name(backend)

    args = (weights, point_reduction, norm, abs_cosine, backend)
    cham_x, normals_x = _single_direction(x, y, x_lengths, y_lengths, x_normals, y_normals, *args)
    if single_directional:
        loss, loss_normals = cham_x, normals_x
    else:
        cham_y, normals_y = _single_direction(y, x, y_lengths, x_lengths, y_normals, x_normals, *args)
        if point_reduction == "max":
            loss, loss_normals = torch.maximum(cham_x, cham_y), None
        elif point_reduction is not None:
            loss = cham_x + cham_y
            loss_normals = normals_x + normals_y if normals_x is not None else None
        else:
            loss = (cham_x, cham_y)
            loss_normals = (normals_x, normals_y) if normals_x is not None else None
    return _apply_batch_reduction(loss, loss_normals, weights, batch_reduction)
