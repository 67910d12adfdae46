"""Triton euler_flow launchers (kernels/euler_flow.py) against the PyTorch reference: values and gradients.

Without a CUDA GPU the kernels run in Triton's CPU interpreter, which needs TRITON_INTERPRET=1 set
BEFORE triton is first imported (triton.jit picks interpreter or compiler when a decorator runs, and
triton decorates its own tl.sum, tl.zeros, ... at import). Run this file as

    TRITON_INTERPRET=1 python -m pytest -q tests/test_euler_flow_triton.py

The lines below also set it when no GPU is seen, which is enough when this module is the first to import
triton (no conftest importing fastlddmm first); otherwise the module skips, saying so. With a GPU the same
tests run compiled on CUDA tensors, and the @pytest.mark.gpu ones add the paper's sizes.

The interpreter pays ~1 ms per executed Triton op, so CPU sizes stay tiny (N <= 67, H <= 33, L <= 3).
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="the triton package is missing: pip install 'fastlddmm[triton]'")

from fastlddmm.kernels import euler_flow as K  # noqa: E402
from fastlddmm.reference import flow as ref  # noqa: E402

if not torch.cuda.is_available() and K.cpu_unavailable_reason() is not None:
    pytest.skip(f"no CUDA GPU, and the Triton interpreter is unusable: {K.cpu_unavailable_reason()}",
                allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ACTIVATIONS = ("relu", "tanh", "softplus")
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: run `pytest -m gpu` on a machine with one"
)

# (dtype, rtol, atol); atol is relative to the compared tensor's largest entry (at least 1), because
# the error of a sum scales with its largest terms, not with its result.
# float32: a few hundred roundings (eps 6e-8) summed in another order than the reference's BLAS
#          (observed <= 1e-6 relative at these sizes); float64: the same with eps 1.1e-16 (observed ~1e-15).
TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="float32"),
    pytest.param(torch.float64, 1e-12, 1e-12, id="float64"),
]
# GPU sizes (H = 500, N ~ 1000, L = 10): sums 15x longer and compounded over 10 layers; float32 also
# meets the GPU's approximate exp (2 ulp) in tanh / softplus.
GPU_TOLS = [
    pytest.param(torch.float32, 1e-4, 1e-4, id="float32"),
    pytest.param(torch.float64, 1e-11, 1e-11, id="float64"),
]


def assert_close(actual, expected, rtol, atol, name):
    """allclose with atol scaled by max(1, max|expected|), and a message saying where it fails."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    nan_a, nan_e = ~torch.isfinite(actual), ~torch.isfinite(expected)
    assert torch.equal(nan_a, nan_e), f"{name}: non-finite at {nan_a.nonzero().tolist()} vs {nan_e.nonzero().tolist()}"
    if actual.numel() == 0:
        return
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs()
    bad = err > atol * scale + rtol * expected.abs()
    if bad.any():
        worst = int(err.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} entries differ (rtol={rtol}, atol={atol}x{scale:.3g}); "
            f"worst at {idx}: got {actual[idx].item()!r}, expected {expected[idx].item()!r}"
        )


def make_problem(n, width, dim, layers, dtype, seed=0):
    """Random points, parameters and upstream gradients (drawn in float64, then cast)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)

    x = rnd(n, dim)
    # W2 nonzero (unlike the identity initialisation of ResNetFlow) so that every path carries signal.
    params = (
        rnd(layers, width, dim),
        rnd(layers, width, scale=0.5),
        rnd(layers, dim, width, scale=1.0 / math.sqrt(max(width, 1))),
        rnd(layers, dim, scale=0.5),
    )
    grad_x_final, grad_energy = rnd(n, dim), rnd()
    return x, params, grad_x_final, grad_energy


def reference(x, params, dt, activation, grad_x_final, grad_energy):
    """Reference (x_final, states, energy) and the gradients of <x_final, gx> + energy·ge by autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    x_final, energy = ref.euler_flow(*leaves, dt, activation)
    states = ref.trajectory(*(t.detach() for t in leaves), dt, activation)[:-1]
    loss = (x_final * grad_x_final).sum() + energy * grad_energy
    grads = torch.autograd.grad(loss, leaves)
    return x_final.detach(), states, energy.detach(), grads


def check_against_reference(n, width, dim, layers, dtype, rtol, atol, activation, dt=None, **tiling):
    dt = 1.0 / layers if dt is None else dt
    x, params, gx, ge = make_problem(n, width, dim, layers, dtype)
    x_ref, states_ref, energy_ref, grads_ref = reference(x, params, dt, activation, gx, ge)

    block = {k: v for k, v in tiling.items() if k in ("block_n", "block_h")}
    x_final, states, energy = K.forward(x, *params, dt, activation, **block)
    assert_close(x_final, x_ref, rtol, atol, "x_final")
    assert_close(states, states_ref, rtol, atol, "states")
    assert_close(energy, energy_ref, rtol, atol, "energy")

    grads = K.backward(gx, ge, states, *params, dt, activation, **tiling)
    for name, got, want in zip(("grad_x", "grad_weight1", "grad_bias1", "grad_weight2", "grad_bias2"), grads, grads_ref):
        assert_close(got, want, rtol, atol, name)


# N 1, 7, 67; H 1, 16, 33; D 2, 3; L 1, 3 — each value at least twice, odd and prime sizes on purpose.
SHAPES = [(1, 1, 2, 1), (7, 16, 3, 3), (67, 33, 3, 3), (67, 1, 2, 3), (7, 33, 2, 1)]


