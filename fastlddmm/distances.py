"""Public distances between point clouds: fl.chamfer, fl.nearest, fl.sinkhorn (+ potentials, projection).

Inputs are (N, D) or batched (B, N, D) float32/float64 tensors on any device; all outputs are
differentiable with respect to the points (and the Sinkhorn weights), except nearest-neighbour indices.
Each function checks its inputs in the user's words, then runs the ops of fastlddmm/ops/ with the
backend fastlddmm.dispatch picks (``backend="auto"``) or the one named: "reference" (dense PyTorch, the
ground truth), "keops", "triton", "kdtree" (nearest only); ``fl.backends()`` says which are usable here.

Nearest neighbours, Chamfer: every backend only *finds* the index j* = argmin_j |x_i - y_j|²; the squared
distance is then recomputed in PyTorch as |x_i - y_{j*}|², with the reference's formula, so values and
gradients (to x and y) are those of the reference whenever the same neighbour is found.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import dispatch, sinkhorn_solver
from ._validation import check_lengths, check_pair, check_points, check_positive, check_weights
from .ops import nearest as _nearest
from .ops import projection as _projection
from .ops.softmin import softmin_for


def _batched(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:  # (N, D) -> (1, N, D)
    return (x, y) if x.dim() == 3 else (x.unsqueeze(0), y.unsqueeze(0))


# ------------------------------------------------------------------------------------------------
# Nearest neighbour and Chamfer
# ------------------------------------------------------------------------------------------------


def nearest(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # (N,) or (B, N) squared distances, same shape int64 indices
    """For each x_i: the squared distance to its nearest y_j and that j (int64, not differentiable).

    The squared distance is differentiable in x and y (the gradient flows to the nearest y_j).
    Ties between equidistant y_j may be broken differently by different backends.
    """
    check_points(x, "x")
    check_points(y, "y")
    check_pair(x, y)
    dispatch.check_name(backend)
    xs, ys = _batched(x, y)
    index = _nearest.knn_index(xs, ys, k=1, backend=backend)  # (B, N, 1)
    sq_dist = _nearest.gather_distances(xs, ys, index)[..., 0]
    index = index[..., 0]
    return (sq_dist, index) if x.dim() == 3 else (sq_dist[0], index[0])


def _masked_mean(values: Tensor, lengths: Tensor | None) -> Tensor:  # (B, N), (B,) -> (B,)
    if lengths is None:
        return values.mean(-1)
    valid = torch.arange(values.shape[-1], device=values.device)[None, :] < lengths[:, None]
    return torch.where(valid, values, values.new_zeros(())).sum(-1) / lengths.to(values.dtype)


def chamfer(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    x_lengths: Tensor | None = None,  # (B,) int, item b uses x[b, :x_lengths[b]]
    y_lengths: Tensor | None = None,  # (B,) int, item b uses y[b, :y_lengths[b]]
    backend: str = "auto",
) -> Tensor:  # () or (B,)
    """mean_i min_j |x_i - y_j|² + mean_j min_i |x_i - y_j|², per batch item."""
    check_points(x, "x")
    check_points(y, "y")
    check_pair(x, y)
    x_lengths = check_lengths(x_lengths, "x_lengths", x)
    y_lengths = check_lengths(y_lengths, "y_lengths", y)
    dispatch.check_name(backend)
    xs, ys = _batched(x, y)
    idx_xy = _nearest.knn_index(xs, ys, x_lengths=x_lengths, y_lengths=y_lengths, backend=backend)  # (B, N, 1)
    idx_yx = _nearest.knn_index(ys, xs, x_lengths=y_lengths, y_lengths=x_lengths, backend=backend)  # (B, M, 1)
    d_xy = _nearest.gather_distances(xs, ys, idx_xy)[..., 0]  # (B, N); padded rows are masked below
    d_yx = _nearest.gather_distances(ys, xs, idx_yx)[..., 0]  # (B, M)
    value = _masked_mean(d_xy, x_lengths) + _masked_mean(d_yx, y_lengths)
    return value if x.dim() == 3 else value[0]


# ------------------------------------------------------------------------------------------------
# Sinkhorn
# ------------------------------------------------------------------------------------------------


def check_sinkhorn_args(x, y, a, b, blur, p, scaling, reach, debias) -> None:
    """The checks of fl.sinkhorn's arguments, in the user's words (also used by the sharded Sinkhorn)."""
    check_points(x, "x")
    check_points(y, "y")
    check_pair(x, y)
    check_weights(a, "a", x)
    check_weights(b, "b", y)
    check_positive(blur, "blur")
    check_positive(scaling, "scaling")
    if not scaling < 1:
        raise ValueError(f"scaling must lie in (0, 1), got {scaling!r}")
    check_positive(reach, "reach", allow_none=True)
    sinkhorn_solver.check_p(p)
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be True or False, got {debias!r}")


def sinkhorn(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    a: Tensor | None = None,  # (N,) or (B, N) non-negative weights; None: uniform 1/N
    b: Tensor | None = None,  # (M,) or (B, M); None: uniform 1/M
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    debias: bool = True,
    backend: str = "auto",
) -> Tensor:  # () or (B,)
    """The Sinkhorn divergence, equal to GeomLoss ``SamplesLoss("sinkhorn", p=p, blur=blur,
    scaling=scaling, reach=reach, debias=debias)(a, x, b, y)``.

    Cost |x - y|^p / p (p = 1 or 2), temperature eps = blur^p, ε-scaling from the diameter of the
    data down to blur with ratio ``scaling`` per step, marginal penalty rho = reach^p (None: balanced).
    With ``debias`` it is OT(a, b) - OT(a, a)/2 - OT(b, b)/2 (≥ 0, zero for equal measures); as blur
    → 0 it tends to W_p^p / p. Gradients follow GeomLoss: through the converged dual potentials.
    Zero weights remove points (how to batch clouds of different sizes).

    backend="auto" uses the dense reference up to B·max(N, M)² = 5000² cost entries, beyond it a
    streaming soft-min (Triton on CUDA tensors, else KeOps; the dense reference at any size when neither
    can run: memory O(B·(N + M)²)); fastlddmm.dispatch holds the rule. KeOps compiles its formulas on
    first use and caches them in ``pykeops.get_build_folder()``.
    """
    check_sinkhorn_args(x, y, a, b, blur, p, scaling, reach, debias)
    return sinkhorn_solver.divergence(softmin_for(backend, x, y, p), x, y, a, b, blur, p, scaling, reach, debias)


def sinkhorn_potentials(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    a: Tensor | None = None,  # (N,) or (B, N)
    b: Tensor | None = None,  # (M,) or (B, M)
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    debias: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # (N,) or (B, N) on x, (M,) or (B, M) on y
    """The dual potentials (F on x, G on y) that GeomLoss returns with ``potentials=True``:
    the gradient of the divergence with respect to a and b."""
    check_sinkhorn_args(x, y, a, b, blur, p, scaling, reach, debias)
    return sinkhorn_solver.potentials(softmin_for(backend, x, y, p), x, y, a, b, blur, p, scaling, reach, debias)


def sinkhorn_projection(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    a: Tensor | None = None,  # (N,) or (B, N)
    b: Tensor | None = None,  # (M,) or (B, M)
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    backend: str = "auto",
) -> Tensor:  # (N, D) or (B, N, D)
    """Barycentric projection of the entropic transport plan from (a, x) to (b, y): for each x_i,
    the π-weighted mean of the y_j it is sent to (a target for x_i in registration)."""
    check_sinkhorn_args(x, y, a, b, blur, p, scaling, reach, True)
    xb, yb, eps, h, batched = sinkhorn_solver.projection_logits(
        softmin_for(backend, x, y, p), x, y, a, b, blur, p, scaling, reach)
    t = _projection.softmax_weighted_sum(eps, xb, yb.detach(), h, yb, p, backend=backend)
    return t if batched else t[0]
