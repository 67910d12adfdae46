"""The Triton soft-min of the Sinkhorn loop, f_i = -eps log Σ_j exp(h_j - C(x_i, y_j) / eps), with gradients.

Same contract as ``fastlddmm.reference.sinkhorn.softmin_dense`` (the ground truth) and
``fastlddmm.keops.sinkhorn.softmin``, but the cost is given as the point clouds (x, y) and never
stored: forward and backward are streaming kernels (kernels/softmin.py), memory O(B·(N + M)).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..kernels import softmin as _kernels


class SoftminFunction(torch.autograd.Function):
    """f = -eps · lse(h_j - C(x_i, y_j) / eps) over j; gradients to x, y and h (first order only:
    use the reference backend for second derivatives)."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # (B, N, D)
        y: Tensor,  # (B, M, D)
        h: Tensor,  # (B, M)
        eps: float,
        p: int,
    ) -> Tensor:  # (B, N)
        lse = _kernels.forward(x, y, h, eps, p)
        ctx.save_for_backward(x, y, h, lse)
        ctx.eps, ctx.p = eps, p
        return -eps * lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: Tensor):  # (B, N)
        x, y, h, lse = ctx.saved_tensors
        grad_f = grad_f.contiguous()
        gx = gy = gh = None
        if ctx.needs_input_grad[0]:
            gx = _kernels.backward_x(x, y, h, lse, grad_f, ctx.eps, ctx.p)
        # Not needed by the Sinkhorn loop (y and h are detached there), but correct if asked.
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gy, gh = _kernels.backward_y(x, y, h, lse, grad_f, ctx.eps, ctx.p)
        return gx, gy, gh, None, None


def softmin(
    eps: float,
    cost: tuple[Tensor, Tensor],  # x: (B, N, D), y: (B, M, D)
    h: Tensor,  # (B, M)
    p: int = 2,
) -> Tensor:  # (B, N)
    """f_i = -eps log Σ_j exp(h_j - |x_i - y_j|^p / (p eps)), streamed by the Triton kernels."""
    x, y = cost
    return SoftminFunction.apply(x.contiguous(), y.contiguous(), h.to(x.dtype).contiguous(), float(eps), int(p))


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
    p: int = 2,
) -> Tensor:  # (B, N, D)
    """Σ_j softmax_j(h_j - |x_i - y_j|^p / (p eps)) v_j, streamed by the Triton kernels."""
    return SoftmaxWeightedSumFunction.apply(
        x.contiguous(), y.contiguous(), h.to(x.dtype).contiguous(), v.contiguous(), float(eps), int(p)
    )
