"""The ``cpu`` backend of euler_flow: launchers of csrc/euler_flow/euler_flow_cpu.cpp (fastlddmm._C).

The launcher contract of the room (see fastlddmm/ops/flow/__init__.py): contiguous tensors of one
dtype (float32 or float64), N >= 1. torch allocates every buffer; fastlddmm._C only gets data pointers
(no torch C++ ABI involved). OpenMP uses torch.get_num_threads() threads, read at every call, so
torch.set_num_threads and OMP_NUM_THREADS (which torch reads at start-up) mean what they say.

What the backward starts from: x itself (SAVED_FOR_BACKWARD["cpu"] == "input" in the room): the forward
stores no states, and the backward recomputes each tile's trajectory in cache.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import dispatch

_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _module():
    mod = dispatch.compiled_module()
    if mod is None:
        raise dispatch.BackendUnavailableError(f"backend 'cpu' is not available: {dispatch.status('cpu').reason}")
    return mod


def check_buffers(tensors: dict[str, Tensor], device_type: str) -> str:
    """All contiguous, one float dtype, on ``device_type``: the kernels read raw buffers. Returns the dtype's name."""
    dtype = next(iter(tensors.values())).dtype
    for name, t in tensors.items():
        if t.dtype != dtype or dtype not in _DTYPES:
            raise TypeError(f"euler_flow launcher: {name} must be float32 or float64 like the others, got {t.dtype}")
        if t.device.type != device_type:
            raise ValueError(f"euler_flow launcher: {name} must be on {device_type}, got {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"euler_flow launcher: {name} must be contiguous")
    return _DTYPES[dtype]


def check_states(states: Tensor, layers: int, n: int, dim: int) -> None:
    if tuple(states.shape) != (layers, n, dim):
        raise ValueError(f"euler_flow launcher: states must have shape {(layers, n, dim)}, got {tuple(states.shape)}")


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
) -> tuple[Tensor, Tensor, Tensor]:  # x_final (N, D), states (0, N, D), kinetic sum () float64
    """Fused forward: the points after L Euler steps and S = Σ_l Σ_i |v_l(x_i^l)|² (accumulated in
    double). ``save_states`` is accepted for the common contract; this backend saves nothing either way
    (its backward takes x)."""
    del save_states
    dtype = check_buffers({"x": x, "weight1": weight1, "bias1": bias1, "weight2": weight2, "bias2": bias2}, "cpu")
    n, dim = x.shape
    layers, width, _ = weight1.shape
    x_final = torch.empty_like(x)
    kinetic_sum = torch.zeros((), dtype=torch.float64)
    _module().euler_flow_forward_cpu(
        dtype, x.data_ptr(), weight1.data_ptr(), bias1.data_ptr(), weight2.data_ptr(), bias2.data_ptr(),
        float(dt), activation, n, dim, width, layers, torch.get_num_threads(), x_final.data_ptr(),
        kinetic_sum.data_ptr(),
    )
    return x_final, x.new_empty((0, n, dim)), kinetic_sum


def backward(
    grad_x_final: Tensor,  # (N, D)
    grad_kinetic_sum: Tensor,  # () dLoss/dS
    states: Tensor,  # (1, N, D): x[None], the forward's input
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # grad_x (N, D), then the params' shapes
    """Fused backward: runs each tile forward again from x (in cache), then back through the layers."""
    dtype = check_buffers({"grad_x_final": grad_x_final, "states": states, "weight1": weight1, "bias1": bias1,
                           "weight2": weight2, "bias2": bias2}, "cpu")
    n, dim = grad_x_final.shape
    layers, width, _ = weight1.shape
    check_states(states, 1, n, dim)
    grad_x = torch.empty_like(grad_x_final)
    grads = [torch.empty_like(p) for p in (weight1, bias1, weight2, bias2)]
    _module().euler_flow_backward_cpu(
        dtype, grad_x_final.data_ptr(), float(grad_kinetic_sum), states.data_ptr(),
        weight1.data_ptr(), bias1.data_ptr(), weight2.data_ptr(), bias2.data_ptr(),
        float(dt), activation, n, dim, width, layers, torch.get_num_threads(),
        grad_x.data_ptr(), *(g.data_ptr() for g in grads),
    )
    return (grad_x, *grads)
