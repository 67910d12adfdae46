"""The ``keops`` backend of kernel_sum: one KeOps Sum reduction for the three kernels (memory O(B·(N + M)))."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._keops import lazy_tensor
from . import SQDIST_FLOOR, kernel_params

DIFFERENTIATES_Y = False  # callers differentiate through the i-variable only (one compiled gradient)


def kernel_sum(name: str, x: Tensor, y: Tensor, b: Tensor, blur: float) -> Tensor:  # b: (B, M) -> (B, N)
    """Σ_j k(x_i, y_j) b_j as a KeOps Sum reduction, one batch item after the other."""
    LazyTensor = lazy_tensor()
    q, s, g, l, e = (torch.tensor([v], dtype=x.dtype, device=x.device) for v in kernel_params(name, blur))
    floor = torch.tensor([SQDIST_FLOOR], dtype=x.dtype, device=x.device)
    q, s, g, l, e, floor = (LazyTensor(t) for t in (q, s, g, l, e, floor))
    out = []
    for k in range(x.shape[0]):
        # Explicit axes: with N = M = 1, (B, 1, 1, D) shapes would make KeOps read parameters.
        x_i = LazyTensor(x[k].contiguous(), axis=0)  # (N, D) i-variable
        y_j = LazyTensor(y[k].contiguous(), axis=1)  # (M, D) j-variable
        b_j = LazyTensor(b[k].contiguous().view(-1, 1), axis=1)  # (M, 1) j-variable
        d2 = ((x_i - y_j) ** 2).sum(-1)
        r = ((q * d2 - floor).relu() + floor).sqrt()  # sqrt(max(q·d², floor)), as the dense reference
        kern = s * (-(g * d2) - l * r).exp() - e * r
        out.append((kern * b_j).sum(dim=1).view(-1))  # (N,)
    return torch.stack(out)
