"""Launchers of the compiled CPU path of the fused Euler flow (csrc/euler_flow/euler_flow_cpu.cpp).

Same contract as kernels/euler_flow.py: contiguous tensors of one dtype (float32 or float64), N ≥ 1.
torch allocates every buffer; fastlddmm._C only gets data pointers (no torch C++ ABI involved).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _module():
    mod = _backend.compiled_module()
    if mod is None:
        raise _backend.BackendUnavailableError(f"backend 'cpu' is not available: {_backend.status('cpu').reason}")
    return mod


def _check(tensors: dict[str, Tensor], device_type: str) -> str:
    """All contiguous, one float dtype, on ``device_type``: the kernels read raw buffers."""
    dtype = next(iter(tensors.values())).dtype
    for name, t in tensors.items():
        if t.dtype != dtype or dtype not in _DTYPES:
            raise TypeError(f"euler_flow launcher: {name} must be float32 or float64 like the others, got {t.dtype}")
        if t.device.type != device_type:
            raise ValueError(f"euler_flow launcher: {name} must be on {device_type}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"euler_flow launcher: {name} must be contiguous")
    return _DTYPES[dtype]


def forward(
    x: Tensor,  # (N, D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
    *,
    save_states: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:  # x_final (N, D), states (L, N, D) or (0, N, D), energy ()
    """Fused forward: the points after L Euler steps, every layer's input (when save_states) and the energy."""
    dtype = _check({"x": x, "weight1": weight1, "bias1": bias1, "weight2": weight2, "bias2": bias2}, "cpu")
    n, dim = x.shape
    layers, width, _ = weight1.shape
    x_final = torch.empty_like(x)
    states = x.new_empty((layers if save_states else 0, n, dim))
    energy = x.new_empty(())
    _module().euler_flow_forward_cpu(
        dtype, x.data_ptr(), weight1.data_ptr(), bias1.data_ptr(), weight2.data_ptr(), bias2.data_ptr(),
        float(dt), activation, n, dim, width, layers, torch.get_num_threads(),
        x_final.data_ptr(), states.data_ptr() if save_states and layers > 0 else 0, energy.data_ptr(),
    )
    return x_final, states, energy


def backward(
    grad_x_final: Tensor,  # (N, D)
    grad_energy: Tensor,  # ()
    states: Tensor,  # (L, N, D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # grad_x (N, D), then the params' shapes
    """Fused backward (recomputes the hidden activations from states)."""
    dtype = _check({"grad_x_final": grad_x_final, "states": states, "weight1": weight1, "bias1": bias1,
                    "weight2": weight2, "bias2": bias2}, "cpu")
    n, dim = grad_x_final.shape
    layers, width, _ = weight1.shape
    if tuple(states.shape) != (layers, n, dim):
        raise ValueError(f"euler_flow launcher: states must have shape {(layers, n, dim)}, got {tuple(states.shape)}")
    grad_x = torch.empty_like(grad_x_final)
    grads = [torch.empty_like(p) for p in (weight1, bias1, weight2, bias2)]
    _module().euler_flow_backward_cpu(
        dtype, grad_x_final.data_ptr(), float(grad_energy), states.data_ptr(),
        weight1.data_ptr(), bias1.data_ptr(), weight2.data_ptr(), bias2.data_ptr(),
        float(dt), activation, n, dim, width, layers, torch.get_num_threads(),
        grad_x.data_ptr(), *(g.data_ptr() for g in grads),
    )
    return (grad_x, *grads)
