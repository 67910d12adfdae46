"""fl.ResNetFlow: L residual blocks = L forward-Euler steps of a time-dependent velocity field."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import dispatch
from ._validation import check_choice, check_positive
from .ops.flow import euler_flow
from .ops.flow import reference as _ref


class ResNetFlow(nn.Module):
    """The ResNet-LDDMM flow φ_1 = (id + Δ v_{L-1}) ∘ ... ∘ (id + Δ v_0), Δ = 1/L.

    Each block v_l(x) = W2_l ρ(W1_l x + b1_l) + b2_l (see fastlddmm/ops/flow/reference.py for the paper
    details followed). Parameters are stacked over layers:
    weight1 (L, H, D), bias1 (L, H), weight2 (L, D, H), bias2 (L, D).

    Initialisation: W1, b1 as nn.Linear's default (uniform ±1/√D); W2 = 0, b2 = 0, so the flow starts
    at the identity with zero energy.

    Args:
        dim: D, the dimension of the points (2 or 3 usually; any D ≥ 1 works).
        width: H, hidden units per block (the paper uses 500).
        layers: L, number of residual blocks / Euler steps.
        activation: "relu" (the paper's), "tanh" or "softplus" (smooth: a true diffeomorphism).
        backend: "auto", "reference", "cpu", "triton" or "cuda" for the fused flow op.
        deterministic: keep backend="auto" off kernels that sum with atomics (bitwise-reproducible runs;
            see fastlddmm.dispatch).
    """

    def __init__(self, dim: int = 3, width: int = 500, layers: int = 10, activation: str = "relu",
                 backend: str = "auto", *, deterministic: bool = False):
        super().__init__()
        check_positive(dim, "dim", integer=True)
        check_positive(width, "width", integer=True)
        check_positive(layers, "layers", integer=True)
        check_choice(activation, "activation", _ref.ACTIVATIONS)
        self.backend = dispatch.check_name(backend)
        self.deterministic = bool(deterministic)
        self.dim, self.width, self.layers, self.activation = dim, width, layers, activation
        bound = 1.0 / math.sqrt(dim)
        self.weight1 = nn.Parameter(torch.empty(layers, width, dim).uniform_(-bound, bound))
        self.bias1 = nn.Parameter(torch.empty(layers, width).uniform_(-bound, bound))
        self.weight2 = nn.Parameter(torch.zeros(layers, dim, width))
        self.bias2 = nn.Parameter(torch.zeros(layers, dim))

    @property
    def dt(self) -> float:
        return 1.0 / self.layers

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, width={self.width}, layers={self.layers}, "
                f"activation={self.activation!r}, backend={self.backend!r}")

    def params(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.weight1, self.bias1, self.weight2, self.bias2

    def _check_input(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"points must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"points must have shape (..., {self.dim}), got {tuple(x.shape)}")
        if x.dtype != self.weight1.dtype:
            raise TypeError(f"points are {x.dtype} but the flow's parameters are {self.weight1.dtype}; "
                            f"convert one of them (flow.to(points.dtype) or points.to(...))")
        if x.device != self.weight1.device:
            raise ValueError(f"points are on {x.device} but the flow is on {self.weight1.device}")
        return x

    def forward_with_energy(self, x: Tensor) -> tuple[Tensor, Tensor]:  # x: (..., D) -> (..., D), ()
        """The points moved to time 1 and the kinetic energy, in one fused pass when a fast path exists."""
        x = self._check_input(x)
        return euler_flow(x, *self.params(), self.dt, self.activation, backend=self.backend,
                          deterministic=self.deterministic)

    def forward(self, x: Tensor) -> Tensor:  # (..., D) -> (..., D)
        return self.forward_with_energy(x)[0]

    def energy(self, x: Tensor) -> Tensor:  # (..., D) -> ()
        """The kinetic-energy term ½ Σ_l Δ · mean_i |v_l(x_i^l)|² along the flow of x."""
        return self.forward_with_energy(x)[1]

    def _chunk(self, chunk: int | None, numbers_per_point: int) -> int:
        """Points per chunk: ``chunk``, or about 256 MB of float32 temporaries (2^26 numbers)."""
        if chunk is None:
            return max(1024, 2**26 // numbers_per_point)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        return chunk

    def _by_chunks(self, fn, x: Tensor, chunk: int, leading: int = 0) -> Tensor:
        """fn over blocks of ``chunk`` points of x (..., D), glued back: fn maps (K, D) to
        (*leading dims, K, ...) and the result has x's batch shape in place of K."""
        flat = x.reshape(-1, self.dim)
        parts = [fn(flat[i : i + chunk]) for i in range(0, flat.shape[0], chunk)] or [fn(flat)]
        out = torch.cat(parts, dim=leading)
        return out.reshape(out.shape[:leading] + x.shape[:-1] + out.shape[leading + 1 :])

    def trajectory(self, x: Tensor, *, chunk: int | None = None) -> Tensor:  # (..., D) -> (layers + 1, ..., D)
        """x at every time l/L, l = 0 .. L. Points go through in chunks of ``chunk`` (default: about 256 MB
        of hidden activations, H numbers a point)."""
        x = self._check_input(x)
        run = lambda part: _ref.trajectory(part, *self.params(), self.dt, self.activation)  # noqa: E731
        return self._by_chunks(run, x, self._chunk(chunk, self.width), leading=1)

    def velocity(self, x: Tensor, layer: int) -> Tensor:  # (..., D) -> (..., D)
        """v_layer(x), the velocity of block ``layer``."""
        return _ref.velocity(x, self.weight1[layer], self.bias1[layer], self.weight2[layer],
                             self.bias2[layer], self.activation)

    @torch.no_grad()
    def inverse(self, y: Tensor, *, iterations: int = 50, tol: float | None = None,
                chunk: int | None = None) -> Tensor:  # (..., D) -> (..., D)
        """φ_1^{-1}(y): the Euler steps run backwards, each inverted by a fixed-point solve.

        Step l maps x to y = x + Δ v_l(x); its inverse solves x = y - Δ v_l(x) by the iteration
        x ← y - Δ v_l(x), a contraction when Δ·Lip(v_l) < 1 (the regime in which the step is invertible).
        Points go through in chunks of ``chunk`` (default: about 256 MB of hidden activations).
        """
        y = self._check_input(y)
        if tol is None:
            tol = 1e-6 if y.dtype == torch.float32 else 1e-12
        if y.numel() == 0:
            return y.clone()
        return self._by_chunks(lambda part: self._inverse(part, iterations, tol), y, self._chunk(chunk, self.width))

    def _inverse(self, y: Tensor, iterations: int, tol: float) -> Tensor:  # (K, D) -> (K, D)
        x = y
        for layer in reversed(range(self.layers)):
            target = x
            threshold = tol * (1.0 + float(target.abs().max()))
            guess = target - self.dt * self.velocity(target, layer)
            for _ in range(iterations):
                new = target - self.dt * self.velocity(guess, layer)
                change = float((new - guess).abs().max())
                guess = new
                if change <= threshold:
                    break
            x = guess
        return x

    def jacobian(self, x: Tensor, *, chunk: int | None = None) -> Tensor:  # (..., D) -> (..., D, D)
        """Dφ_1(x_i) for each point, by autograd (D backward passes): jac[..., k, :] = ∇ φ_k.

        Points go through in chunks of ``chunk`` (default: about 256 MB of stored activations, L·H numbers a
        point), so that dense grids and clouds of millions of points fit in memory."""
        x = self._check_input(x)
        chunk = self._chunk(chunk, self.layers * self.width)
        return self._by_chunks(self._jacobian, x.detach(), chunk)

    def jacobian_determinant(self, x: Tensor, *, chunk: int | None = None) -> Tensor:  # (..., D) -> (...)
        """det Dφ_1(x_i) for each point (see jacobian). > 0 everywhere: no fold."""
        return torch.linalg.det(self.jacobian(x, chunk=chunk))

    def _jacobian(self, x: Tensor) -> Tensor:  # (K, D) -> (K, D, D)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            y = _ref.euler_flow(xr, *self.params(), self.dt, self.activation)[0]
            rows = [torch.autograd.grad(y[..., k].sum(), xr, retain_graph=k + 1 < self.dim)[0]
                    for k in range(self.dim)]
        return torch.stack(rows, dim=-2).detach()  # (K, D, D): jac[:, k, :] = ∇ y_k
