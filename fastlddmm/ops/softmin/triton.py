"""The ``triton`` backend of softmin: f_i = -eps log Σ_j exp(h_j - C(x_i, y_j) / eps) with gradients, as an
autograd function over the streaming kernels of kernels/softmin.py (the cost is never stored: memory
O(B·(N + M))). CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was imported.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ...kernels import softmin as _kernels
from . import Softmin as _Contract

cpu_unavailable_reason = _kernels.cpu_unavailable_reason


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
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    h: Tensor,  # (B, M)
    p: int,
) -> Tensor:  # (B, N)
    """f_i = -eps log Σ_j exp(h_j - |x_i - y_j|^p / (p eps)), streamed by the Triton kernels."""
    return SoftminFunction.apply(x.contiguous(), y.contiguous(), h.to(x.dtype).contiguous(), float(eps), int(p))


class Softmin(_Contract):
    def __call__(self, eps: float, cost: tuple[Tensor, Tensor], h: Tensor) -> Tensor:  # h: (B, M) -> (B, N)
        x, y = cost
        return softmin(eps, x, y, h, self.p)
