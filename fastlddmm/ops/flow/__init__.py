"""The euler_flow op: the whole ResNet-LDDMM flow (L Euler steps + kinetic energy) as one op.

The room (one op, its twin and every backend side by side; which one runs is decided in
fastlddmm/dispatch.py, ``choose_euler_flow``):

    reference.py    the PyTorch twin (autograd through L explicit steps; any float dtype, any device)
    cpu.py          launchers of csrc/euler_flow/euler_flow_cpu.cpp (C++/OpenMP)
    cuda.py         launchers of csrc/euler_flow/euler_flow_cuda.cu (built where CMake found nvcc)
    kernels/euler_flow.py (shipped as fastlddmm.kernels.euler_flow): the Triton kernels and their launchers

The launcher contract, the same for cpu, cuda and triton (contiguous tensors of one dtype, N >= 1):

    forward(x (N, D), weight1 (L, H, D), bias1 (L, H), weight2 (L, D, H), bias2 (L, D), dt, activation,
            *, save_states) -> (x_final (N, D), states (L, N, D) or (0, N, D), kinetic_sum ())
    backward(grad_x_final (N, D), grad_kinetic_sum (), states, weight1, bias1, weight2, bias2, dt,
             activation) -> (grad_x, grad_weight1, grad_bias1, grad_weight2, grad_bias2)

where kinetic_sum S = Σ_l Σ_i |v_l(x_i^l)|². This module turns S into the energy ½ · dt · S / N (and
dLoss/denergy into dLoss/dS), once for every backend. What the backward starts from depends on the backend
(SAVED_FOR_BACKWARD):

    "layers"  (cuda, triton): with save_states the forward returns every layer's input, states[l] = x^l
              (L, N, D), and the backward takes them;
    "input"   (cpu): the forward stores nothing (states (0, N, D)); the backward takes states = x[None]
              (1, N, D) and runs each tile of points forward again, keeping that tile's trajectory in the
              thread's cache (a fifth more flops than storing it, but no (L, N, D) array written and read
              back: on a CPU that traffic and its page faults cost more than the flops).

Either way the hidden activations are recomputed in the backward: memory O(N·L·D) at most instead of
autograd's O(N·L·H). Without gradients (inference or torch.no_grad) nothing is stored but the output.

They go through the torch.library custom ops

    torch.ops.fastlddmm.euler_flow(x (N, D), weight1, bias1, weight2, bias2, dt, activation, backend,
                                   save_states) -> (x_final (N, D), energy (), states (L or 0, N, D))
    torch.ops.fastlddmm.euler_flow_backward(grad_x_final, grad_energy, states, weight1, bias1, weight2,
                                            bias2, dt, activation, backend) -> (grad_x, grad_weight1, ...)

with fake (meta) implementations and a registered autograd formula, so torch.compile traces them and
``torch.ops.fastlddmm.euler_flow`` callers get gradients (first order: the backward op itself has no
derivative; use backend="reference" for second derivatives).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ... import dispatch
from ..._validation import check_choice
from . import reference
from .reference import ACTIVATIONS

FUSED_BACKENDS = tuple(name for name in dispatch.backends_for("euler_flow") if name != "reference")

# What each fused backend's backward starts from (the contract above): "layers", the (L, N, D) states its
# forward saved; "input", x itself (1, N, D): that backward recomputes the layers, so nothing is saved.
SAVED_FOR_BACKWARD = {"cpu": "input", "cuda": "layers", "triton": "layers"}


def _saves_layers(backend: str) -> bool:
    return SAVED_FOR_BACKWARD.get(backend, "layers") == "layers"


def _launcher(backend: str):
    if backend not in FUSED_BACKENDS:
        raise dispatch.BackendUnavailableError(
            f"backend {backend!r} has no fused euler_flow; use one of {FUSED_BACKENDS} (or 'auto', 'reference')")
    return dispatch.load("euler_flow", backend)


def _energy_scale(dt: float, n: int) -> float:
    """energy = scale · S, S = Σ_l Σ_i |v_l(x_i^l)|²: the only place the kinetic sum is finished."""
    return 0.5 * float(dt) / n


def check_params(x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor) -> None:
    for name, t in (("weight1", weight1), ("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight1.dim() != 3:
        raise ValueError(f"weight1 must have shape (L, H, D), got {tuple(weight1.shape)}")
    layers, width, dim = weight1.shape
    expected = {"bias1": (layers, width), "weight2": (layers, dim, width), "bias2": (layers, dim)}
    for name, t in (("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} to match weight1 {tuple(weight1.shape)}, "
                             f"got {tuple(t.shape)}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"x must have points of dimension {dim} (shape (..., {dim})) to match the flow's weights, "
                         f"got {tuple(x.shape)}")
    for name, t in (("weight1", weight1), ("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got ({t.dtype}, {t.device})")


# ---------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------

def _check_op_inputs(x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, activation: str) -> None:
    """The kernels read raw buffers: shapes are checked here too, for direct torch.ops callers."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"fastlddmm::euler_flow takes x of shape (N, D) with N >= 1, got {tuple(x.shape)}")
    check_params(x, weight1, bias1, weight2, bias2)
    check_choice(activation, "activation", ACTIVATIONS)


