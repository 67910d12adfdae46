"""The euler_flow op (fastlddmm/ops/<room>/ + kernels/euler_flow.py): the reference twin against a hand-written
Euler loop; every fused backend of the dispatch table (cpu, cuda, triton) through fl.ops.euler_flow against
the reference (x_final, energy, and the gradients in x and the four parameters); the launcher contract each
backend module implements (forward / backward with the raw kinetic sum); the Triton launchers' tile, chunk
and program loops (forced small blocks); determinism; input errors.

Triton runs where it can: on a GPU, or on the CPU in the interpreter (TRITON_INTERPRET=1, set by conftest
when there is no GPU); the interpreter is slow, so it gets the cases up to conftest.INTERPRETER_MAX_POINTS
points and the rest run on a GPU (the same cases with device "cuda", marked gpu).
(The torch.library custom ops and torch.compile: tests/test_euler_flow_custom_op.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlddmm as fl
from fastlddmm import dispatch
from fastlddmm.ops.flow import SAVED_FOR_BACKWARD

from conftest import (assert_close, backend_cases, flow_backward_states, flow_params, interpreted, random_points, require_backend,
                      skip_if_interpreted)

FUSED = backend_cases("euler_flow", exclude=("reference",))
ACTIVATIONS = fl.reference.ACTIVATIONS
euler_flow = fl.ops.euler_flow

# (dtype, rtol, atol); atol is scaled by max(1, max|expected|) in `check`, since weight gradients are sums
# over all points and grow with N.
TOLERANCES = [
    # float64: the paths differ only in summation order (~1e-15 relative seen); 1e-10 / 1e-9 leaves a
    # wide margin while any formula error is O(1).
    pytest.param(torch.float64, 1e-10, 1e-9, id="float64"),
    # float32: eps = 6e-8; ten layers of products with H <= 128 and reductions over ~3000 points in another
    # order than torch's BLAS give errors of at most a few hundred ulps of the tensor's scale (~1e-6 seen).
    pytest.param(torch.float32, 1e-4, 1e-4, id="float32"),
]


def check(got, want, rtol, atol, name):
    """assert_close with atol relative to the compared tensor's largest entry (at least 1): the error of a
    sum scales with its largest terms, not with its result."""
    scale = max(1.0, float(want.detach().abs().max())) if want.numel() else 1.0
    assert_close(got, want, rtol=rtol, atol=atol * scale, name=name)


def points(shape) -> int:
    return math.prod(shape[:-1])


# ------------------------------------------------------------------------------------------------
# The reference twin
# ------------------------------------------------------------------------------------------------


def random_params(layers, width, dim, dtype=torch.float64, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(layers, width, dim, generator=g, dtype=dtype) * scale
    b1 = torch.randn(layers, width, generator=g, dtype=dtype) * scale
    w2 = torch.randn(layers, dim, width, generator=g, dtype=dtype) * scale / width**0.5
    b2 = torch.randn(layers, dim, generator=g, dtype=dtype) * scale
    return w1, b1, w2, b2


def hand_written_flow(x, w1, b1, w2, b2, act):
    """Point by point, neuron by neuron: no broadcasting tricks, nothing shared with the reference."""
    rho = {"relu": lambda z: max(z, 0.0), "tanh": math.tanh, "softplus": lambda z: math.log1p(math.exp(z))}[act]
    layers, width, dim = w1.shape
    dt = 1.0 / layers
    pts = [list(map(float, p)) for p in x]
    energy = 0.0
    for layer in range(layers):
        new_pts = []
        for p in pts:
            hidden = [rho(sum(float(w1[layer, k, d]) * p[d] for d in range(dim)) + float(b1[layer, k])) for k in range(width)]
            v = [sum(float(w2[layer, d, k]) * hidden[k] for k in range(width)) + float(b2[layer, d]) for d in range(dim)]
            energy += 0.5 * dt * sum(c * c for c in v) / len(pts)
            new_pts.append([p[d] + dt * v[d] for d in range(dim)])
        pts = new_pts
    return torch.tensor(pts, dtype=torch.float64), energy


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("layers,width,dim,n", [(1, 1, 2, 1), (3, 5, 2, 7), (4, 9, 3, 6)])
def test_reference_matches_hand_written_euler_loop(act, layers, width, dim, n):
    params = random_params(layers, width, dim)
    x = random_points(n, dim, seed=n)
    out, energy = fl.reference.euler_flow(x, *params, 1.0 / layers, act)
    want, want_energy = hand_written_flow(x, *params, act)
    assert_close(out, want, rtol=1e-12, atol=1e-12, name="x_final")
    assert abs(float(energy) - want_energy) <= 1e-12 * max(1.0, want_energy)


def test_reference_energy_law_from_trajectory():
    """E = ½ Σ Δ mean|v|², with v read back from the trajectory as (x^{l+1} - x^l) / Δ."""
    layers = 6
    params = random_params(layers, 11, 3)
    x = random_points(13, 3)
    traj = fl.reference.trajectory(x, *params, 1.0 / layers, "tanh")
    assert traj.shape == (layers + 1, 13, 3)
    v = (traj[1:] - traj[:-1]) * layers
    energy_from_traj = 0.5 * (1.0 / layers) * v.pow(2).sum(-1).mean(-1).sum()
    out, energy = fl.reference.euler_flow(x, *params, 1.0 / layers, "tanh")
    assert_close(energy, energy_from_traj, rtol=1e-12, atol=0, name="energy")
    assert_close(traj[-1], out, rtol=1e-12, atol=1e-12, name="trajectory end")
    assert_close(traj[1] - traj[0], fl.reference.velocity(x, *(p[0] for p in params), "tanh") / layers,
                 rtol=1e-12, atol=1e-12, name="first step")


def test_reference_batched_leading_dims_equal_flattened():
    params = random_params(3, 8, 2)
    x = random_points(4, 5, 2)
    out_b, e_b = fl.reference.euler_flow(x, *params, 1 / 3, "relu")
    out_f, e_f = fl.reference.euler_flow(x.reshape(-1, 2), *params, 1 / 3, "relu")
    assert_close(out_b.reshape(-1, 2), out_f, rtol=1e-14, atol=1e-14, name="x_final")
    assert_close(e_b, e_f, rtol=1e-14, atol=1e-14, name="energy")


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_reference_gradcheck_float64(act):
    params = [p.requires_grad_() for p in random_params(2, 4, 2)]
    x = (random_points(5, 2) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, *p: fl.reference.euler_flow(x, *p, 0.5, act), (x, *params),
                                    eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Every fused backend through fl.ops.euler_flow
# ------------------------------------------------------------------------------------------------


def compare(backend, x, params, dt, activation, rtol, atol, seed=3):
    """Values and gradients of backend vs the reference, for loss = (x_final·v).sum() + c·energy."""
    x = x.detach().requires_grad_(True)
    params = [p.detach().requires_grad_(True) for p in params]
    out, energy = euler_flow(x, *params, dt, activation, backend=backend)
    want_out, want_energy = fl.reference.euler_flow(x, *params, dt, activation)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(want_out.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)
    c = float(torch.rand((), generator=gen, dtype=torch.float64)) + 0.5
    inputs = [x, *params]
    grads = torch.autograd.grad((out * v).sum() + c * energy, inputs)
    want_grads = torch.autograd.grad((want_out * v).sum() + c * want_energy, inputs)
    check(out, want_out, rtol, atol, f"{backend} x_final")
    check(energy, want_energy, rtol, atol, f"{backend} energy")
    for got, want, name in zip(grads, want_grads, ("grad x", "grad weight1", "grad bias1", "grad weight2", "grad bias2")):
        check(got, want, rtol, atol, f"{backend} {name}")


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


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype,rtol,atol", TOLERANCES)
@pytest.mark.parametrize("shape,width,layers,activation", CASES, ids=[
    f"{'x'.join(map(str, c[0]))}-H{c[1]}-L{c[2]}-{c[3]}" for c in CASES])
def test_matches_reference(backend, device, dtype, rtol, atol, shape, width, layers, activation):
    dev = require_backend("euler_flow", backend, device, dtype=dtype, dim=shape[-1])
    skip_if_interpreted(backend, device, points(shape))
    x = random_points(*shape, dtype=dtype, device=dev)
    params = flow_params(layers, width, shape[-1], dtype=dtype, device=dev)
    compare(backend, x, params, 1.0 / layers, activation, rtol, atol)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", [c for c in FUSED if c.values[1] == "cuda"])
@pytest.mark.parametrize("dtype,rtol,atol", TOLERANCES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gpu_paper_sizes(backend, device, dtype, rtol, atol, activation):
    """The paper's width H = 500 and L = 10 layers on 1013 points."""
    dev = require_backend("euler_flow", backend, device, dtype=dtype)
    x = random_points(1013, 3, dtype=dtype, device=dev)
    compare(backend, x, flow_params(10, 500, 3, dtype=dtype, device=dev), 0.1, activation, rtol, atol)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_large_preactivations(backend, device, activation):
    """Pre-activations beyond softplus' threshold (20) and deep in tanh's saturation, float64."""
    dev = require_backend("euler_flow", backend, device)
    x = random_points(7, 3, device=dev) * 30.0
    compare(backend, x, flow_params(2, 16, 3, device=dev), 0.5, activation, 1e-10, 1e-9)


