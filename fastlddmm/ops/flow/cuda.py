"""The ``cuda`` backend of euler_flow: launchers of csrc/euler_flow/euler_flow_cuda.cu (fastlddmm._C).

The launcher contract of the room (see fastlddmm/ops/flow/__init__.py). The kernels run on torch's
current stream of the tensors' device (its handle passed as an integer), under that device's guard, so
they order correctly with the surrounding torch work and never launch on another GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import dispatch
from .cpu import check_buffers, check_states


def _module():
    mod = dispatch.compiled_module()
    if mod is None or not mod.has_cuda():
        raise dispatch.BackendUnavailableError(f"backend 'cuda' is not available: {dispatch.status('cuda').reason}")
    return mod


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
) -> tuple[Tensor, Tensor, Tensor]:  # x_final (N, D), states (L, N, D) or (0, N, D), kinetic sum () float64
    """Fused forward on the GPU: the points after L Euler steps, every layer's input and S = Σ_l Σ_i |v|²."""
    dtype = check_buffers({"x": x, "weight1": weight1, "bias1": bias1, "weight2": weight2, "bias2": bias2}, "cuda")
    mod = _module()
    n, dim = x.shape
    layers, width, _ = weight1.shape
    with torch.cuda.device(x.device):
        x_final = torch.empty_like(x)
        states = x.new_empty((layers if save_states else 0, n, dim))
        kinetic_sum = torch.zeros((), dtype=torch.float64, device=x.device)  # accumulated with atomics, in double
        mod.euler_flow_forward_cuda(
            dtype, x.data_ptr(), weight1.data_ptr(), bias1.data_ptr(), weight2.data_ptr(), bias2.data_ptr(),
            float(dt), activation, n, dim, width, layers, x_final.data_ptr(),
            states.data_ptr() if save_states and layers > 0 else 0, kinetic_sum.data_ptr(),
            torch.cuda.current_stream(x.device).cuda_stream,
        )
    return x_final, states, kinetic_sum


def backward(
    grad_x_final: Tensor,  # (N, D)
    grad_kinetic_sum: Tensor,  # () dLoss/dS
    states: Tensor,  # (L, N, D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # grad_x (N, D), then the params' shapes
    """Fused backward on the GPU (recomputes the hidden activations from states)."""
    dtype = check_buffers({"grad_x_final": grad_x_final, "states": states, "weight1": weight1, "bias1": bias1,
                           "weight2": weight2, "bias2": bias2}, "cuda")
    mod = _module()
    n, dim = grad_x_final.shape
    layers, width, _ = weight1.shape
    check_states(states, layers, n, dim)
    with torch.cuda.device(grad_x_final.device):
        # read on the device: no host sync for the scalar
        gs = grad_kinetic_sum.to(device=grad_x_final.device, dtype=grad_x_final.dtype).reshape(1).contiguous()
        grad_x = torch.empty_like(grad_x_final)
        grads = [torch.zeros_like(p) for p in (weight1, bias1, weight2, bias2)]  # accumulated with atomics
        mod.euler_flow_backward_cuda(
            dtype, grad_x_final.data_ptr(), gs.data_ptr(), states.data_ptr(),
            weight1.data_ptr(), bias1.data_ptr(), weight2.data_ptr(), bias2.data_ptr(),
            float(dt), activation, n, dim, width, layers,
            grad_x.data_ptr(), *(g.data_ptr() for g in grads),
            torch.cuda.current_stream(grad_x_final.device).cuda_stream,
        )
    return (grad_x, *grads)
