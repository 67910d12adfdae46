"""The Sinkhorn solver that every backend runs: ε schedule, loop, divergence, potentials.

Shared machinery, not a backend: it is written against the soft-min contract of fastlddmm/ops/softmin
(``softmin.cost(query, ref)`` once per problem, ``softmin(eps, cost, h)`` and ``softmin.pair(...)`` per
iteration), so backends differ in the soft-min only. fl.sinkhorn / fl.sinkhorn_potentials /
fl.sinkhorn_projection run it with the soft-min fastlddmm.dispatch picks; fastlddmm.distributed runs it
with a soft-min that reduces over every rank's shard (it passes its own ``x_ref``/``y_ref``).

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

Memory: what the soft-min's cost objects take (the dense reference: O(B·(N + M)²); the streaming
backends: O(B·(N + M))).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

P_VALUES = (1, 2)  # the cost |x - y|^p / p of every soft-min (fastlddmm/ops/softmin)
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

def sinkhorn_loop(
    softmin,  # an ops.softmin.Softmin: softmin(eps, cost, h) and softmin.pair(...)
    a_log: Tensor,  # (B, N) log-weights of x, no gradient
    b_log: Tensor,  # (B, M) log-weights of y, no gradient
    c_xy: object,  # cost "x <- y" from softmin.cost (a (B, N, M) matrix, or the point clouds)
    c_yx: object,  # cost "y <- x"
    c_xx: object | None,  # cost "x <- x" (debias only)
    c_yy: object | None,  # cost "y <- y" (debias only)
    eps_list: list[float],
    rho: float | None,
    debias: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:  # f_aa (B, N), g_bb (B, M), g_ab (B, M), f_ba (B, N)
    """Symmetric log-domain Sinkhorn with ε-scaling; returns the dual potentials of the a<->b
    problem (and of the a<->a, b<->b problems when debias).

    ``softmin(eps, c_xy, h)`` returns ``f_i = -eps log Σ_j exp(h_j - C(x_i, y_j) / eps)``; ``softmin.pair``
    does the x <- y and y <- x reductions of one update together (a backend may share one pass over them).
    The iterations run without autograd; the final update is taped, with the previous potentials
    detached, so that gradients follow from the envelope theorem at O(N + M) extra memory.
    """
    with torch.no_grad():
        eps = eps_list[0]
        damp = damping(eps, rho)
        # At eps = diameter^p the soft-min is nearly a weighted mean of the cost: a fair start.
        f_ba, g_ab = softmin.pair(eps, c_xy, b_log, c_yx, a_log)
        f_ba, g_ab = damp * f_ba, damp * g_ab
        if debias:
            f_aa = damp * softmin(eps, c_xx, a_log)
            g_bb = damp * softmin(eps, c_yy, b_log)

        for eps in eps_list:
            damp = damping(eps, rho)
            # Both potentials from the old pair, then averaged: symmetric updates.
            ft_ba, gt_ab = softmin.pair(eps, c_xy, b_log + g_ab / eps, c_yx, a_log + f_ba / eps)
            ft_ba, gt_ab = damp * ft_ba, damp * gt_ab
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
    f_ba, g_ab = softmin.pair(eps, c_xy, h_y, c_yx, h_x)
    f_ba, g_ab = damp * f_ba, damp * g_ab
    if not debias:
        return None, None, g_ab, f_ba
    f_aa, g_bb = damp * softmin(eps, c_xx, h_xx), damp * softmin(eps, c_yy, h_yy)
    return f_aa, g_bb, g_ab, f_ba


def symmetric_potential(
    softmin,  # an ops.softmin.Softmin
    a_log: Tensor,  # (B, N) log-weights of x, no gradient
    c_xx: object,  # cost "x <- x" from softmin.cost
    eps_list: list[float],
    max_steps: int = 64,
) -> Tensor:  # (B, N), no gradient
    """The converged potential of the symmetric problem OT_eps(a, a): the fixed point of
    ``f_i = smin_{eps, k~a} [C(x_i, x_k) - f_k]`` at eps = eps_list[-1].

    GeomLoss's averaged updates ``f <- (f + smin(f)) / 2`` along the ε-scaling schedule (the debias
    half of sinkhorn_loop, balanced), then the same update at the last eps until it stops moving
    (|Δf| <= 8 ulp of max|f|) or after ``max_steps`` more. Each update contracts by 1/2 or better:
    its Jacobian is (I - P) / 2, where P = (softmax_k(a_log_k + (f_k - C_ik) / eps))_ik has its
    eigenvalues in [0, 1] (P = K diag(a) with K = exp((f_i + f_k - C_ik) / eps) positive
    semi-definite, as exp(-C / eps) is for C = |x - y|^p / p, p = 1 or 2). So, unlike sinkhorn_loop,
    the result does not depend on the schedule: it is the fixed point to rounding, which is what
    differentiating it by the implicit function theorem needs (fastlddmm/compat/hausdorff.py).
    """
    with torch.no_grad():
        f = softmin(eps_list[0], c_xx, a_log)
        for eps in eps_list:
            f = 0.5 * (f + softmin(eps, c_xx, a_log + f / eps))
        tol = 8 * torch.finfo(f.dtype).eps
        for _ in range(max_steps):
            new = 0.5 * (f + softmin(eps, c_xx, a_log + f / eps))
            moved = (new - f).abs().max().item()
            f = new
            if moved <= tol * (f.abs().max().item() + eps):
                break
    return f


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
# Front-ends: one problem, any soft-min
# ------------------------------------------------------------------------------------------------


def check_p(p) -> int:
    if isinstance(p, bool) or p not in P_VALUES:
        raise ValueError(f"p must be one of {P_VALUES}, got {p!r}")
    return p


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


class Potentials(NamedTuple):
    """What the loop leaves: the final temperature, rho, and the dual potentials."""

    eps: float
    rho: float | None
    f_aa: Tensor | None  # (B, N) debias only
    g_bb: Tensor | None  # (B, M) debias only
    g_ab: Tensor  # (B, M)
    f_ba: Tensor  # (B, N)


def solve(
    softmin,  # an ops.softmin.Softmin for cost |x - y|^p / p
    x: Tensor,  # (B, N, D) the query points of the x side (differentiable)
    y: Tensor,  # (B, M, D)
    a: Tensor,  # (B, N)
    b: Tensor,  # (B, M)
    blur: float,
    p: int,
    scaling: float,
    reach: float | None,
    debias: bool,
    *,
    x_ref=None,  # what the soft-min reduces over on the x side (default x.detach(); a shard when sharded)
    y_ref=None,  # the same on the y side
) -> Potentials:
    """Runs sinkhorn_loop with any soft-min: the solver of every backend, and of the sharded version."""
    check_p(p)
    eps, rho = blur**p, (None if reach is None else reach**p)
    eps_list = epsilon_schedule(p, max_diameter(x, y), blur, scaling)
    # As in GeomLoss, the right-hand point cloud of every cost is detached (see sinkhorn_loop).
    x_ref = x.detach() if x_ref is None else x_ref
    y_ref = y.detach() if y_ref is None else y_ref
    c_xy, c_yx = softmin.cost(x, y_ref), softmin.cost(y, x_ref)
    c_xx = softmin.cost(x, x_ref) if debias else None
    c_yy = softmin.cost(y, y_ref) if debias else None
    f_aa, g_bb, g_ab, f_ba = sinkhorn_loop(
        softmin, log_weights(a), log_weights(b), c_xy, c_yx, c_xx, c_yy, eps_list, rho, debias)
    return Potentials(eps, rho, f_aa, g_bb, g_ab, f_ba)


def divergence(softmin, x, y, a, b, blur, p, scaling, reach, debias) -> Tensor:  # () or (B,)
    """The Sinkhorn divergence of (a, x) and (b, y) ((N, D) or batched (B, N, D) inputs) with ``softmin``."""
    batched = x.dim() == 3
    x, y, a, b = prepare(x, y, a, b)
    pot = solve(softmin, x, y, a, b, blur, p, scaling, reach, debias)
    cost = sinkhorn_cost(pot.eps, pot.rho, a, b, pot.f_aa, pot.g_bb, pot.g_ab, pot.f_ba, debias)
    return cost if batched else cost[0]


def potentials(softmin, x, y, a, b, blur, p, scaling, reach, debias) -> tuple[Tensor, Tensor]:
    """GeomLoss's ``potentials=True`` output with ``softmin``: (f_ba - f_aa, g_ab - g_bb) when debias,
    else (f_ba, g_ab); (N,), (M,) or batched (B, N), (B, M)."""
    batched = x.dim() == 3
    x, y, a, b = prepare(x, y, a, b)
    pot = solve(softmin, x, y, a, b, blur, p, scaling, reach, debias)
    f, g = (pot.f_ba - pot.f_aa, pot.g_ab - pot.g_bb) if debias else (pot.f_ba, pot.g_ab)
    return (f, g) if batched else (f[0], g[0])


def projection_logits(softmin, x, y, a, b, blur, p, scaling, reach):
    """What every barycentric projection needs: the batched (B, N, D) / (B, M, D) points, eps, and
    h_j = log b_j + g_j / eps (differentiable through g), so that
    T(x_i) = Σ_j softmax_j(h_j - C(x_i, y_j) / eps) y_j. Also returns whether the input was batched."""
    batched = x.dim() == 3
    x, y, a, b = prepare(x, y, a, b)
    pot = solve(softmin, x, y, a, b, blur, p, scaling, reach, False)
    return x, y, pot.eps, log_weights(b) + pot.g_ab / pot.eps, batched
