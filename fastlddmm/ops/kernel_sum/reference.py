"""The ``reference`` backend of kernel_sum: PyTorch implementation of kernel_sum with a dense
(B, N, M) kernel matrix."""

from __future__ import annotations

from torch import Tensor

from . import KERNELS, SQDIST_FLOOR

DIFFERENTIATES_Y = True


def kernel_matrix(name: str, x: Tensor, y: Tensor, blur: float) -> Tensor:  # (B, N, D), (B, M, D) -> (B, N, M)
    """PyTorch implementation of the GeomLoss kernels k(x_i, y_j), from coordinate differences."""
    d2 = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
    if name == "gaussian":
        return (-d2 / (2 * blur**2)).exp()
    if name == "laplacian":
        return (-(d2 / blur**2).clamp_min(SQDIST_FLOOR).sqrt()).exp()
    if name == "energy":
        return -d2.clamp_min(SQDIST_FLOOR).sqrt()
    raise ValueError(f"unknown kernel {name!r}; expected one of {KERNELS}")


def kernel_sum(name: str, x: Tensor, y: Tensor, b: Tensor, blur: float) -> Tensor:  # b: (B, M) -> (B, N)
    """PyTorch implementation of kernel_sum: Σ_j k(x_i, y_j) b_j."""
    return (kernel_matrix(name, x, y, blur) @ b.unsqueeze(-1)).squeeze(-1)