@pytest.mark.parametrize("backend,device", FUSED)
def test_non_contiguous_inputs(backend, device):
    """A transposed and sliced x, and transposed parameters, give the reference's answer."""
    dev = require_backend("euler_flow", backend, device)
    base = random_points(3, 14, device=dev)  # (D, 2N)
    x = base.t()[::2]  # (7, 3): every other point of a transposed tensor
    assert not x.is_contiguous()
    w1, b1, w2, b2 = flow_params(4, 16, 3, device=dev)
    w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (L, H, D) with strides of (L, D, H)
    w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not w1.is_contiguous() and not w2.is_contiguous()
    compare(backend, x, [w1, b1, w2, b2], 0.25, "tanh", 1e-10, 1e-9)


@pytest.mark.parametrize("backend,device", backend_cases("euler_flow"))
def test_batched_matches_flattened(backend, device):
    """(B, N, D) is B·N points: the energy is the mean over all of them, the points keep their shape."""
    dev = require_backend("euler_flow", backend, device)
    x = random_points(2, 7, 3, device=dev)
    params = flow_params(3, 16, 3, device=dev)
    out_b, e_b = euler_flow(x, *params, 1 / 3, "softplus", backend=backend)
    out_f, e_f = euler_flow(x.reshape(14, 3), *params, 1 / 3, "softplus", backend=backend)
    assert out_b.shape == x.shape
    assert_close(out_b.reshape(14, 3), out_f, rtol=1e-12, atol=1e-12, name="batched x_final")
    assert_close(e_b, e_f, rtol=1e-12, atol=1e-12, name="batched energy")


