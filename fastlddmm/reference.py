"""The pure-PyTorch twins of every op: readable, float64-capable, differentiable by autograd. The ground
truth every fast path is tested against (and the benchmarks' baseline).

Each twin lives in its op's room, ``fastlddmm/ops/<op>/reference.py``; this module gives them the users'
names. The Sinkhorn twins are the shared solver (fastlddmm/sinkhorn_solver.py) run with the dense
soft-min: the solver is the same for every backend, the reduction is what each backend provides.
"""

from __future__ import annotations

from torch import Tensor

from . import sinkhorn_solver
from .ops.flow.reference import ACTIVATIONS, activation_fn, euler_flow, trajectory, velocity
from .ops.kernel_sum.reference import kernel_matrix, kernel_sum
from .ops.nearest.reference import chamfer, knn_index, l2, nearest, squared_distances
from .ops.projection.reference import softmax_weighted_sum
from .ops.softmin.reference import Softmin, cost_matrix, softmin


def sinkhorn(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    a: Tensor | None = None,  # (N,) or (B, N), non-negative; None: uniform 1/N
    b: Tensor | None = None,  # (M,) or (B, M); None: uniform 1/M
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    debias: bool = True,
) -> Tensor:  # () or (B,)
    """PyTorch implementation of sinkhorn: GeomLoss's SamplesLoss("sinkhorn") with dense matrices."""
    return sinkhorn_solver.divergence(Softmin(p), x, y, a, b, blur, p, scaling, reach, debias)


def sinkhorn_potentials(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    a: Tensor | None = None,  # (N,) or (B, N)
    b: Tensor | None = None,  # (M,) or (B, M)
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    debias: bool = True,
) -> tuple[Tensor, Tensor]:  # (N,) or (B, N) on x, (M,) or (B, M) on y
    """PyTorch implementation of sinkhorn_potentials: GeomLoss's ``potentials=True`` output."""
    return sinkhorn_solver.potentials(Softmin(p), x, y, a, b, blur, p, scaling, reach, debias)


def sinkhorn_projection(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    a: Tensor | None = None,  # (N,) or (B, N)
    b: Tensor | None = None,  # (M,) or (B, M)
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
) -> Tensor:  # (N, D) or (B, N, D)
    """PyTorch implementation of sinkhorn_projection: the barycentric projection of the entropic plan of
    OT(a, b), T(x_i) = Σ_j π_ij y_j / Σ_j π_ij, with π_ij ∝ b_j exp((g_j - C(x_i, y_j)) / eps) (the
    potentials of the a<->b problem; debiasing does not change the plan)."""
    xb, yb, eps, h, batched = sinkhorn_solver.projection_logits(Softmin(p), x, y, a, b, blur, p, scaling, reach)
    t = softmax_weighted_sum(eps, xb, yb.detach(), h, yb, p)
    return t if batched else t[0]


__all__ = [
    "ACTIVATIONS", "Softmin", "activation_fn", "chamfer", "cost_matrix", "euler_flow", "kernel_matrix", "kernel_sum",
    "knn_index", "l2", "nearest", "sinkhorn", "sinkhorn_potentials", "sinkhorn_projection", "softmax_weighted_sum",
    "softmin", "squared_distances", "trajectory", "velocity",
]
