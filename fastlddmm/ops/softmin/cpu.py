"""The ``cpu`` backend of softmin: f_i = -eps log Σ_j exp(h_j - C(x_i, y_j) / eps) by the streaming C++
kernel csrc/softmin/softmin_cpu.cpp (fastlddmm._C): OpenMP over query rows, SIMD over the reference points
with an online log-sum-exp and one polynomial exp2 per pair; the cost is never stored (memory O(B·(N + M))).
Threads: torch.get_num_threads(), read at every call; the values do not depend on the thread count.

The gradient in x (needed by the Sinkhorn loop's last, taped step) is computed by the same C++ pass when
x requires grad: G_i = ∂f_i/∂x_i = Σ_j P_ij ∂C_ij/∂x_i, a few FMAs per pair more, so the backward is the
O(N·D) product grad_f · G instead of a second pass over the pairs. y and h are not differentiated (the
solver passes them detached; asking for their gradients raises).

pair(): the x <- y and y <- x reductions are two calls. Sharing one pass over the same pairs would save
only the cross term x_i·y_j (3 of the ~32 vector operations the two directions take per pair for p = 2:
each direction still needs its own exponent, exp2 and running max), at the price of per-column partial
sums merged across threads; measured not worth it (see the note of issue 18).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ... import dispatch
from . import Softmin as _Contract

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _module():
    mod = dispatch.compiled_module()
    if mod is None:
        raise dispatch.BackendUnavailableError(f"backend 'cpu' is not available: {dispatch.status('cpu').reason}")
    return mod


def softmin_values(
    eps: float,
    x: Tensor,  # (B, N, D) contiguous
    y: Tensor,  # (B, M, D) contiguous, x's dtype
    h: Tensor,  # (B, M) contiguous, x's dtype
    p: int,
    with_grad: bool,
) -> tuple[Tensor, Tensor | None]:  # f (B, N), G = df/dx (B, N, D) or None
    """The kernel call: f and, when with_grad, G = ∂f_i/∂x_i (no autograd)."""
    batch, n, dim = x.shape
    m = y.shape[1]
    f = x.new_empty((batch, n))
    grad = x.new_empty((batch, n, dim)) if with_grad else None
    _module().softmin_cpu(
        _DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), h.data_ptr(), batch, n, m, dim, float(eps), int(p),
        torch.get_num_threads(), f.data_ptr(), grad.data_ptr() if with_grad else 0)
    return f, grad


class SoftminFunction(torch.autograd.Function):
    """f = -eps · lse_j(h_j - C(x_i, y_j) / eps), differentiable in x (first order)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, h: Tensor, eps: float, p: int) -> Tensor:  # (B,N,D), (B,M,D), (B,M)
        f, grad = softmin_values(eps, x, y, h, p, with_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return f

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f: Tensor):  # (B, N)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            raise NotImplementedError(
                "the cpu soft-min differentiates the query points x only (the Sinkhorn solver detaches y and h); "
                "use backend='reference' for gradients in y or h")
        (grad,) = ctx.saved_tensors
        gx = grad_f.unsqueeze(-1) * grad if ctx.needs_input_grad[0] else None
        return gx, None, None, None, None


def _check(x: Tensor, y: Tensor) -> None:
    if x.dtype not in _DTYPES or y.dtype != x.dtype:
        raise TypeError(f"the cpu soft-min takes float32 or float64 clouds of one dtype, got {x.dtype} and {y.dtype}")
    if x.device.type != "cpu" or y.device.type != "cpu":
        raise ValueError(f"the cpu soft-min takes CPU tensors, got {x.device} and {y.device}")


def softmin(
    eps: float,
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D) detached
    h: Tensor,  # (B, M)
    p: int,
) -> Tensor:  # (B, N)
    """f_i = -eps log Σ_j exp(h_j - |x_i - y_j|^p / (p eps)), streamed by the C++ kernel."""
    _check(x, y)
    return SoftminFunction.apply(x.contiguous(), y.contiguous(), h.to(x.dtype).contiguous(), float(eps), int(p))


class Softmin(_Contract):
    def cost(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:  # (B, N, D), (B, M, D)
        _check(x, y)
        return x.contiguous(), y.detach().contiguous()

    def __call__(self, eps: float, cost: tuple[Tensor, Tensor], h: Tensor) -> Tensor:  # h: (B, M) -> (B, N)
        x, y = cost
        return softmin(eps, x, y, h, self.p)
