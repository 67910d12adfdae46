"""Every fused Euler-flow path (cpu, cuda, triton) against fastlddmm.reference.flow.euler_flow:
x_final, energy and the gradients w.r.t. x and all four parameters.

Triton runs here only where it can: on a GPU, or on the CPU under TRITON_INTERPRET=1 (CI runs this file
a second time with TRITON_INTERPRET=1; the interpreter is slow, so it only takes the small cases).
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastlddmm
from fastlddmm import _backend
from fastlddmm.ops.euler_flow import euler_flow
from fastlddmm.reference.flow import euler_flow as reference_euler_flow

from conftest import assert_close, backend_device, flow_params, random_points, require_backend

# the module (fastlddmm.ops.euler_flow the attribute is the function)
ef_module = importlib.import_module("fastlddmm.ops.euler_flow")

# 'cuda' needs a GPU (marked gpu: pytest -m gpu on a GPU machine); 'triton' runs on a GPU or, under
# TRITON_INTERPRET=1, on the CPU.
FUSED = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu), "triton")

# (dtype, rtol, atol); atol is scaled by max(1, max|expected|) in _compare, since weight gradients are
# sums over all points and grow with N.
TOLERANCES = [
    # float64: the paths differ only in summation order (~1e-15 relative seen); 1e-10 / 1e-9 leaves a
    # wide margin while any formula error is O(1).
    (torch.float64, 1e-10, 1e-9),
    # float32: eps = 6e-8; ten layers of products with H <= 128 and reductions over ~3000 points in another
    # order than torch's BLAS give errors of at most a few hundred ulps of the tensor's scale (~1e-6 seen).
    (torch.float32, 1e-4, 1e-4),
]

# (points shape, width H, layers L, activation): every width (1, 16, 33, 128), layers (1, 10),
# point count (1, 7, 1013), activation, D in {1, 2, 3, 5} and batched inputs, without the full product.
CASES = [
    ((1, 3), 1, 1, "relu"),
    ((7, 3), 16, 10, "tanh"),
    ((7, 2), 128, 1, "softplus"),
    ((1, 1), 33, 10, "tanh"),
    ((7, 5), 1, 10, "softplus"),
    ((2, 7, 3), 33, 10, "relu"),  # batched (B, N, D)
    ((1013, 3), 33, 10, "softplus"),
    ((1013, 3), 128, 10, "relu"),
    ((1013, 2), 16, 1, "tanh"),
    ((3, 1013, 3), 16, 10, "tanh"),  # batched, 3039 points
]

# The Triton interpreter needs ~30 s for one 1013-point, 10-layer case: CPU-interpreted Triton only gets
# the cases up to this many points (all of them run on a GPU).
INTERPRETER_MAX_POINTS = 64


def _skip_unless_runnable(backend: str, points: int) -> torch.device:
    require_backend(backend)
    device = backend_device(backend)
    if backend == "triton" and device.type == "cpu" and ef_module._triton_cpu_reason():
        pytest.skip(f"Triton on CPU tensors unavailable in this process: {ef_module._triton_cpu_reason()}")
    if backend == "triton" and device.type == "cpu" and points > INTERPRETER_MAX_POINTS:
        pytest.skip(f"{points} points are too slow for the Triton interpreter (TRITON_INTERPRET=1); "
                    f"this case runs on a CUDA GPU")
    return device


def _compare(backend, x, params, dt, activation, rtol, atol, seed=3):
    """Values and gradients of backend vs the reference, for loss = (x_final·v).sum() + c·energy."""
    x = x.detach().requires_grad_(True)
    params = [p.detach().requires_grad_(True) for p in params]
    out, energy = euler_flow(x, *params, dt, activation, backend=backend)
    want_out, want_energy = reference_euler_flow(x, *params, dt, activation)

    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(want_out.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
    c = float(torch.rand((), generator=gen, dtype=torch.float64)) + 0.5
    inputs = [x, *params]
    grads = torch.autograd.grad((out * v).sum() + c * energy, inputs)
    want_grads = torch.autograd.grad((want_out * v).sum() + c * want_energy, inputs)

    def check(got, want, name):
        scale = max(1.0, float(want.detach().abs().max()))
        assert_close(got, want, rtol=rtol, atol=atol * scale, name=f"{backend} {name}")

    check(out, want_out, "x_final")
    check(energy, want_energy, "energy")
    for got, want, name in zip(grads, want_grads, ("grad x", "grad weight1", "grad bias1", "grad weight2", "grad bias2")):
        check(got, want, name)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype,rtol,atol", TOLERANCES, ids=["float64", "float32"])
@pytest.mark.parametrize("shape,width,layers,activation", CASES, ids=[
    f"{'x'.join(map(str, c[0]))}-H{c[1]}-L{c[2]}-{c[3]}" for c in CASES])
def test_matches_reference(backend, dtype, rtol, atol, shape, width, layers, activation):
    points = 1
    for s in shape[:-1]:
        points *= s
    device = _skip_unless_runnable(backend, points)
    x = random_points(*shape, dtype=dtype, device=device)
    params = flow_params(layers, width, shape[-1], dtype=dtype, device=device)
    _compare(backend, x, params, 1.0 / layers, activation, rtol, atol)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("activation", ["relu", "tanh", "softplus"])
def test_large_preactivations(backend, activation):
    """Pre-activations beyond softplus' threshold (20) and deep in tanh's saturation, float64."""
    device = _skip_unless_runnable(backend, 7)
    x = random_points(7, 3, device=device) * 30.0
    params = flow_params(2, 16, 3, device=device)
    _compare(backend, x, params, 0.5, activation, 1e-10, 1e-9)


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs(backend):
    """A transposed and sliced x, and transposed parameters, give the reference's answer."""
    device = _skip_unless_runnable(backend, 7)
    base = random_points(3, 14, device=device)  # (D, 2N)
    x = base.t()[::2]  # (7, 3), strides (1, 14)... every other point of a transposed tensor
    assert not x.is_contiguous()
    w1, b1, w2, b2 = flow_params(4, 16, 3, device=device)
    w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (L, H, D) with strides of (L, D, H)
    w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w1.is_contiguous() and not w2.is_contiguous()
    _compare(backend, x, [w1, b1, w2, b2], 0.25, "tanh", 1e-10, 1e-9)


