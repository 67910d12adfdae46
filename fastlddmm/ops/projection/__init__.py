"""The projection op: the reduction of the Sinkhorn barycentric projection,

    T_i = Σ_j softmax_j(h_j - C(x_i, y_j) / eps) v_j,      C(x, y) = |x - y|^p / p (as fastlddmm/ops/softmin)

with h_j = log b_j + g_j / eps from the solved potentials and v = y (fl.sinkhorn_projection).

The room (which backend runs is decided in fastlddmm/dispatch.py, the same rule as the soft-min's):

    reference.py    dense softmax over the (B, N, M) logits: the ground truth, memory O(B·N·M)
    cpu.py          C++/OpenMP streaming weighted sum (csrc/projection/), memory O(B·(N + M))
    keops.py        KeOps sumsoftmaxweight reductions, memory O(B·(N + M))
    triton.py       streaming Triton kernels (kernels/softmin.py: weighted_sum), memory O(B·(N + M))

The contract: each backend module has

    softmax_weighted_sum(eps, x (B, N, D), y (B, M, D) cost side (detached), h (B, M), v (B, M, D), p)
        -> T (B, N, D), differentiable in x (through the cost), h and v
"""

from __future__ import annotations

from torch import Tensor


def softmax_weighted_sum(
    eps: float,
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D) cost side, detached
    h: Tensor,  # (B, M)
    v: Tensor,  # (B, M, D)
    p: int,
    *,
    backend: str = "auto",
) -> Tensor:  # (B, N, D)
    """The contract's softmax_weighted_sum, by the backend fastlddmm.dispatch picks for this problem."""
    from ... import dispatch

    return dispatch.implementation("projection", backend, dispatch.problem(x, y)).softmax_weighted_sum(
        eps, x, y, h, v, p)
