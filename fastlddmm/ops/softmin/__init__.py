"""The softmin op: Sinkhorn's reduction f_i = -eps log Σ_j exp(h_j - C(x_i, y_j) / eps).

The cost is C(x, y) = |x - y|^p / p (p = 1 or 2); for p = 1 the distance is sqrt(max(|x - y|², 1e-8))
as in GeomLoss's "tensorized" backend, so coincident points get a finite (zero) gradient.

The room (which backend runs is decided in fastlddmm/dispatch.py, rule ``_auto_softmin``):

    reference.py    dense logsumexp over the (B, N, M) cost matrix: the ground truth, memory O(B·N·M)
    cpu.py          C++/OpenMP streaming soft-min (csrc/softmin/, online log-sum-exp, polynomial exp2),
                    memory O(B·(N + M)); differentiates x only (the solver detaches y and h)
    keops.py        KeOps logsumexp reductions, memory O(B·(N + M))
    triton.py       streaming Triton kernels (kernels/softmin.py), memory O(B·(N + M))

The contract: each backend module has a class ``Softmin(p)`` (a subclass of the one below) with

    cost(x (B, N, D), y (B, M, D)) -> cost object   once per problem (y comes detached); the dense
                                                      backend builds the matrix, streaming ones keep (x, y)
    __call__(eps, cost, h (B, M)) -> f (B, N)         differentiable in x (and y, h where the backend says)
    pair(eps, c_xy, h_y, c_yx, h_x) -> (f (B, N), g (B, M))
                                                      the x <- y and y <- x reductions of one Sinkhorn update;
                                                      a backend may share one pass over the same pairs

The Sinkhorn solver that runs on it (ε schedule, loop, divergence, potentials) is fastlddmm/sinkhorn_solver.py.
"""

from __future__ import annotations

from torch import Tensor

# GeomLoss's floor on squared distances under the p = 1 square root: a finite gradient at 0.
P1_SQDIST_FLOOR = 1e-8


class Softmin:
    """The contract (see the module docstring); backends override cost and __call__, and pair when they
    can share work between the two directions."""

    def __init__(self, p: int):
        if isinstance(p, bool) or p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        self.p = p

    def cost(self, x: Tensor, y: Tensor) -> object:  # (B, N, D), (B, M, D)
        return x.contiguous(), y.contiguous()

    def __call__(self, eps: float, cost: object, h: Tensor) -> Tensor:  # h: (B, M) -> (B, N)
        raise NotImplementedError  # abstract: every backend module defines it

    def pair(self, eps: float, c_xy: object, h_y: Tensor, c_yx: object, h_x: Tensor) -> tuple[Tensor, Tensor]:
        return self(eps, c_xy, h_y), self(eps, c_yx, h_x)

    def __repr__(self) -> str:
        return f"{type(self).__module__}.Softmin(p={self.p})"


def softmin_for(
    backend: str,
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    p: int,
) -> Softmin:
    """The Softmin of the backend fastlddmm.dispatch picks for reductions between x and y."""
    from ... import dispatch

    return dispatch.implementation("softmin", backend, dispatch.problem(x, y)).Softmin(p)