@pytest.mark.parametrize("backend", FUSED)
def test_batched_matches_flattened(backend):
    """(B, N, D) is B·N points: the energy is the mean over all of them, the points keep their shape."""
    device = _skip_unless_runnable(backend, 14)
    x = random_points(2, 7, 3, device=device)
    params = flow_params(3, 16, 3, device=device)
    out_b, e_b = euler_flow(x, *params, 1 / 3, "softplus", backend=backend)
    out_f, e_f = euler_flow(x.reshape(14, 3), *params, 1 / 3, "softplus", backend=backend)
    assert out_b.shape == x.shape
    assert_close(out_b.reshape(14, 3), out_f, rtol=1e-12, atol=1e-12, name="batched x_final")
    assert_close(e_b, e_f, rtol=1e-12, atol=1e-12, name="batched energy")


@pytest.mark.parametrize("backend", FUSED)
def test_gradient_of_one_output_only(backend):
    """Only x_final or only the energy used: the other output's gradient counts as zero."""
    device = _skip_unless_runnable(backend, 7)
    x = random_points(7, 2, device=device, requires_grad=True)
    params = flow_params(3, 16, 2, device=device, requires_grad=True)
    for pick in (0, 1):
        got = torch.autograd.grad(euler_flow(x, *params, 1 / 3, "tanh", backend=backend)[pick].sum(), [x, *params])
        want = torch.autograd.grad(reference_euler_flow(x, *params, 1 / 3, "tanh")[pick].sum(), [x, *params])
        for g, w in zip(got, want):
            assert_close(g, w, rtol=1e-10, atol=1e-9, name=f"output {pick} only")


def test_gradcheck_cpu():
    """float64 finite differences through the compiled CPU path (relu away from its kink with this seed)."""
    require_backend("cpu")
    for activation in ("tanh", "softplus", "relu"):
        x = random_points(4, 2, requires_grad=True)
        params = flow_params(2, 3, 2, requires_grad=True, seed=5)
        assert torch.autograd.gradcheck(
            lambda x, *p: euler_flow(x, *p, 0.5, activation, backend="cpu"), (x, *params), eps=1e-6, atol=1e-7)


def test_cpu_deterministic():
    """Same thread count, same bits (gradients reduced per thread in a fixed order); the energy is summed per
    tile in tile order, so it does not even depend on the thread count."""
    require_backend("cpu")
    x = random_points(1013, 3, requires_grad=True)
    params = flow_params(3, 33, 3, requires_grad=True)

    def run():
        out, energy = euler_flow(x, *params, 1 / 3, "relu", backend="cpu")
        return (out, energy, *torch.autograd.grad(out.sum() + energy, [x, *params]))

    first, second = run(), run()
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[1], first[1])
    assert torch.equal(single[0], first[0])


def test_no_grad_matches():
    """Without gradients the fused path saves no states, and still gives the same values."""
    require_backend("cpu")
    x = random_points(7, 3)
    params = flow_params(4, 16, 3)
    with torch.no_grad():
        out, energy = euler_flow(x, *params, 0.25, "relu", backend="cpu")
    want_out, want_energy = reference_euler_flow(x, *params, 0.25, "relu")
    assert_close(out, want_out, rtol=1e-10, atol=1e-12, name="x_final")
    assert_close(energy, want_energy, rtol=1e-10, atol=1e-12, name="energy")


