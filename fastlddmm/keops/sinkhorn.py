"""KeOps soft-min for the Sinkhorn loop of fastlddmm.reference.sinkhorn, and the KeOps barycentric projection.

The cost is never stored: each soft-min f_i = -eps log Σ_j exp(h_j - C(x_i, y_j) / eps) is a KeOps
logsumexp reduction over j, and its gradient (in the last, taped step only) another reduction, so
memory stays O(B·(N + M)). 1/eps enters as a KeOps parameter: one compiled formula serves the
whole ε-scaling schedule. Batch items are reduced one after the other with the same formula.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from ._lazy import lazy_tensor

# The module, not the function fastlddmm.reference.sinkhorn that shadows it as a package attribute.
_ref = importlib.import_module("fastlddmm.reference.sinkhorn")


def _cost(x_i, y_j, p: int):
    d2 = ((x_i - y_j) ** 2).sum(-1)
    if p == 2:
        return d2 / 2
    if p == 1:  # sqrt(max(d2, floor)) as the dense reference (and GeomLoss's tensorized backend)
        return ((d2 - _ref.P1_SQDIST_FLOOR).relu() + _ref.P1_SQDIST_FLOOR).sqrt()
    raise ValueError(f"p must be one of {_ref.P_VALUES}, got {p!r}")


def softmin(
    eps: float,
    cost: tuple[Tensor, Tensor],  # x: (B, N, D), y: (B, M, D), y already detached
    h: Tensor,  # (B, M)
    p: int = 2,
) -> Tensor:  # (B, N)
    """f_i = -eps log Σ_j exp(h_j - |x_i - y_j|^p / (p eps)), as KeOps logsumexp reductions."""
    LazyTensor = lazy_tensor()
    x, y = cost
    inv_eps = torch.tensor([1.0 / eps], dtype=x.dtype, device=x.device)
    out = []
    for k in range(x.shape[0]):
        # Explicit axes: with N or M = 1 a (1, 1, D) shape would make KeOps read a parameter.
        x_i = LazyTensor(x[k], axis=0)  # (N, D) i-variable
        y_j = LazyTensor(y[k], axis=1)  # (M, D) j-variable
        h_j = LazyTensor(h[k].contiguous().view(-1, 1), axis=1)  # (M, 1) j-variable
        out.append((h_j - _cost(x_i, y_j, p) * inv_eps).logsumexp(dim=1).view(-1))  # (N,)
    return -eps * torch.stack(out)


def _costs(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return (x.contiguous(), y.contiguous())


def softmin_parts(p: int):
    """(softmin, costs) for the shared loop of fastlddmm.reference.sinkhorn: fl.sinkhorn and
    fl.sinkhorn_potentials run it with these (fastlddmm.distances)."""
    return functools.partial(softmin, p=p), _costs


def sinkhorn_projection(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    a: Tensor | None = None,  # (N,) or (B, N)
    b: Tensor | None = None,  # (M,) or (B, M)
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
) -> Tensor:  # (N, D) or (B, N, D)
    """KeOps twin of fastlddmm.reference.sinkhorn.sinkhorn_projection (a softmax-weighted sum)."""
    LazyTensor = lazy_tensor()
    x, y, eps, h, batched = _ref.projection_logits_with(
        *softmin_parts(p), x, y, a, b, blur, p, scaling, reach)
    inv_eps = torch.tensor([1.0 / eps], dtype=x.dtype, device=x.device)
    out = []
    for k in range(x.shape[0]):
        x_i = LazyTensor(x[k].contiguous(), axis=0)  # (N, D)
        y_j = LazyTensor(y[k].detach().contiguous(), axis=1)  # (M, D), cost side
        h_j = LazyTensor(h[k].contiguous().view(-1, 1), axis=1)  # (M, 1)
        logits = h_j - _cost(x_i, y_j, p) * inv_eps
        out.append(logits.sumsoftmaxweight(LazyTensor(y[k].contiguous(), axis=1), dim=1))  # (N, D)
    t = torch.stack(out)
    return t if batched else t[0]
