"""The ``reference`` backend of projection: PyTorch implementation of softmax_weighted_sum (a dense
softmax over the (B, N, M) logits). The ground truth; memory O(B·N·M)."""

from __future__ import annotations

from torch import Tensor

from ..softmin.reference import cost_matrix


def softmax_weighted_sum(
    eps: float,
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D) cost side, detached
    h: Tensor,  # (B, M)
    v: Tensor,  # (B, M, D)
    p: int,
) -> Tensor:  # (B, N, D)
    """PyTorch implementation of softmax_weighted_sum: Σ_j softmax_j(h_j - C(x_i, y_j) / eps) v_j."""
    logits = h.unsqueeze(-2) - cost_matrix(x, y, p) / eps  # (B, N, M)
    return logits.softmax(-1) @ v
