"""Launchers of the compiled CUDA path of the fused Euler flow (csrc/euler_flow/euler_flow_cuda.cu).

Same contract as kernels/euler_flow.py. The kernels run on torch's current stream of the tensors'
device (its handle passed as an integer), so they order correctly with the surrounding torch work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ._euler_flow_cpu import _check


def _module():
    mod = _backend.compiled_module()
    if mod is None or not getattr(mod, "has_cuda", lambda: False)():
        raise _backend.BackendUnavailableError(f"backend 'cuda' is not available: {_backend.status('cuda').reason}")
    return mod


def max_dim() -> int:
    """The largest point dimension D the CUDA kernels take (points live in registers)."""
    mod = _backend.compiled_module()
    return int(getattr(mod, "CUDA_MAX_DIM", 0)) if mod is not None else 0


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
    """Fused forward on the GPU: the points after L Euler steps, every layer's input and the energy."""
    dtype = _check({"x": x, "weight1": weight1, "bias1": bias1, "weight2": weight2, "bias2": bias2}, "cuda")
    mod = _module()
    n, dim = x.shape
    layers, width, _ = weight1.shape
    with torch.cuda.device(x.device):
        x_final = torch.empty_like(x)
        states = x.new_empty((layers if save_states else 0, n, dim))
        energy_acc = torch.zeros((), dtype=torch.float64, device=x.device)  # Σ_l Σ_i |v|², accumulated in double
        mod.euler_flow_forward_cuda(
            dtype, x.data_ptr(), weight1.data_ptr(), bias1.data_ptr(), weight2.data_ptr(), bias2.data_ptr(),
            float(dt), activation, n, dim, width, layers, x_final.data_ptr(),
            states.data_ptr() if save_states and layers > 0 else 0, energy_acc.data_ptr(),
            torch.cuda.current_stream(x.device).cuda_stream,
        )
        energy = (energy_acc * (0.5 * float(dt) / n)).to(x.dtype)
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
    """Fused backward on the GPU (recomputes the hidden activations from states)."""
    dtype = _check({"grad_x_final": grad_x_final, "states": states, "weight1": weight1, "bias1": bias1,
                    "weight2": weight2, "bias2": bias2}, "cuda")
    mod = _module()
    n, dim = grad_x_final.shape
    layers, width, _ = weight1.shape
    if tuple(states.shape) != (layers, n, dim):
        raise ValueError(f"euler_flow launcher: states must have shape {(layers, n, dim)}, got {tuple(states.shape)}")
    with torch.cuda.device(grad_x_final.device):
        # read on the device: no host sync for the scalar
        grad_energy = grad_energy.to(device=grad_x_final.device, dtype=grad_x_final.dtype).reshape(1).contiguous()
        grad_x = torch.empty_like(grad_x_final)
        grads = [torch.zeros_like(p) for p in (weight1, bias1, weight2, bias2)]  # accumulated with atomics
        mod.euler_flow_backward_cuda(
            dtype, grad_x_final.data_ptr(), grad_energy.data_ptr(), states.data_ptr(),
            weight1.data_ptr(), bias1.data_ptr(), weight2.data_ptr(), bias2.data_ptr(),
            float(dt), activation, n, dim, width, layers,
            grad_x.data_ptr(), *(g.data_ptr() for g in grads),
            torch.cuda.current_stream(grad_x_final.device).cuda_stream,
        )
    return (grad_x, *grads)