@pytest.mark.parametrize("backend,device", FUSED)
def test_gradient_of_one_output_only(backend, device):
    """Only x_final or only the energy used: the other output's gradient counts as zero."""
    dev = require_backend("euler_flow", backend, device)
    x = random_points(7, 2, device=dev, requires_grad=True)
    params = flow_params(3, 16, 2, device=dev, requires_grad=True)
    for pick in (0, 1):
        got = torch.autograd.grad(euler_flow(x, *params, 1 / 3, "tanh", backend=backend)[pick].sum(), [x, *params])
        want = torch.autograd.grad(fl.reference.euler_flow(x, *params, 1 / 3, "tanh")[pick].sum(), [x, *params])
        for name, g, w in zip(("x", "weight1", "bias1", "weight2", "bias2"), got, want):
            assert_close(g, w, rtol=1e-10, atol=1e-9, name=f"output {pick} only: grad {name}")


@pytest.mark.parametrize("backend,device", FUSED)
def test_gradcheck_float64(backend, device):
    """float64 finite differences through the fused path (relu away from its kink with this seed)."""
    dev = require_backend("euler_flow", backend, device)
    # The interpreter takes ~5 s per activation here (~90 flows): one smooth activation there; the launcher
    # tests above check every activation's gradient against autograd.
    for activation in ("tanh",) if interpreted(backend, device) else ACTIVATIONS:
        x = random_points(4, 2, device=dev, requires_grad=True)
        params = flow_params(2, 3, 2, device=dev, requires_grad=True, seed=5)
        assert torch.autograd.gradcheck(lambda x, *p: euler_flow(x, *p, 0.5, activation, backend=backend),
                                        (x, *params), eps=1e-6, atol=1e-7), activation