def test_zero_layers():
    """L = 0: the identity map with zero energy, and gradient identity w.r.t. x."""
    require_backend("cpu")
    x = random_points(7, 3, requires_grad=True)
    params = flow_params(0, 4, 3)
    out, energy = euler_flow(x, *params, 1.0, "relu", backend="cpu")
    assert torch.equal(out, x) and float(energy.detach()) == 0.0
    (g,) = torch.autograd.grad(out.sum(), [x])
    assert torch.equal(g, torch.ones_like(x))


# ---- backend selection ------------------------------------------------------------------------------

def test_auto_picks_cpu_when_built(monkeypatch):
    x = random_points(7, 3)
    if _backend.status("cpu"):
        assert ef_module._resolve_backend("auto", x) == "cpu"
    # Without the compiled module, auto falls back to the reference and a named "cpu" says why.
    monkeypatch.setattr(_backend, "compiled_module", lambda: None)
    assert ef_module._resolve_backend("auto", x) == "reference"
    with pytest.raises(fastlddmm.BackendUnavailableError, match="not built"):
        euler_flow(x, *flow_params(2, 4, 3), 0.5, "relu", backend="cpu")
    # other dtypes go to the reference under auto
    assert ef_module._resolve_backend("auto", x.to(torch.bfloat16)) == "reference"


def test_auto_result_matches_reference():
    x = random_points(2, 7, 3)
    params = flow_params(2, 16, 3)
    out, energy = euler_flow(x, *params, 0.5, "softplus")
    want_out, want_energy = reference_euler_flow(x, *params, 0.5, "softplus")
    assert_close(out, want_out, rtol=1e-10, atol=1e-12, name="auto x_final")
    assert_close(energy, want_energy, rtol=1e-10, atol=1e-12, name="auto energy")


def test_unavailable_backends_raise():
    x = random_points(7, 3)
    params = flow_params(2, 4, 3)
    # CPU tensors: 'cuda' can never run them (not built, no GPU, or wrong device: the message says which).
    with pytest.raises(fastlddmm.BackendUnavailableError, match="cuda"):
        euler_flow(x, *params, 0.5, "relu", backend="cuda")
    with pytest.raises(fastlddmm.BackendUnavailableError, match="no euler_flow"):
        euler_flow(x, *params, 0.5, "relu", backend="keops")
    if ef_module._triton_cpu_reason():
        with pytest.raises(fastlddmm.BackendUnavailableError, match="triton"):
            euler_flow(x, *params, 0.5, "relu", backend="triton")
    with pytest.raises(ValueError, match="backend"):
        euler_flow(x, *params, 0.5, "relu", backend="fastest")


# ---- input errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference", "cpu"])
def test_input_errors(backend):
    x = random_points(7, 3)
    w1, b1, w2, b2 = flow_params(2, 4, 3)
    with pytest.raises(ValueError, match="dimension 3"):
        euler_flow(random_points(7, 2), w1, b1, w2, b2, 0.5, backend=backend)
    with pytest.raises(ValueError, match="weight1"):
        euler_flow(x, w1[0], b1, w2, b2, 0.5, backend=backend)
    with pytest.raises(ValueError, match="bias1"):
        euler_flow(x, w1, b1[:, :3], w2, b2, 0.5, backend=backend)
    with pytest.raises(ValueError, match="weight2"):
        euler_flow(x, w1, b1, w2.transpose(1, 2), b2, 0.5, backend=backend)
    with pytest.raises(ValueError, match="bias2"):
        euler_flow(x, w1, b1, w2, b2[:1], 0.5, backend=backend)
    with pytest.raises(ValueError, match="empty point set"):
        euler_flow(x[:0], w1, b1, w2, b2, 0.5, backend=backend)
    with pytest.raises(TypeError, match="bias2 must have x's dtype"):
        euler_flow(x, w1, b1, w2, b2.float(), 0.5, backend=backend)
    with pytest.raises(TypeError, match="weight1 must have x's dtype and device"):
        euler_flow(x, w1.to("meta"), b1, w2, b2, 0.5, backend=backend)
    with pytest.raises(TypeError, match="floating-point"):
        euler_flow(x.long(), w1, b1, w2, b2, 0.5, backend=backend)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        euler_flow(x.numpy(), w1, b1, w2, b2, 0.5, backend=backend)
    with pytest.raises(TypeError, match="dt"):
        euler_flow(x, w1, b1, w2, b2, "0.5", backend=backend)
    with pytest.raises(ValueError, match="activation"):
        euler_flow(x, w1, b1, w2, b2, 0.5, "gelu", backend=backend)


def test_fused_rejects_half_precision():
    require_backend("cpu")
    params = [p.half() for p in flow_params(2, 4, 3)]
    with pytest.raises(TypeError, match="float32 or float64"):
        euler_flow(random_points(7, 3).half(), *params, 0.5, backend="cpu")
