"""Triton solver for fl.sinkhorn / fl.sinkhorn_potentials: the generic loop of
fastlddmm.reference.sinkhorn with the streaming Triton soft-min plugged in.

Exactly the twin of fastlddmm.keops.sinkhorn: same ε-scaling schedule, symmetric updates, damping
for ``reach``, weights, debiasing and taped last step (gradients from the converged potentials), only
the soft-min differs. Memory O(B·(N + M)): the cost is recomputed tile by tile in the kernels, and
all batch items go in one launch (a batch grid axis). sinkhorn_projection streams its soft-max
weighted sum of y too (kernels/softmin.py, weighted_sum and its backward).
"""

from __future__ import annotations

import functools
import importlib

from torch import Tensor

from .softmin import softmax_weighted_sum, softmin

# The module, not the function fastlddmm.reference.sinkhorn that shadows it as a package attribute.
_ref = importlib.import_module("fastlddmm.reference.sinkhorn")


def _costs(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return (x, y)


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
    """Triton twin of fastlddmm.reference.sinkhorn.sinkhorn_projection (a streamed soft-max weighted sum)."""
    x, y, eps, h, batched = _ref.projection_logits_with(
        *softmin_parts(p), x, y, a, b, blur, p, scaling, reach)
    t = softmax_weighted_sum(eps, x, y.detach(), h, y, p=p)
    return t if batched else t[0]