@pytest.mark.parametrize("backend,device", FUSED)
def test_no_grad_matches(backend, device):
    """Without gradients the fused path saves no states, and still gives the same values."""
    dev = require_backend("euler_flow", backend, device)
    x = random_points(7, 3, device=dev)
    params = flow_params(4, 16, 3, device=dev, requires_grad=True)
    with torch.no_grad():
        out, energy = euler_flow(x, *params, 0.25, "relu", backend=backend)
    assert not out.requires_grad and not energy.requires_grad
    want_out, want_energy = fl.reference.euler_flow(x, *params, 0.25, "relu")
    assert_close(out, want_out.detach(), rtol=1e-10, atol=1e-12, name="x_final")
    assert_close(energy, want_energy.detach(), rtol=1e-10, atol=1e-12, name="energy")


@pytest.mark.parametrize("backend,device", backend_cases("euler_flow"))
def test_zero_layers(backend, device):
    """L = 0: the identity map with zero energy, and gradient identity w.r.t. x."""
    dev = require_backend("euler_flow", backend, device)
    x = random_points(7, 3, device=dev, requires_grad=True)
    params = flow_params(0, 4, 3, device=dev)
    out, energy = euler_flow(x, *params, 1.0, "relu", backend=backend)
    assert torch.equal(out, x) and float(energy.detach()) == 0.0
    (g,) = torch.autograd.grad(out.sum(), [x])
    assert torch.equal(g, torch.ones_like(x))


