"""The ``reference`` backend of softmin: PyTorch implementation of softmin, a dense logsumexp over the
(B, N, M) cost matrix (built once per problem). The ground truth; memory O(B·N·M)."""

from __future__ import annotations

from torch import Tensor

from . import P1_SQDIST_FLOOR
from . import Softmin as _Contract


def cost_matrix(x: Tensor, y: Tensor, p: int) -> Tensor:  # x: (B, N, D), y: (B, M, D) -> (B, N, M)
    """|x_i - y_j|^p / p, from coordinate differences (accurate far from the origin)."""
    d2 = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
    if p == 2:
        return d2 / 2
    if p == 1:
        return d2.clamp_min(P1_SQDIST_FLOOR).sqrt()
    raise ValueError(f"p must be 1 or 2, got {p!r}")


def softmin(eps: float, c_xy: Tensor, h_y: Tensor) -> Tensor:  # c_xy: (B, N, M), h_y: (B, M) -> (B, N)
    """PyTorch implementation of softmin: f_i = -eps log Σ_j exp(h_j - C_ij / eps)."""
    return -eps * (h_y.unsqueeze(-2) - c_xy / eps).logsumexp(-1)


class Softmin(_Contract):
    def cost(self, x: Tensor, y: Tensor) -> Tensor:  # (B, N, D), (B, M, D) -> (B, N, M)
        return cost_matrix(x, y, self.p)

    def __call__(self, eps: float, cost: Tensor, h: Tensor) -> Tensor:  # (B, N, M), (B, M) -> (B, N)
        return softmin(eps, cost, h)
