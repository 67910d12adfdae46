"""The ``keops`` backend of projection: KeOps sumsoftmaxweight reductions, memory O(B·(N + M))."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._keops import lazy_tensor, sinkhorn_cost


def softmax_weighted_sum(
    eps: float,
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D) cost side, detached
    h: Tensor,  # (B, M)
    v: Tensor,  # (B, M, D)
    p: int,
) -> Tensor:  # (B, N, D)
    """Σ_j softmax_j(h_j - |x_i - y_j|^p / (p eps)) v_j, one KeOps reduction per batch item."""
    LazyTensor = lazy_tensor()
    inv_eps = torch.tensor([1.0 / eps], dtype=x.dtype, device=x.device)
    out = []
    for k in range(x.shape[0]):
        x_i = LazyTensor(x[k].contiguous(), axis=0)  # (N, D)
        y_j = LazyTensor(y[k].contiguous(), axis=1)  # (M, D), cost side
        h_j = LazyTensor(h[k].contiguous().view(-1, 1), axis=1)  # (M, 1)
        logits = h_j - sinkhorn_cost(x_i, y_j, p) * inv_eps
        out.append(logits.sumsoftmaxweight(LazyTensor(v[k].contiguous(), axis=1), dim=1))  # (N, D)
    return torch.stack(out)
