"""The ``keops`` backend of softmin: KeOps logsumexp reductions, memory O(B·(N + M)).

The cost is never stored: each soft-min is a KeOps logsumexp reduction over j, and its gradient (in the
Sinkhorn loop's last, taped step only) another reduction. 1/eps enters as a KeOps parameter: one compiled
formula serves the whole ε-scaling schedule. Batch items are reduced one after the other with the same
formula.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._keops import lazy_tensor, sinkhorn_cost
from . import Softmin as _Contract


def softmin(
    eps: float,
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    h: Tensor,  # (B, M)
    p: int,
) -> Tensor:  # (B, N)
    """f_i = -eps log Σ_j exp(h_j - |x_i - y_j|^p / (p eps)), as KeOps logsumexp reductions."""
    LazyTensor = lazy_tensor()
    inv_eps = torch.tensor([1.0 / eps], dtype=x.dtype, device=x.device)
    out = []
    for k in range(x.shape[0]):
        # Explicit axes: with N or M = 1 a (1, 1, D) shape would make KeOps read a parameter.
        x_i = LazyTensor(x[k], axis=0)  # (N, D) i-variable
        y_j = LazyTensor(y[k], axis=1)  # (M, D) j-variable
        h_j = LazyTensor(h[k].contiguous().view(-1, 1), axis=1)  # (M, 1) j-variable
        out.append((h_j - sinkhorn_cost(x_i, y_j, p) * inv_eps).logsumexp(dim=1).view(-1))  # (N,)
    return -eps * torch.stack(out)


class Softmin(_Contract):
    def __call__(self, eps: float, cost: tuple[Tensor, Tensor], h: Tensor) -> Tensor:  # h: (B, M) -> (B, N)
        x, y = cost
        return softmin(eps, x, y, h, self.p)
