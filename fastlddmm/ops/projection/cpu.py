"""The ``cpu`` backend of projection: T_i = Σ_j softmax_j(h_j - C(x_i, y_j) / eps) v_j by the streaming C++
kernels of csrc/projection/projection_cpu.cpp (fastlddmm._C), forward and backward (memory O(B·(N + M))).

Differentiable in x (through the cost), h and v, first order; the cost side y is not differentiated
(callers pass it detached; a y that requires grad raises). The backward is one pass over the pairs by rows
(grad x) and one by columns (grad h, grad v), each skipped when not needed. Threads:
torch.get_num_threads(); the values do not depend on the thread count.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..softmin.cpu import _DTYPES, _check, _module


class SoftmaxWeightedSumFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, h: Tensor, v: Tensor, eps: float, p: int) -> Tensor:  # -> (B, N, D)
        batch, n, dim = x.shape
        m = y.shape[1]
        out = x.new_empty((batch, n, dim))
        lse2 = torch.empty((batch, n), dtype=torch.float64)
        _module().projection_forward_cpu(
            _DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), h.data_ptr(), v.data_ptr(), batch, n, m, dim, float(eps),
            int(p), torch.get_num_threads(), out.data_ptr(), lse2.data_ptr())
        ctx.save_for_backward(x, y, h, v, out, lse2)
        ctx.eps, ctx.p = eps, p
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # (B, N, D)
        x, y, h, v, out, lse2 = ctx.saved_tensors
        need_x, need_y, need_h, need_v = ctx.needs_input_grad[:4]
        if need_y:
            raise NotImplementedError("the cost-side points y of the cpu weighted sum are not differentiated "
                                      "(pass them detached, or use backend='reference')")
        batch, n, dim = x.shape
        m = y.shape[1]
        gx = torch.empty_like(x) if need_x else None
        gh = torch.empty_like(h) if need_h else None
        gv = torch.empty_like(v) if need_v else None
        if need_x or need_h or need_v:
            _module().projection_backward_cpu(
                _DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), h.data_ptr(), v.data_ptr(), out.data_ptr(),
                lse2.data_ptr(), grad_out.contiguous().data_ptr(), batch, n, m, dim, float(ctx.eps), int(ctx.p),
                torch.get_num_threads(), gx.data_ptr() if need_x else 0, gh.data_ptr() if need_h else 0,
                gv.data_ptr() if need_v else 0)
        return gx, None, gh, gv, None, None


def softmax_weighted_sum(
    eps: float,
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D) cost side, detached
    h: Tensor,  # (B, M)
    v: Tensor,  # (B, M, D)
    p: int,
) -> Tensor:  # (B, N, D)
    """Σ_j softmax_j(h_j - |x_i - y_j|^p / (p eps)) v_j, streamed by the C++ kernels."""
    _check(x, y)
    if v.shape[-1] != x.shape[-1]:
        raise ValueError(f"the cpu weighted sum takes values v of the points' dimension {x.shape[-1]}, got {tuple(v.shape)}")
    return SoftmaxWeightedSumFunction.apply(
        x.contiguous(), y.contiguous(), h.to(x.dtype).contiguous(), v.to(x.dtype).contiguous(), float(eps), int(p))
