"""The torch.library custom ops behind fl.ops.euler_flow, for every fused backend of the dispatch table:
torch.ops callers (values, gradients, the energy finished from the kinetic sum), shape checks for direct
callers, torch.library.opcheck, and torch.compile(fullgraph=True) of a training step."""

from __future__ import annotations

import pytest
import torch

import fastlddmm as fl
from fastlddmm import dispatch
from fastlddmm.ops.flow import SAVED_FOR_BACKWARD

from conftest import assert_close, backend_cases, flow_backward_states, flow_params, random_points, require_backend

FUSED = backend_cases("euler_flow", exclude=("reference",))

# float64 throughout: the paths differ only in summation order (~1e-15 relative); 1e-10 / 1e-9 is a
# wide margin that any formula error would still break.
RTOL, ATOL = 1e-10, 1e-9


def inputs(n=7, dim=3, width=16, layers=4, seed=0, device="cpu"):
    x = random_points(n, dim, requires_grad=True, seed=seed + 1, device=device)
    return x, flow_params(layers, width, dim, requires_grad=True, seed=seed, device=device)


@pytest.mark.parametrize("backend,device", FUSED)
def test_torch_ops_entry_point_values_and_gradients(backend, device):
    dev = require_backend("euler_flow", backend, device)
    x, params = inputs(device=dev)
    x_final, energy, states = torch.ops.fastlddmm.euler_flow(x, *params, 0.25, "tanh", backend, True)
    want_out, want_energy = fl.reference.euler_flow(x, *params, 0.25, "tanh")
    if SAVED_FOR_BACKWARD[backend] == "layers":
        assert states.shape == (4, 7, 3)
        assert_close(states[0], x.detach(), rtol=0, atol=0, name="states[0] = x")
    else:  # its backward recomputes the layers from x
        assert states.shape == (0, 7, 3)
    assert_close(x_final, want_out, rtol=RTOL, atol=ATOL, name="x_final")
    assert_close(energy, want_energy, rtol=RTOL, atol=ATOL, name="energy = ½·dt·S/N")
    assert not states.requires_grad  # marked non-differentiable
    got = torch.autograd.grad(x_final.square().sum() + 2.0 * energy, [x, *params])
    want = torch.autograd.grad(want_out.square().sum() + 2.0 * want_energy, [x, *params])
    for name, g, w in zip(("x", "weight1", "bias1", "weight2", "bias2"), got, want):
        assert_close(g, w, rtol=RTOL, atol=ATOL, name=f"grad {name}")


@pytest.mark.parametrize("backend,device", FUSED)
def test_states_not_saved_cannot_backward(backend, device):
    dev = require_backend("euler_flow", backend, device)
    x, params = inputs(device=dev)
    x_final, _, states = torch.ops.fastlddmm.euler_flow(x, *params, 0.25, "relu", backend, False)
    assert states.shape == (0, 7, 3)
    with pytest.raises(RuntimeError, match="save_states=False"):
        torch.autograd.grad(x_final.sum(), [x])


@pytest.mark.parametrize("backend,device", FUSED)
def test_what_autograd_keeps_for_the_backward(backend, device):
    """Memory contract: "layers" backends keep the (L, N, D) states; "input" backends (cpu) keep only x and the
    weights: nothing the size of L·N·D is held between forward and backward."""
    dev = require_backend("euler_flow", backend, device)
    x, params = inputs(n=101, layers=6, device=dev)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x_final, energy = fl.ops.euler_flow(x, *params, 0.25, "relu", backend=backend)
    (x_final.square().sum() + energy).backward()
    largest = max(saved, key=lambda shape: torch.Size(shape).numel())
    if SAVED_FOR_BACKWARD[backend] == "layers":
        assert largest == (6, 101, 3)
    else:
        assert all(torch.Size(shape).numel() <= 101 * 3 for shape in saved), saved
        assert (101, 3) in saved
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend,device", FUSED)
def test_op_checks_shapes_for_direct_callers(backend, device):
    """The kernels read raw buffers: a direct torch.ops call with inconsistent shapes must raise, not crash."""
    dev = require_backend("euler_flow", backend, device)
    x, (w1, b1, w2, b2) = inputs(device=dev)
    with pytest.raises(ValueError, match="bias2"):
        torch.ops.fastlddmm.euler_flow(x, w1, b1, w2, b2[:, :2], 0.25, "relu", backend, True)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        torch.ops.fastlddmm.euler_flow(x[None], w1, b1, w2, b2, 0.25, "relu", backend, True)
    with pytest.raises(ValueError, match="states"):
        torch.ops.fastlddmm.euler_flow_backward(x, x.new_ones(()), x.new_zeros(3, 7, 3), w1, b1, w2, b2, 0.25,
                                                "relu", backend)
    with pytest.raises(fl.BackendUnavailableError, match="no fused euler_flow"):
        torch.ops.fastlddmm.euler_flow(x, w1, b1, w2, b2, 0.25, "relu", "keops", True)


