"""fl.ops.euler_flow: the whole ResNet-LDDMM flow (L Euler steps + kinetic energy) as one op.

Backends:
    reference  autograd through fastlddmm.reference.flow (any float dtype, any device; the ground truth)
    cpu        compiled C++/OpenMP kernels (fastlddmm._C, csrc/euler_flow/euler_flow_cpu.cpp)
    cuda       compiled CUDA kernels (fastlddmm._C built with FASTLDDMM_CUDA, csrc/euler_flow/euler_flow_cuda.cu)
    triton     Triton kernels (fastlddmm.kernels.euler_flow; CPU tensors only under TRITON_INTERPRET=1)

The fused paths store only the per-layer points (L·N·D values) for the backward pass and recompute the
hidden activations there: memory O(N·L·D) instead of autograd's O(N·L·H). Without gradients (inference
or torch.no_grad) they store nothing but the output.

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

import importlib
import math

import torch
from torch import Tensor

from .. import _backend as _backends
from .._validation import FLOAT_DTYPES, check_choice
from ..reference import flow as _ref

# Each fast path's launcher module provides forward(...) and backward(...) with one contract
# (see kernels/euler_flow.py). Imported lazily: triton is optional and slow to import.
_LAUNCHERS = {
    "cpu": "fastlddmm.ops._euler_flow_cpu",
    "cuda": "fastlddmm.ops._euler_flow_cuda",
    "triton": "fastlddmm.kernels.euler_flow",
}
FUSED_BACKENDS = tuple(_LAUNCHERS)


def _launcher(backend: str):
    if backend not in _LAUNCHERS:
        raise _backends.BackendUnavailableError(
            f"backend {backend!r} has no euler_flow; use one of {('auto', 'reference', *FUSED_BACKENDS)}")
    try:
        return importlib.import_module(_LAUNCHERS[backend])
    except ImportError as err:
        raise _backends.BackendUnavailableError(
            f"backend {backend!r}: its euler_flow kernels ({_LAUNCHERS[backend]}) could not be imported: {err}"
        ) from err


def _triton_importable() -> bool:
    try:
        _launcher("triton")
    except _backends.BackendUnavailableError:
        return False
    return True


# What is built and usable does not change while a program runs: torch.compile treats these answers as
# constants instead of tracing the import machinery behind them (that keeps fullgraph=True possible).
@torch.compiler.assume_constant_result
def _usable(name: str) -> bool:
    if name == "triton":
        return bool(_backends.status("triton")) and _triton_importable()
    return bool(_backends.status(name))


@torch.compiler.assume_constant_result
def _triton_interpret() -> bool:
    return _backends.triton_interpret()


@torch.compiler.assume_constant_result
def _triton_cpu_reason() -> str:
    """Why the Triton kernels cannot take CPU tensors in this process ("" when they can: the interpreter
    must be on before triton is first imported, which the kernels module checks)."""
    if not _triton_interpret():
        return _backends.status("triton").reason
    try:
        reason_fn = getattr(_launcher("triton"), "cpu_unavailable_reason", None)
    except _backends.BackendUnavailableError as err:
        return str(err)
    return (reason_fn() or "") if reason_fn is not None else ""


@torch.compiler.assume_constant_result
def _cuda_max_dim() -> int:
    return _launcher("cuda").max_dim()


@torch.compiler.assume_constant_result
def _unavailable_reason(backend: str, device_type: str) -> str:
    """Why ``backend`` cannot run on ``device_type`` tensors (the BackendUnavailableError message)."""
    if backend not in FUSED_BACKENDS:
        return f"backend {backend!r} has no euler_flow; use one of {('auto', 'reference', *FUSED_BACKENDS)}"
    try:
        _backends.require(backend, device=torch.device(device_type))
        _launcher(backend)
    except _backends.BackendUnavailableError as err:
        return str(err)
    if backend == "triton" and device_type == "cpu" and _triton_cpu_reason():
        return f"backend 'triton' got CPU tensors, but {_triton_cpu_reason()}"
    return f"backend {backend!r} cannot run on {device_type} tensors"


def _check_params(x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor) -> None:
    for name, t in (("weight1", weight1), ("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight1.dim() != 3:
        raise ValueError(f"weight1 must have shape (L, H, D), got {tuple(weight1.shape)}")
    layers, width, dim = weight1.shape
    expected = {"bias1": (layers, width), "weight2": (layers, dim, width), "bias2": (layers, dim)}
    for name, t in (("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        if tuple(t.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} to match weight1 {tuple(weight1.shape)}, got {tuple(t.shape)}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"x must have points of dimension {dim} (shape (..., {dim})) to match the flow's weights, got {tuple(x.shape)}")
    for name, t in (("weight1", weight1), ("bias1", bias1), ("weight2", weight2), ("bias2", bias2)):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name} must have x's dtype and device ({x.dtype}, {x.device}), got ({t.dtype}, {t.device})")


def _resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that will run: 'auto' picks the fastest available for x's device and dtype."""
    fused_dtype = x.dtype in FLOAT_DTYPES
    device = x.device.type
    if backend == "reference":
        return backend
    if backend == "auto":
        if not fused_dtype:
            return "reference"
        if device == "cpu":
            return "cpu" if _usable("cpu") else "reference"
        if device == "cuda":
            if _usable("triton"):
                return "triton"
            if _usable("cuda") and x.shape[-1] <= _cuda_max_dim():
                return "cuda"
        return "reference"
    on_device = device == backend or (
        backend == "triton" and (device == "cuda" or (device == "cpu" and not _triton_cpu_reason())))
    runs_here = backend in FUSED_BACKENDS and _usable(backend) and on_device
    if not runs_here:
        raise _backends.BackendUnavailableError(_unavailable_reason(backend, device))
    if not fused_dtype:
        raise TypeError(f"backend {backend!r} runs float32 or float64 tensors, got x of dtype {x.dtype} "
                        f"(convert, or use backend='reference')")
    if backend == "cuda" and x.shape[-1] > _cuda_max_dim():
        raise ValueError(f"backend 'cuda' supports points of dimension D <= {_cuda_max_dim()}, "
                         f"got D = {x.shape[-1]} (use backend='triton' or 'reference')")
    return backend