@pytest.mark.parametrize("backend,device", [c for c in FUSED if c.values[0] != "cuda"])
def test_repeated_runs_are_bitwise_equal(backend, device):
    """cpu and triton sum without atomics: the same inputs give the same bits (the CUDA kernels sum weight
    gradients with atomics, hence dispatch's `deterministic` flag keeps "auto" off them)."""
    dev = require_backend("euler_flow", backend, device)
    n = 37 if interpreted(backend, device) else 1013
    x = random_points(n, 3, device=dev, requires_grad=True)
    params = flow_params(3, 33, 3, device=dev, requires_grad=True)

    def run():
        out, energy = euler_flow(x, *params, 1 / 3, "relu", backend=backend)
        return (out, energy, *torch.autograd.grad(out.sum() + energy, [x, *params]))

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_cpu_energy_and_points_do_not_depend_on_the_thread_count():
    """Gradients are reduced per thread in a fixed order; the energy is summed per tile in tile order, and
    each point's path is its own: neither depends on the thread count."""
    require_backend("euler_flow", "cpu")
    x = random_points(1013, 3)
    params = flow_params(3, 33, 3)
    first = euler_flow(x, *params, 1 / 3, "relu", backend="cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = euler_flow(x, *params, 1 / 3, "relu", backend="cpu")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], first[0]) and torch.equal(single[1], first[1])


@pytest.mark.parametrize("backend,device", FUSED)
def test_half_precision_is_refused_by_name(backend, device):
    dev = require_backend("euler_flow", backend, device)
    params = [p.half() for p in flow_params(2, 4, 3, device=dev)]
    with pytest.raises(fl.BackendUnavailableError, match="float32 or float64"):
        euler_flow(random_points(7, 3, device=dev).half(), *params, 0.5, backend=backend)


def test_auto_result_matches_reference():
    x = random_points(2, 7, 3)
    params = flow_params(2, 16, 3)
    out, energy = euler_flow(x, *params, 0.5, "softplus")
    want_out, want_energy = fl.reference.euler_flow(x, *params, 0.5, "softplus")
    assert_close(out, want_out, rtol=1e-10, atol=1e-12, name="auto x_final")
    assert_close(energy, want_energy, rtol=1e-10, atol=1e-12, name="auto energy")
    # other dtypes go to the reference under auto
    half = euler_flow(x.bfloat16(), *(p.bfloat16() for p in params), 0.5, "softplus")[0]
    assert_close(half, fl.reference.euler_flow(x.bfloat16(), *(p.bfloat16() for p in params), 0.5, "softplus")[0],
                 rtol=0, atol=0, name="bfloat16 auto = reference")


@pytest.mark.parametrize("backend", ["auto", *dispatch.backends_for("euler_flow")])
def test_input_errors(backend):
    """Checked before any backend is chosen: the same errors whatever is built."""
    x = random_points(7, 3)
    w1, b1, w2, b2 = flow_params(2, 4, 3)
    for args, exc, msg in [
        ((random_points(7, 2), w1, b1, w2, b2, 0.5), ValueError, "dimension 3"),
        ((x, w1[0], b1, w2, b2, 0.5), ValueError, "weight1"),
        ((x, w1, b1[:, :3], w2, b2, 0.5), ValueError, "bias1"),
        ((x, w1, b1, w2.transpose(1, 2), b2, 0.5), ValueError, "weight2"),
        ((x, w1, b1, w2, b2[:1], 0.5), ValueError, "bias2"),
        ((x[:0], w1, b1, w2, b2, 0.5), ValueError, "empty point set"),
        ((x, w1, b1, w2, b2.float(), 0.5), TypeError, "bias2 must have x's dtype"),
        ((x, w1.to("meta"), b1, w2, b2, 0.5), TypeError, "weight1 must have x's dtype and device"),
        ((x.long(), w1, b1, w2, b2, 0.5), TypeError, "floating-point"),
        ((x.numpy(), w1, b1, w2, b2, 0.5), TypeError, "x must be a torch.Tensor"),
        ((x, w1, b1, w2, b2, "0.5"), TypeError, "dt"),
        ((x, w1, b1, w2, b2, 0.5, "gelu"), ValueError, "activation"),
    ]:
        with pytest.raises(exc, match=msg):
            euler_flow(*args, backend=backend)


# ------------------------------------------------------------------------------------------------
# The launcher contract of every fused backend module (dispatch.load("euler_flow", name))
# ------------------------------------------------------------------------------------------------


def launcher_problem(n, width, dim, layers, dtype, device, seed=0):
    """Random points, parameters (W2 nonzero, unlike ResNetFlow's identity start, so every path carries
    signal) and upstream gradients, drawn in float64 then cast."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(tuple(shape), generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)

    x = rnd(n, dim)
    params = (rnd(layers, width, dim), rnd(layers, width, scale=0.5),
              rnd(layers, dim, width, scale=1.0 / math.sqrt(max(width, 1))), rnd(layers, dim, scale=0.5))
    return x, params, rnd(n, dim), rnd()


def launcher_reference(x, params, dt, activation, grad_x_final, grad_kinetic_sum):
    """(x_final, states, S) of the reference, S = Σ_l Σ_i |v_l(x_i^l)|² read back from the trajectory, and the
    gradients of <x_final, gx> + S·gs by autograd."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params)]
    traj = fl.reference.trajectory(*leaves, dt, activation)
    kinetic_sum = ((traj[1:] - traj[:-1]) / dt).pow(2).sum() if len(traj) > 1 else traj.new_zeros(())
    loss = (traj[-1] * grad_x_final).sum() + kinetic_sum * grad_kinetic_sum
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    return traj[-1].detach(), traj[:-1].detach(), kinetic_sum.detach(), grads


# Launcher tolerances (atol relative to the tensor's largest entry, at least 1): float32 a few hundred roundings
# summed in another order than the reference's BLAS (observed <= 1e-6 relative at these sizes); float64 the
# same with eps 1.1e-16 (observed ~1e-15). The kinetic sum is compared relative to its own size.
LAUNCHER_TOLS = [pytest.param(torch.float32, 1e-5, 1e-5, id="float32"),
                 pytest.param(torch.float64, 1e-12, 1e-12, id="float64")]


def check_launcher(backend, device, n, width, dim, layers, dtype, rtol, atol, activation, dt=None, **tiling):
    dev = require_backend("euler_flow", backend, device, dtype=dtype, dim=dim)
    launcher = dispatch.load("euler_flow", backend)
    dt = 1.0 / layers if dt is None else dt
    x, params, gx, gs = launcher_problem(n, width, dim, layers, dtype, dev)
    want_x, want_states, want_sum, want_grads = launcher_reference(x, params, dt, activation, gx, gs)

    forward_tiles = {k: v for k, v in tiling.items() if k in ("block_n", "block_h")}
    x_final, states, kinetic_sum = launcher.forward(x, *params, dt, activation, save_states=True, **forward_tiles)
    check(x_final, want_x, rtol, atol, "x_final")
    if SAVED_FOR_BACKWARD[backend] == "layers":
        check(states, want_states, rtol, atol, "states")
    else:  # its backward recomputes the layers from x: nothing saved
        assert states.shape == (0, n, dim)
    assert kinetic_sum.shape == ()
    check(kinetic_sum.double(), want_sum.double(), rtol, atol, "kinetic_sum (raw, not scaled)")

    grads = launcher.backward(gx, gs, flow_backward_states(backend, x, states), *params, dt, activation, **tiling)
    assert len(grads) == 5
    for name, got, want in zip(("grad_x", "grad_weight1", "grad_bias1", "grad_weight2", "grad_bias2"), grads, want_grads):
        assert got.dtype == dtype
        check(got, want, rtol, atol, name)
    return x_final, states, grads


# N 1, 7, 67; H 1, 16, 33; D 2, 3; L 1, 3: each value at least twice, odd and prime sizes on purpose.
SHAPES = [(1, 1, 2, 1), (7, 16, 3, 3), (67, 33, 3, 3), (67, 1, 2, 3), (7, 33, 2, 1)]


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype,rtol,atol", LAUNCHER_TOLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("n,width,dim,layers", SHAPES, ids=[f"N{s[0]}-H{s[1]}-D{s[2]}-L{s[3]}" for s in SHAPES])
def test_launcher_contract(backend, device, dtype, rtol, atol, activation, n, width, dim, layers):
    check_launcher(backend, device, n, width, dim, layers, dtype, rtol, atol, activation)


@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("dtype,rtol,atol", LAUNCHER_TOLS)
@pytest.mark.parametrize("dim", [1, 5])
def test_launcher_other_dimensions(backend, device, dtype, rtol, atol, dim):
    # Triton pads D to a power of two: 1 -> 2, 5 -> 8.
    check_launcher(backend, device, 7, 16, dim, 2, dtype, rtol, atol, "tanh")


@pytest.mark.parametrize("backend,device", FUSED)
def test_launcher_without_states(backend, device):
    dev = require_backend("euler_flow", backend, device)
    launcher = dispatch.load("euler_flow", backend)
    x, params, _, _ = launcher_problem(7, 5, 3, 2, torch.float64, dev)
    x_final, states, kinetic_sum = launcher.forward(x, *params, 0.5, "tanh", save_states=False)
    assert states.shape == (0, 7, 3)
    want_x, _, want_sum, _ = launcher_reference(x, params, 0.5, "tanh", torch.zeros_like(x), x.new_zeros(()))
    check(x_final, want_x, 1e-12, 1e-12, "x_final")
    check(kinetic_sum.double(), want_sum, 1e-12, 1e-12, "kinetic_sum")


@pytest.mark.parametrize("backend,device", FUSED)
def test_launcher_gradients_do_not_alias(backend, device):
    """torch.library ops may not return aliasing outputs: each gradient owns its storage."""
    dev = require_backend("euler_flow", backend, device, dtype=torch.float32, dim=2)
    launcher = dispatch.load("euler_flow", backend)
    x, params, gx, gs = launcher_problem(7, 5, 2, 2, torch.float32, dev)
    _, states, _ = launcher.forward(x, *params, 0.5, "tanh", save_states=True)
    grads = launcher.backward(gx, gs, flow_backward_states(backend, x, states), *params, 0.5, "tanh")
    assert len({g.untyped_storage().data_ptr() for g in grads}) == len(grads)
    assert all(g.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for g in grads)


@pytest.mark.parametrize("backend,device", FUSED)
def test_launcher_refuses_what_its_kernels_cannot_read(backend, device):
    dev = require_backend("euler_flow", backend, device, dtype=torch.float32, dim=2)
    launcher = dispatch.load("euler_flow", backend)
    x, params, _, _ = launcher_problem(4, 3, 2, 1, torch.float32, dev)
    with pytest.raises(TypeError, match="bias1"):
        launcher.forward(x, params[0], params[1].double(), *params[2:], 1.0, "relu")
    with pytest.raises(TypeError, match="float32 or float64"):
        launcher.forward(x.half(), *(p.half() for p in params), 1.0, "relu")
    with pytest.raises(ValueError, match="contiguous"):
        launcher.forward(torch.randn(2, 4, device=dev).T, *params, 1.0, "relu")


# ------------------------------------------------------------------------------------------------
# The Triton launchers (kernels/euler_flow.py): tiles, H chunks and programs
# ------------------------------------------------------------------------------------------------

TRITON = [c for c in FUSED if c.values[0] == "triton"]


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype,rtol,atol", LAUNCHER_TOLS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_triton_several_tiles_chunks_and_programs(backend, device, dtype, rtol, atol, activation):
    # 37 points in tiles of 16 (3 tiles, the last one partial) shared by 2 programs (one of them runs the
    # grid-stride loop twice), H = 17 in chunks of 8 (3 chunks, the last one 1 wide); dt is not 1/L.
    check_launcher(backend, device, 37, 17, 3, 2, dtype, rtol, atol, activation, dt=0.37, block_n=16, block_h=8,
                   num_programs=2)


@pytest.mark.parametrize("backend,device", TRITON)
@pytest.mark.parametrize("dtype,rtol,atol", LAUNCHER_TOLS)
@pytest.mark.parametrize("which", ["x_final", "kinetic_sum"])
def test_triton_one_upstream_gradient(backend, device, dtype, rtol, atol, which):
    """A None upstream gradient counts as zero (the Triton launcher accepts None for either)."""
    dev = require_backend("euler_flow", backend, device, dtype=dtype)
    from fastlddmm.kernels import euler_flow as kernels

    x, params, gx, gs = launcher_problem(7, 16, 3, 2, dtype, dev, seed=1)
    if which == "x_final":
        ref_args, k_args = (gx, torch.zeros_like(gs)), (gx, None)
    else:
        ref_args, k_args = (torch.zeros_like(gx), gs), (None, gs)
    _, states, _, want = launcher_reference(x, params, 0.5, "softplus", *ref_args)
    grads = kernels.backward(*k_args, states.contiguous(), *params, 0.5, "softplus")
    for i, (got, w) in enumerate(zip(grads, want)):
        check(got, w, rtol, atol, f"gradient {i}")


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_backward_is_deterministic_with_several_programs(backend, device):
    dev = require_backend("euler_flow", backend, device, dtype=torch.float32)
    from fastlddmm.kernels import euler_flow as kernels

    x, params, gx, gs = launcher_problem(37, 17, 3, 2, torch.float32, dev, seed=2)
    _, states, _ = kernels.forward(x, *params, 0.5, "relu")
    first = kernels.backward(gx, gs, states, *params, 0.5, "relu", block_n=16, block_h=8, num_programs=2)
    second = kernels.backward(gx, gs, states, *params, 0.5, "relu", block_n=16, block_h=8, num_programs=2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_zero_layers_is_identity(backend, device):
    dev = require_backend("euler_flow", backend, device)
    from fastlddmm.kernels import euler_flow as kernels

    x, params, gx, gs = launcher_problem(5, 4, 3, 0, torch.float64, dev)
    x_final, states, kinetic_sum = kernels.forward(x, *params, 1.0, "relu")
    assert torch.equal(x_final, x) and states.shape == (0, 5, 3) and kinetic_sum.item() == 0.0
    grads = kernels.backward(gx, gs, states, *params, 1.0, "relu")
    assert torch.equal(grads[0], gx)
    assert all(g.shape == p.shape and not g.any() for g, p in zip(grads[1:], params))


@pytest.mark.parametrize("backend,device", TRITON)
def test_triton_bad_inputs_are_named(backend, device):
    dev = require_backend("euler_flow", backend, device, dtype=torch.float32, dim=2)
    from fastlddmm.kernels import euler_flow as kernels

    x, params, _, _ = launcher_problem(4, 3, 2, 1, torch.float32, dev)
    with pytest.raises(ValueError, match="activation"):
        kernels.forward(x, *params, 1.0, "sigmoid")
    with pytest.raises(ValueError, match="weight2"):
        kernels.forward(x, params[0], params[1], params[2].transpose(1, 2), params[3], 1.0, "relu")
    with pytest.raises(ValueError, match="x must be contiguous"):
        kernels.forward(torch.randn(2, 4, device=dev).T, *params, 1.0, "relu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", [c for c in TRITON if c.values[1] == "cuda"])
@pytest.mark.parametrize("dtype,rtol,atol", [pytest.param(torch.float32, 1e-4, 1e-4, id="float32"),
                                             pytest.param(torch.float64, 1e-11, 1e-11, id="float64")])
def test_gpu_triton_many_tiles_per_program(backend, device, dtype, rtol, atol):
    # 100003 points, few programs: each one runs the grid-stride loop over hundreds of tiles. Sums ~100x
    # longer than the small cases' (hence 1e-4 / 1e-11), and float32 meets the GPU's approximate exp.
    check_launcher(backend, device, 100_003, 64, 2, 3, dtype, rtol, atol, "softplus", num_programs=7)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", [c for c in TRITON if c.values[1] == "cuda"])
def test_gpu_triton_backward_is_deterministic(backend, device):
    dev = require_backend("euler_flow", backend, device, dtype=torch.float32)
    from fastlddmm.kernels import euler_flow as kernels

    x, params, gx, gs = launcher_problem(20_011, 500, 3, 4, torch.float32, dev, seed=3)
    _, states, _ = kernels.forward(x, *params, 0.25, "tanh")
    first = kernels.backward(gx, gs, states, *params, 0.25, "tanh")
    second = kernels.backward(gx, gs, states, *params, 0.25, "tanh")
    for a, b in zip(first, second):
        assert torch.equal(a, b)