@torch.library.custom_op("fastlddmm::euler_flow", mutates_args=())
def _euler_flow_op(
    x: Tensor,  # (N, D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
    backend: str,
    save_states: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # x_final (N, D), energy (), states (L or 0, N, D)
    _check_op_inputs(x, weight1, bias1, weight2, bias2, activation)
    params = [p.contiguous() for p in (weight1, bias1, weight2, bias2)]
    x_final, states, kinetic_sum = _launcher(backend).forward(x.contiguous(), *params, dt, activation,
                                                              save_states=save_states)
    energy = (kinetic_sum * _energy_scale(dt, x.shape[0])).to(x.dtype)
    return x_final, energy, states


@_euler_flow_op.register_fake
def _euler_flow_fake(x, weight1, bias1, weight2, bias2, dt, activation, backend, save_states):
    layers = weight1.shape[0] if save_states and _saves_layers(backend) else 0
    return torch.empty_like(x), x.new_empty(()), x.new_empty((layers, *x.shape))


@torch.library.custom_op("fastlddmm::euler_flow_backward", mutates_args=())
def _euler_flow_backward_op(
    grad_x_final: Tensor,  # (N, D)
    grad_energy: Tensor,  # ()
    states: Tensor,  # (L, N, D) the forward's states, or (1, N, D) x[None] for backends that recompute them
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # grad_x (N, D), then the params' shapes
    _check_op_inputs(grad_x_final, weight1, bias1, weight2, bias2, activation)
    want = (weight1.shape[0] if _saves_layers(backend) else 1, *grad_x_final.shape)
    if tuple(states.shape) != want:
        what = "every layer's input" if _saves_layers(backend) else "x[None]: this backend recomputes the layers"
        raise ValueError(f"states must have shape {want} ({what}), got {tuple(states.shape)}")
    params = [p.contiguous() for p in (weight1, bias1, weight2, bias2)]
    grad_kinetic_sum = grad_energy.reshape(()).to(grad_x_final.dtype) * _energy_scale(dt, grad_x_final.shape[0])
    grads = _launcher(backend).backward(
        grad_x_final.contiguous(),  # e.g. the expanded ones of out.sum(): stride 0
        grad_kinetic_sum, states.contiguous(), *params, dt, activation,
    )
    return tuple(grads)


@_euler_flow_backward_op.register_fake
def _euler_flow_backward_fake(grad_x_final, grad_energy, states, weight1, bias1, weight2, bias2, dt, activation,
                              backend):
    return (torch.empty_like(grad_x_final), torch.empty_like(weight1), torch.empty_like(bias1),
            torch.empty_like(weight2), torch.empty_like(bias2))


def _setup_context(ctx, inputs, output):
    x, weight1, bias1, weight2, bias2, dt, activation, backend, save_states = inputs
    _, _, states = output
    ctx.mark_non_differentiable(states)
    ctx.set_materialize_grads(False)  # else autograd fills an (L, N, D) zero gradient for the states
    ctx.save_for_backward(states if _saves_layers(backend) else x, weight1, bias1, weight2, bias2)
    ctx.dt, ctx.activation, ctx.backend, ctx.save_states = dt, activation, backend, save_states
    ctx.x_shape = tuple(x.shape)


def _backward(ctx, grad_x_final, grad_energy, grad_states):
    if not ctx.save_states:
        raise RuntimeError(
            "fastlddmm::euler_flow was called with save_states=False (no gradient was needed then), so it "
            "cannot be differentiated; call it with save_states=True")
    states, weight1, bias1, weight2, bias2 = ctx.saved_tensors
    if not _saves_layers(ctx.backend):
        states = states.unsqueeze(0)  # x[None]: the contract's (1, N, D)
    if grad_x_final is None and grad_energy is None:  # neither output reaches the loss
        return None, None, None, None, None, None, None, None, None
    if grad_x_final is None:
        grad_x_final = weight1.new_zeros(ctx.x_shape)
    if grad_energy is None:
        grad_energy = weight1.new_zeros(())
    grads = torch.ops.fastlddmm.euler_flow_backward(
        grad_x_final, grad_energy, states, weight1, bias1, weight2, bias2, ctx.dt, ctx.activation, ctx.backend)
    return (*grads, None, None, None, None)


_euler_flow_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------

def euler_flow(
    x: Tensor,  # (..., D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str = "relu",
    backend: str = "auto",
    *,
    deterministic: bool = False,
) -> tuple[Tensor, Tensor]:  # (..., D), ()
    """x moved by L residual Euler steps, and the kinetic energy ½ Σ_l dt · mean_i |v_l(x_i^l)|².

    Leading dimensions of x are points (a batch (B, N, D) is B·N points: the mean in the energy runs over
    all of them). backend: "auto" (fastlddmm.dispatch decides: CPU tensors: "cpu" if fastlddmm._C is built;
    CUDA tensors: "triton", else "cuda"; otherwise, or for dtypes other than float32/float64, "reference"),
    or a name, which raises fastlddmm.BackendUnavailableError (saying why) when that backend cannot run here.
    ``deterministic`` keeps "auto" off kernels that sum with atomics (bitwise-reproducible runs).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor (float32 or float64), got {x.dtype}")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt):
        raise TypeError(f"dt must be a finite number (the Euler step, usually 1 / L), got {dt!r}")
    check_choice(activation, "activation", ACTIVATIONS)
    dispatch.check_name(backend)
    check_params(x, weight1, bias1, weight2, bias2)
    dim = x.shape[-1]
    if x.numel() == 0:
        raise ValueError(f"x is an empty point set (shape {tuple(x.shape)}): euler_flow needs at least one point")

    chosen = dispatch.choose_euler_flow(backend, x.device.type, str(x.dtype).replace("torch.", ""), int(dim),
                                        bool(deterministic))
    if chosen == "reference":
        return reference.euler_flow(x, weight1, bias1, weight2, bias2, dt, activation)

    params = (weight1, bias1, weight2, bias2)
    # Only keep the per-layer states when a backward pass can follow.
    save_states = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    x_final, energy, _ = torch.ops.fastlddmm.euler_flow(
        x.reshape(-1, dim).contiguous(), *(p.contiguous() for p in params), float(dt), activation, chosen,
        save_states)
    return x_final.reshape(x.shape), energy


__all__ = ["ACTIVATIONS", "FUSED_BACKENDS", "SAVED_FOR_BACKWARD", "check_params", "euler_flow", "reference"]
