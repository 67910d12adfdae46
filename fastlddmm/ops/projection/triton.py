"""The ``triton`` backend of projection: T_i = Σ_j softmax_j(h_j - C(x_i, y_j) / eps) v_j with gradients, as
an autograd function over the streaming kernels of kernels/softmin.py (weighted_sum and its backward).
CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was imported.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...kernels import softmin as _kernels

cpu_unavailable_reason = _kernels.cpu_unavailable_reason


class SoftmaxWeightedSumFunction(torch.autograd.Function):
    """T_i = Σ_j P_ij v_j, P_ij = softmax_j(h_j - C(x_i, y_j) / eps): the barycentric projection's
    reduction. Gradients to x (through the cost), h and v; the cost side y is not differentiated
    (callers pass it detached; a y that requires grad raises). First order only."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # (B, N, D)
        y: Tensor,  # (B, M, D) cost side
        h: Tensor,  # (B, M)
        v: Tensor,  # (B, M, D) values
        eps: float,
        p: int,
    ) -> Tensor:  # (B, N, D)
        lse = _kernels.forward(x, y, h, eps, p)
        out = _kernels.weighted_sum(x, y, h, v, lse, eps, p)
        ctx.save_for_backward(x, y, h, v, lse, out)
        ctx.eps, ctx.p = eps, p
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # (B, N, D)
        x, y, h, v, lse, out = ctx.saved_tensors
        need_x, need_y, need_h, need_v = ctx.needs_input_grad[:4]
        if need_y:
            raise NotImplementedError("the cost-side points of the Triton weighted sum are not differentiated")
        gx, gv, gh = _kernels.weighted_sum_backward(
            x, y, h, v, lse, out, grad_out.contiguous(), ctx.eps, ctx.p, need_x=need_x, need_vh=need_h or need_v
        )
        return gx, None, gh, gv, None, None


def softmax_weighted_sum(
    eps: float,
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D) cost side, detached
    h: Tensor,  # (B, M)
    v: Tensor,  # (B, M, D)
    p: int,
) -> Tensor:  # (B, N, D)
    """Σ_j softmax_j(h_j - |x_i - y_j|^p / (p eps)) v_j, streamed by the Triton kernels."""
    return SoftmaxWeightedSumFunction.apply(
        x.contiguous(), y.contiguous(), h.to(x.dtype).contiguous(), v.contiguous(), float(eps), int(p)
    )