# ---------------------------------------------------------------------------------------------------
# torch.library custom ops
# ---------------------------------------------------------------------------------------------------

def _check_op_inputs(x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor) -> None:
    """The kernels read raw buffers: shapes are checked here too, for direct torch.ops callers."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"fastlddmm::euler_flow takes x of shape (N, D) with N >= 1, got {tuple(x.shape)}")
    _check_params(x, weight1, bias1, weight2, bias2)


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
    _check_op_inputs(x, weight1, bias1, weight2, bias2)
    check_choice(activation, "activation", _ref.ACTIVATIONS)
    params = [p.contiguous() for p in (weight1, bias1, weight2, bias2)]
    launcher = _launcher(backend)
    if backend == "triton":  # the Triton launcher always returns states (the shared contract)
        x_final, states, energy = launcher.forward(x.contiguous(), *params, dt, activation)
        if not save_states:
            states = x.new_empty((0, *x.shape))
    else:
        x_final, states, energy = launcher.forward(x.contiguous(), *params, dt, activation, save_states=save_states)
    return x_final, energy, states


@_euler_flow_op.register_fake
def _euler_flow_fake(x, weight1, bias1, weight2, bias2, dt, activation, backend, save_states):
    layers = weight1.shape[0] if save_states else 0
    return torch.empty_like(x), x.new_empty(()), x.new_empty((layers, *x.shape))


@torch.library.custom_op("fastlddmm::euler_flow_backward", mutates_args=())
def _euler_flow_backward_op(
    grad_x_final: Tensor,  # (N, D)
    grad_energy: Tensor,  # ()
    states: Tensor,  # (L, N, D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # grad_x (N, D), then the params' shapes
    _check_op_inputs(grad_x_final, weight1, bias1, weight2, bias2)
    check_choice(activation, "activation", _ref.ACTIVATIONS)
    if tuple(states.shape) != (weight1.shape[0], *grad_x_final.shape):
        raise ValueError(f"states must have shape {(weight1.shape[0], *grad_x_final.shape)}, got {tuple(states.shape)}")
    params = [p.contiguous() for p in (weight1, bias1, weight2, bias2)]
    grads = _launcher(backend).backward(
        grad_x_final.contiguous(),  # e.g. the expanded ones of out.sum(): stride 0
        grad_energy.reshape(()).to(grad_x_final.dtype),
        states.contiguous(), *params, dt, activation,
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
    ctx.save_for_backward(states, weight1, bias1, weight2, bias2)
    ctx.dt, ctx.activation, ctx.backend, ctx.save_states = dt, activation, backend, save_states
    ctx.x_shape = tuple(x.shape)


def _backward(ctx, grad_x_final, grad_energy, grad_states):
    if not ctx.save_states:
        raise RuntimeError(
            "fastlddmm::euler_flow was called with save_states=False (no gradient was needed then), so it "
            "cannot be differentiated; call it with save_states=True")
    states, weight1, bias1, weight2, bias2 = ctx.saved_tensors
    if grad_x_final is None:
        grad_x_final = states.new_zeros(ctx.x_shape)
    if grad_energy is None:
        grad_energy = states.new_zeros(())
    grads = torch.ops.fastlddmm.euler_flow_backward(
        grad_x_final, grad_energy, states, weight1, bias1, weight2, bias2, ctx.dt, ctx.activation, ctx.backend)
    return (*grads, None, None, None, None)


_euler_flow_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# public entry point
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
) -> tuple[Tensor, Tensor]:  # (..., D), ()
    """x moved by L residual Euler steps, and the kinetic energy ½ Σ_l dt · mean_i |v_l(x_i^l)|².

    Leading dimensions of x are points (a batch (B, N, D) is B·N points: the mean in the energy runs over
    all of them). backend: "auto" (CPU tensors: "cpu" if fastlddmm._C is built; CUDA tensors: "triton",
    else "cuda"; otherwise, or for dtypes other than float32/float64, "reference"), or a name, which
    raises fastlddmm.BackendUnavailableError (saying why) when that backend cannot run here.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor (float32 or float64), got {x.dtype}")
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt):
        raise TypeError(f"dt must be a finite number (the Euler step, usually 1 / L), got {dt!r}")
    check_choice(activation, "activation", _ref.ACTIVATIONS)
    _backends.check_name(backend)
    _check_params(x, weight1, bias1, weight2, bias2)
    dim = x.shape[-1]
    if x.numel() == 0:
        raise ValueError(f"x is an empty point set (shape {tuple(x.shape)}): euler_flow needs at least one point")

    chosen = _resolve_backend(backend, x)
    if chosen == "reference":
        return _ref.euler_flow(x, weight1, bias1, weight2, bias2, dt, activation)

    params = (weight1, bias1, weight2, bias2)
    # Only keep the per-layer states when a backward pass can follow.
    save_states = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    x_final, energy, _ = torch.ops.fastlddmm.euler_flow(
        x.reshape(-1, dim).contiguous(), *(p.contiguous() for p in params), float(dt), activation, chosen,
        save_states)
    return x_final.reshape(x.shape), energy