@pytest.mark.parametrize("backend,device", FUSED)
def test_opcheck(backend, device):
    """torch.library.opcheck: schema, fake tensors, autograd registration and AOT dispatch agree."""
    dev = require_backend("euler_flow", backend, device)
    x, params = inputs(n=5, dim=2, width=3, layers=2, device=dev)
    torch.library.opcheck(torch.ops.fastlddmm.euler_flow.default, (x, *params, 0.5, "softplus", backend, True))
    with torch.no_grad():
        _, _, states = torch.ops.fastlddmm.euler_flow(x, *params, 0.5, "softplus", backend, True)
    grad_out = random_points(5, 2, seed=9, device=dev)
    torch.library.opcheck(torch.ops.fastlddmm.euler_flow_backward.default,
                          (grad_out, x.new_tensor(0.7), flow_backward_states(backend, x, states),
                           *[p.detach() for p in params], 0.5, "softplus",
                           backend))


def _compile_cases():
    """torch.compile of the "auto" path on each device: CPU tensors run the compiled C++ flow, CUDA tensors
    Triton (or the CUDA kernels): whatever dispatch.choose_euler_flow says, as a compile-time constant."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _require_fused_auto(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch sees none here): run `pytest -m gpu` on a machine with one")
    chosen = dispatch.choose_euler_flow("auto", device, "float64", 3, False)
    if chosen == "reference":
        pytest.skip(f"no fused euler_flow backend for {device} tensors here (auto runs the reference): "
                    f"{dispatch.status('cpu' if device == 'cpu' else 'triton').reason}")
    return torch.device(device)


@pytest.mark.parametrize("device", _compile_cases())
def test_torch_compile_fullgraph(device):
    """A compiled training step: one graph (fullgraph=True), same values and gradients as eager, and
    a second point count does not break it."""
    dev = _require_fused_auto(device)

    def loss_fn(x, w1, b1, w2, b2):
        out, energy = fl.ops.euler_flow(x, w1, b1, w2, b2, 0.25, "tanh", backend="auto")
        return (out - 1.0).square().mean() + 0.1 * energy

    compiled = torch.compile(loss_fn, fullgraph=True)
    for n in (1013, 7):
        x, params = inputs(n=n, device=dev)
        got = compiled(x, *params)
        want = loss_fn(x, *params)
        assert_close(got, want, rtol=RTOL, atol=ATOL, name=f"compiled loss (N={n})")
        g_got = torch.autograd.grad(got, [x, *params])
        g_want = torch.autograd.grad(want, [x, *params])
        for name, g, w in zip(("x", "weight1", "bias1", "weight2", "bias2"), g_got, g_want):
            assert_close(g, w, rtol=RTOL, atol=ATOL, name=f"compiled grad {name} (N={n})")
    # and the compiled fused path agrees with the reference, not only with its own eager run
    x, params = inputs(device=dev)
    out, energy = fl.reference.euler_flow(x, *params, 0.25, "tanh")
    assert_close(compiled(x, *params), (out - 1.0).square().mean() + 0.1 * energy, rtol=RTOL, atol=ATOL,
                 name="compiled vs reference")


@pytest.mark.parametrize("device", _compile_cases())
def test_torch_compile_no_grad_inference(device):
    dev = _require_fused_auto(device)
    x, params = inputs(device=dev)
    compiled = torch.compile(lambda x, *p: fl.ops.euler_flow(x, *p, 0.25, "relu"), fullgraph=True)
    with torch.no_grad():
        out, energy = compiled(x, *params)
    want_out, want_energy = fl.reference.euler_flow(x, *params, 0.25, "relu")
    assert_close(out, want_out.detach(), rtol=RTOL, atol=ATOL, name="x_final")
    assert_close(energy, want_energy.detach(), rtol=RTOL, atol=ATOL, name="energy")