@pytest.mark.parametrize("dtype, rtol, atol", TOLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n, width, dim, layers", SHAPES, ids=[f"N{s[0]}-H{s[1]}-D{s[2]}-L{s[3]}" for s in SHAPES])
def test_matches_reference(n, width, dim, layers, activation, dtype, rtol, atol):
    check_against_reference(n, width, dim, layers, dtype, rtol, atol, activation)


@pytest.mark.parametrize("dtype, rtol, atol", TOLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_several_tiles_chunks_and_programs(activation, dtype, rtol, atol):
    # 37 points in tiles of 16 (3 tiles, the last one partial) shared by 2 programs (one of them runs the
    # grid-stride loop twice), H = 17 in chunks of 8 (3 chunks, the last one 1 wide); dt is not 1/L.
    check_against_reference(37, 17, 3, 2, dtype, rtol, atol, activation, dt=0.37, block_n=16, block_h=8, num_programs=2)


@pytest.mark.parametrize("dtype, rtol, atol", TOLS)
@pytest.mark.parametrize("dim", [1, 5])
def test_other_dimensions(dim, dtype, rtol, atol):
    # D padded to a power of two: 1 -> 2, 5 -> 8.
    check_against_reference(7, 16, dim, 2, dtype, rtol, atol, "tanh")


@pytest.mark.parametrize("dtype, rtol, atol", TOLS)
@pytest.mark.parametrize("which", ["x_final", "energy"])
def test_one_upstream_gradient(which, dtype, rtol, atol):
    """A None upstream gradient counts as zero (autograd passes None for an unused output)."""
    x, params, gx, ge = make_problem(7, 16, 3, 2, dtype, seed=1)
    dt = 0.5
    if which == "x_final":
        ge_ref, ge_k, gx_ref, gx_k = torch.zeros_like(ge), None, gx, gx
    else:
        ge_ref, ge_k, gx_ref, gx_k = ge, ge, torch.zeros_like(gx), None
    _, states, _, grads_ref = reference(x, params, dt, "softplus", gx_ref, ge_ref)
    grads = K.backward(gx_k, ge_k, states.contiguous(), *params, dt, "softplus")
    for i, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_close(got, want, rtol, atol, f"gradient {i}")


def test_backward_is_deterministic():
    x, params, gx, ge = make_problem(37, 17, 3, 2, torch.float32, seed=2)
    _, states, _ = K.forward(x, *params, 0.5, "relu")
    first = K.backward(gx, ge, states, *params, 0.5, "relu", block_n=16, block_h=8, num_programs=2)
    second = K.backward(gx, ge, states, *params, 0.5, "relu", block_n=16, block_h=8, num_programs=2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_zero_layers_is_identity():
    x, params, gx, ge = make_problem(5, 4, 3, 0, torch.float64)
    x_final, states, energy = K.forward(x, *params, 1.0, "relu")
    assert torch.equal(x_final, x) and states.shape == (0, 5, 3) and energy.item() == 0.0
    grads = K.backward(gx, ge, states, *params, 1.0, "relu")
    assert torch.equal(grads[0], gx)
    assert all(g.shape == p.shape for g, p in zip(grads[1:], params))


def test_gradients_do_not_alias():
    """torch.library ops may not return aliasing outputs: each gradient owns its storage."""
    x, params, gx, ge = make_problem(7, 5, 2, 2, torch.float32)
    _, states, _ = K.forward(x, *params, 0.5, "tanh")
    grads = K.backward(gx, ge, states, *params, 0.5, "tanh")
    storages = {g.untyped_storage().data_ptr() for g in grads}
    assert len(storages) == len(grads)


def test_bad_inputs_are_named():
    x, params, _, _ = make_problem(4, 3, 2, 1, torch.float32)
    with pytest.raises(ValueError, match="activation"):
        K.forward(x, *params, 1.0, "sigmoid")
    with pytest.raises(TypeError, match="bias1"):
        K.forward(x, params[0], params[1].double(), *params[2:], 1.0, "relu")
    with pytest.raises(TypeError, match="float32 or float64"):
        K.forward(x.half(), *(p.half() for p in params), 1.0, "relu")
    with pytest.raises(ValueError, match="weight2"):
        K.forward(x, params[0], params[1], params[2].transpose(1, 2), params[3], 1.0, "relu")
    with pytest.raises(ValueError, match="x must be contiguous"):
        K.forward(torch.randn(2, 4, device=DEVICE).T, *params, 1.0, "relu")


# ------------------------------------------------------------------------------------------------
# GPU sizes (the paper's width H = 500, L = 10 layers): compiled kernels only.
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype, rtol, atol", GPU_TOLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_paper_sizes(activation, dtype, rtol, atol):
    check_against_reference(1013, 500, 3, 10, dtype, rtol, atol, activation)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype, rtol, atol", GPU_TOLS)
def test_gpu_many_tiles_per_program(dtype, rtol, atol):
    # 100003 points, few programs: each one runs the grid-stride loop over hundreds of tiles.
    check_against_reference(100_003, 64, 2, 3, dtype, rtol, atol, "softplus", num_programs=7)


@pytest.mark.gpu
@needs_gpu
def test_gpu_backward_is_deterministic():
    x, params, gx, ge = make_problem(20_011, 500, 3, 4, torch.float32, seed=3)
    _, states, _ = K.forward(x, *params, 0.25, "tanh")
    first = K.backward(gx, ge, states, *params, 0.25, "tanh")
    second = K.backward(gx, ge, states, *params, 0.25, "tanh")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
