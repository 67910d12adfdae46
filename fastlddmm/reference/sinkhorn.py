"""PyTorch implementation of sinkhorn: the (debiased, possibly unbalanced) Sinkhorn divergence.

Same value and gradient conventions as GeomLoss ``SamplesLoss("sinkhorn", p, blur, scaling, reach,
debias, backend="tensorized")``, so that a user can swap one for the other:

* cost ``C(x, y) = |x - y|^p / p`` for p in {1, 2}; for p = 1 the distance is
  ``sqrt(max(|x - y|², 1e-8))`` as in GeomLoss, so coincident points get a finite (zero) gradient;
* temperature ``eps = blur^p``, marginal penalty ``rho = reach^p`` (``reach=None``: balanced OT);
* ε-scaling: eps goes from ``diameter^p`` down to ``blur^p``, multiplied by ``scaling^p`` at each
  iteration, where ``diameter`` bounds the bounding box of *all* points (all batch items together);
* symmetric (averaged) log-domain updates, the unbalanced damping factor ``1 / (1 + eps / rho)``,
  and the debiased divergence ``OT(a, b) - OT(a, a) / 2 - OT(b, b) / 2`` through the xx / yy problems;
* gradients through the converged dual potentials (envelope theorem): the loop runs without
  autograd and one last, differentiable "extrapolation" step is taped; as in GeomLoss, the cost
  C(x_i, y_j) used to update the potential on x is differentiated with respect to x only.

The loop (``sinkhorn_loop``) is generic over the soft-min ``softmin(eps, cost, h)``: here dense
logsumexp over a (B, N, M) cost matrix; ``fastlddmm.keops.sinkhorn`` plugs in KeOps reductions.
Memory of this dense version: O(B·(N + M)²).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

P_VALUES = (1, 2)
# GeomLoss's floor on squared distances under the p = 1 square root: a finite gradient at 0.
P1_SQDIST_FLOOR = 1e-8
# Log-weight given to zero-weight points (GeomLoss's convention; exp(-1e5) is an exact 0).
ZERO_WEIGHT_LOG = -100000.0


# ------------------------------------------------------------------------------------------------
# Parameters of the ε-scaling loop
# ------------------------------------------------------------------------------------------------


def damping(eps: float, rho: float | None) -> float:
    """Damping of the dual updates for KL-penalised marginals (1 for balanced OT)."""
    return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)


def max_diameter(x: Tensor, y: Tensor) -> float:  # x: (..., N, D), y: (..., M, D)
    """Diagonal of the bounding box of all the points of x and y (every batch item together)."""
    with torch.no_grad():
        dim = x.shape[-1]
        xs, ys = x.reshape(-1, dim), y.reshape(-1, dim)
        lo = torch.minimum(xs.min(dim=0).values, ys.min(dim=0).values)
        hi = torch.maximum(xs.max(dim=0).values, ys.max(dim=0).values)
        return (hi - lo).norm().item()


def epsilon_schedule(p: int, diameter: float, blur: float, scaling: float) -> list[float]:
    """Temperatures of the ε-scaling loop: diameter^p, then ×scaling^p per step (in log space, as
    GeomLoss does) while above blur^p, then blur^p. Its length is the number of iterations."""
    if diameter <= 0:  # every point at one place: nothing to anneal (GeomLoss would take log(0))
        diameter = blur
    steps = np.arange(p * math.log(diameter), p * math.log(blur), p * math.log(scaling))
    return [diameter**p] + [float(np.exp(e)) for e in steps] + [blur**p]


def log_weights(a: Tensor) -> Tensor:  # (B, N) -> (B, N)
    """log(a), with zero weights sent to -1e5 rather than -inf (no NaN in the soft-min)."""
    a = a.detach()
    return torch.where(a > 0, a.log(), a.new_full((), ZERO_WEIGHT_LOG))


# ------------------------------------------------------------------------------------------------
# The generic loop and the cost formula
# ------------------------------------------------------------------------------------------------

Softmin = Callable[[float, object, Tensor], Tensor]  # (eps, cost, h: (B, M)) -> (B, N)


def sinkhorn_loop(
    softmin: Softmin,
    a_log: Tensor,  # (B, N) log-weights of x, no gradient
    b_log: Tensor,  # (B, M) log-weights of y, no gradient
    c_xy: object,  # cost "x <- y" as softmin understands it (a (B, N, M) matrix, or point clouds)
    c_yx: object,  # cost "y <- x"
    c_xx: object | None,  # cost "x <- x" (debias only)
    c_yy: object | None,  # cost "y <- y" (debias only)
    eps_list: list[float],
    rho: float | None,
    debias: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:  # f_aa (B, N), g_bb (B, M), g_ab (B, M), f_ba (B, N)
    """Symmetric log-domain Sinkhorn with ε-scaling; returns the dual potentials of the a<->b
    problem (and of the a<->a, b<->b problems when debias).

    ``softmin(eps, c_xy, h)`` must return ``f_i = -eps log Σ_j exp(h_j - C(x_i, y_j) / eps)``.
    The iterations run without autograd; the final update is taped, with the previous potentials
    detached, so that gradients follow from the envelope theorem at O(N + M) extra memory.
    """
    with torch.no_grad():
        eps = eps_list[0]
        damp = damping(eps, rho)
        # At eps = diameter^p the soft-min is nearly a weighted mean of the cost: a fair start.
        g_ab = damp * softmin(eps, c_yx, a_log)
        f_ba = damp * softmin(eps, c_xy, b_log)
        if debias:
            f_aa = damp * softmin(eps, c_xx, a_log)
            g_bb = damp * softmin(eps, c_yy, b_log)

        for eps in eps_list:
            damp = damping(eps, rho)
            # Both potentials from the old pair, then averaged: symmetric updates.
            ft_ba = damp * softmin(eps, c_xy, b_log + g_ab / eps)
            gt_ab = damp * softmin(eps, c_yx, a_log + f_ba / eps)
            if debias:
                ft_aa = damp * softmin(eps, c_xx, a_log + f_aa / eps)
                gt_bb = damp * softmin(eps, c_yy, b_log + g_bb / eps)
            f_ba, g_ab = 0.5 * (f_ba + ft_ba), 0.5 * (g_ab + gt_ab)
            if debias:
                f_aa, g_bb = 0.5 * (f_aa + ft_aa), 0.5 * (g_bb + gt_bb)

        h_x, h_y = a_log + f_ba / eps, b_log + g_ab / eps
        if debias:
            h_xx, h_yy = a_log + f_aa / eps, b_log + g_bb / eps

    # Last extrapolation, taped: the only place where gradients enter.
    f_ba, g_ab = damp * softmin(eps, c_xy, h_y), damp * softmin(eps, c_yx, h_x)
    if not debias:
        return None, None, g_ab, f_ba
    f_aa, g_bb = damp * softmin(eps, c_xx, h_xx), damp * softmin(eps, c_yy, h_yy)
    return f_aa, g_bb, g_ab, f_ba


def sinkhorn_cost(
    eps: float,
    rho: float | None,
    a: Tensor,  # (B, N)
    b: Tensor,  # (B, M)
    f_aa: Tensor | None,  # (B, N)
    g_bb: Tensor | None,  # (B, M)
    g_ab: Tensor,  # (B, M)
    f_ba: Tensor,  # (B, N)
    debias: bool = True,
) -> Tensor:  # (B,)
    """The (debiased) entropic OT cost from the dual potentials, with GeomLoss's dual formulas
    (Séjourné et al. 2019, Prop. 12, for the unbalanced case: weights rho + eps / 2)."""
    if rho is None:
        if debias:
            return (a * (f_ba - f_aa)).sum(-1) + (b * (g_ab - g_bb)).sum(-1)
        return (a * f_ba).sum(-1) + (b * g_ab).sum(-1)
    weight = rho + eps / 2
    if debias:
        fa = weight * ((-f_aa / rho).exp() - (-f_ba / rho).exp())
        gb = weight * ((-g_bb / rho).exp() - (-g_ab / rho).exp())
    else:
        fa = weight * (1 - (-f_ba / rho).exp())
        gb = weight * (1 - (-g_ab / rho).exp())
    return (a * fa).sum(-1) + (b * gb).sum(-1)


# ------------------------------------------------------------------------------------------------
# Dense (tensorized) soft-min and the public reference functions
# ------------------------------------------------------------------------------------------------


def cost_matrix(x: Tensor, y: Tensor, p: int) -> Tensor:  # x: (B, N, D), y: (B, M, D) -> (B, N, M)
    """|x_i - y_j|^p / p, from coordinate differences (accurate far from the origin)."""
    d2 = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
    if p == 2:
        return d2 / 2
    if p == 1:
        return d2.clamp_min(P1_SQDIST_FLOOR).sqrt()
    raise ValueError(f"p must be one of {P_VALUES}, got {p!r}")


def softmin_dense(eps: float, c_xy: Tensor, h_y: Tensor) -> Tensor:  # c_xy: (B, N, M), h_y: (B, M) -> (B, N)
    """f_i = -eps log Σ_j exp(h_j - C_ij / eps), as a dense logsumexp."""
    return -eps * (h_y.unsqueeze(-2) - c_xy / eps).logsumexp(-1)


def prepare(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    a: Tensor | None,  # (N,) or (B, N)
    b: Tensor | None,  # (M,) or (B, M)
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # (B, N, D), (B, M, D), (B, N), (B, M)
    """Batched views of the inputs, with uniform weights 1/N, 1/M where a, b are None."""
    if x.dim() == 2:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
        a = None if a is None else a.unsqueeze(0)
        b = None if b is None else b.unsqueeze(0)
    if a is None:
        a = x.new_full(x.shape[:-1], 1.0 / x.shape[-2])
    if b is None:
        b = y.new_full(y.shape[:-1], 1.0 / y.shape[-2])
    return x, y, a, b


def solve(
    softmin: Softmin,
    costs: Callable[[Tensor, Tensor], object],  # (x, y) -> cost object, y already detached
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    a: Tensor,  # (B, N)
    b: Tensor,  # (B, M)
    blur: float,
    p: int,
    scaling: float,
    reach: float | None,
    debias: bool,
) -> tuple[float, float | None, Tensor | None, Tensor | None, Tensor, Tensor]:  # eps, rho, f_aa, g_bb, g_ab, f_ba
    """Runs sinkhorn_loop with any soft-min; shared by the dense reference and the KeOps backend."""
    if p not in P_VALUES:
        raise ValueError(f"p must be one of {P_VALUES}, got {p!r}")
    eps, rho = blur**p, (None if reach is None else reach**p)
    eps_list = epsilon_schedule(p, max_diameter(x, y), blur, scaling)
    # As in GeomLoss, the right-hand point cloud of every cost is detached (see sinkhorn_loop).
    c_xy, c_yx = costs(x, y.detach()), costs(y, x.detach())
    c_xx = costs(x, x.detach()) if debias else None
    c_yy = costs(y, y.detach()) if debias else None
    f_aa, g_bb, g_ab, f_ba = sinkhorn_loop(
        softmin, log_weights(a), log_weights(b), c_xy, c_yx, c_xx, c_yy, eps_list, rho, debias
    )
    return eps, rho, f_aa, g_bb, g_ab, f_ba


def _dense_costs(p: int):
    return lambda x, y: cost_matrix(x, y, p)


def softmin_parts(p: int) -> tuple[Softmin, Callable[[Tensor, Tensor], object]]:
    """(softmin, costs) of this backend for the shared loop: every Sinkhorn backend module has one, and
    fl.sinkhorn / fl.sinkhorn_potentials / the sharded Sinkhorn run divergence_with(*softmin_parts(p), ...)."""
    return softmin_dense, _dense_costs(p)


def divergence_with(softmin, costs, x, y, a, b, blur, p, scaling, reach, debias) -> Tensor:  # () or (B,)
    """The Sinkhorn divergence computed with a given soft-min (dense here, KeOps or Triton elsewhere):
    one front-end for every backend, so they differ in the soft-min only."""
    batched = x.dim() == 3
    x, y, a, b = prepare(x, y, a, b)
    eps, rho, f_aa, g_bb, g_ab, f_ba = solve(softmin, costs, x, y, a, b, blur, p, scaling, reach, debias)
    cost = sinkhorn_cost(eps, rho, a, b, f_aa, g_bb, g_ab, f_ba, debias)
    return cost if batched else cost[0]


def potentials_with(softmin, costs, x, y, a, b, blur, p, scaling, reach, debias) -> tuple[Tensor, Tensor]:
    """GeomLoss's ``potentials=True`` output with a given soft-min:
    (f_ba - f_aa, g_ab - g_bb) when debias else (f_ba, g_ab)."""
    batched = x.dim() == 3
    x, y, a, b = prepare(x, y, a, b)
    _, _, f_aa, g_bb, g_ab, f_ba = solve(softmin, costs, x, y, a, b, blur, p, scaling, reach, debias)
    f, g = (f_ba - f_aa, g_ab - g_bb) if debias else (f_ba, g_ab)
    return (f, g) if batched else (f[0], g[0])


def projection_logits_with(softmin, costs, x, y, a, b, blur, p, scaling, reach):
    """What every backend's barycentric projection needs: the batched (B, N, D) / (B, M, D) points,
    eps, and h_j = log b_j + g_j / eps (differentiable through g), so that
    T(x_i) = Σ_j softmax_j(h_j - C(x_i, y_j) / eps) y_j. Also returns whether the input was batched."""
    batched = x.dim() == 3
    x, y, a, b = prepare(x, y, a, b)
    eps, _, _, _, g_ab, _ = solve(softmin, costs, x, y, a, b, blur, p, scaling, reach, False)
    return x, y, eps, log_weights(b) + g_ab / eps, batched


def sinkhorn(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    a: Tensor | None = None,  # (N,) or (B, N), non-negative; None: uniform 1/N
    b: Tensor | None = None,  # (M,) or (B, M); None: uniform 1/M
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    debias: bool = True,
) -> Tensor:  # () or (B,)
    """PyTorch implementation of sinkhorn: GeomLoss's SamplesLoss("sinkhorn") with dense matrices."""
    return divergence_with(*softmin_parts(p), x, y, a, b, blur, p, scaling, reach, debias)


def sinkhorn_potentials(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    a: Tensor | None = None,  # (N,) or (B, N)
    b: Tensor | None = None,  # (M,) or (B, M)
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    debias: bool = True,
) -> tuple[Tensor, Tensor]:  # (N,) or (B, N) on x, (M,) or (B, M) on y
    """PyTorch implementation of sinkhorn_potentials: GeomLoss's ``potentials=True`` output."""
    return potentials_with(*softmin_parts(p), x, y, a, b, blur, p, scaling, reach, debias)


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
    """PyTorch implementation of sinkhorn_projection: the barycentric projection of the entropic
    plan of OT(a, b), T(x_i) = Σ_j π_ij y_j / Σ_j π_ij, with π_ij ∝ b_j exp((g_j - C(x_i, y_j)) / eps)
    (the potentials of the a<->b problem; debiasing does not change the plan)."""
    x, y, eps, h, batched = projection_logits_with(*softmin_parts(p), x, y, a, b, blur, p, scaling, reach)
    logits = h.unsqueeze(-2) - cost_matrix(x, y.detach(), p) / eps  # (B, N, M)
    t = logits.softmax(-1) @ y
    return t if batched else t[0]
