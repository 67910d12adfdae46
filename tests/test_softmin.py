"""The softmin op (fastlddmm/ops/softmin): Sinkhorn's reduction f_i = -eps log Σ_j exp(h_j - C(x_i, y_j)/eps),
C = |x - y|^p / p. The reference twin against a hand-written loop, then the contract (``Softmin(p)``:
``cost``, ``__call__``, ``pair``) for every backend of the dispatch table: values and gradients in x,
float32 / float64, odd sizes, batched, zero-weight points, clouds far from the origin, float64 gradcheck;
then the Triton kernels' tile loops (forced small tiles) and their gradients in y and h.

Every backend is compared with the float64 reference on the same (float32-rounded, for float32 runs)
points, so that only the backend's own arithmetic is measured.

KeOps formulas compiled by this file (conftest.keops_formula): the soft-min and its gradient in x for
D = 3, p = 2 (float32, float64) and p = 1 (float64), the ones fl.sinkhorn(backend="keops") compiles.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlddmm as fl
from fastlddmm import dispatch, sinkhorn_solver

from conftest import (assert_close, assert_close_to_max, backend_cases, clouds, keops_formula, require_backend,
                      skip_if_interpreted)

CASES = backend_cases("softmin")
KEOPS_SOFTMIN = {(3, 2, torch.float32), (3, 2, torch.float64), (3, 1, torch.float64)}  # (D, p, dtype)

# (dtype, value tolerance, gradient tolerance), relative to the largest entry of the float64 reference. One
# soft-min alone (no Sinkhorn loop to amplify rounding): float32 values and gradients measured <= 1.2e-6
# relative to the largest entry for the streaming kernels, so 1e-6 / 5e-6 (~10-40 ulps); float64: a few
# hundred ulps.
DTYPES = [pytest.param(torch.float32, 1e-6, 5e-6, id="float32"),
          pytest.param(torch.float64, 1e-13, 1e-12, id="float64")]


def softmin_of(backend, p):
    return dispatch.load("softmin", backend).Softmin(p)


def reference_softmin(eps, x, y, h, p):  # float64, differentiable in x, y, h
    return fl.reference.softmin(eps, fl.reference.cost_matrix(x, y, p), h)


def problem(batch, n, m, dim, dtype, device, seed):
    x, y = clouds(n, m, dim, batch=batch, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    h = (torch.randn(batch, m, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    if m > 1:
        h[0, 1] = sinkhorn_solver.ZERO_WEIGHT_LOG  # a zero-weight point
    go = torch.randn(batch, n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, y, h, go


# ------------------------------------------------------------------------------------------------
# The reference twin against a hand-written loop
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 1])
def test_reference_matches_hand_written_loop(p):
    x, y = clouds(3, 4, 2, batch=1, seed=5)
    h = torch.tensor([[0.3, -1.0, 2.0, 0.0]], dtype=torch.float64)
    eps = 0.7
    got = fl.reference.softmin(eps, fl.reference.cost_matrix(x, y, p), h)[0]
    for i, xi in enumerate(x[0].tolist()):
        costs = [math.dist(xi, yj) ** p / p for yj in y[0].tolist()]
        want = -eps * math.log(sum(math.exp(hj - c / eps) for hj, c in zip(h[0].tolist(), costs)))
        assert got[i].item() == pytest.approx(want, rel=1e-13)


def test_reference_p1_cost_has_a_finite_gradient_at_coincident_points():
    """p = 1: sqrt(max(d², 1e-8)), as GeomLoss, so coincident points give a zero, not NaN, gradient."""
    x = torch.zeros(1, 1, 3, dtype=torch.float64, requires_grad=True)
    c = fl.reference.cost_matrix(x, x.detach().clone(), 1)
    assert c.item() == pytest.approx(1e-4)
    (g,) = torch.autograd.grad(c.sum(), x)
    assert torch.equal(g, torch.zeros_like(g))


# ------------------------------------------------------------------------------------------------
# The contract, for every backend
# ------------------------------------------------------------------------------------------------

SIZES = [(2, 1, 1, 3), (2, 1, 17, 3), (2, 7, 5, 2), (1, 13, 29, 3), (2, 29, 13, 3), (1, 1013, 7, 3), (1, 7, 1013, 3)]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("batch,n,m,dim", SIZES, ids=[f"B{b}-{n}x{m}-D{d}" for b, n, m, d in SIZES])
def test_softmin_values_and_gradients(backend, device, dtype, value_tol, grad_tol, p, batch, n, m, dim):
    dev = require_backend("softmin", backend, device, dtype=dtype, dim=dim)
    skip_if_interpreted(backend, device, max(n, m))
    keops_formula(backend, (dim, p, dtype) in KEOPS_SOFTMIN, f"the soft-min with D={dim}, p={p}, {dtype}")
    x, y, h, go = problem(batch, n, m, dim, dtype, dev, seed=n + m)
    eps = 0.1
    softmin = softmin_of(backend, p)
    x = x.requires_grad_()
    f = softmin(eps, softmin.cost(x, y), h)
    assert f.shape == (batch, n) and f.dtype == dtype and f.device == x.device
    x64 = x.detach().double().requires_grad_()
    want = reference_softmin(eps, x64, y.double(), h.double(), p)
    assert_close_to_max(f, want, value_tol, "softmin")
    (gx,) = torch.autograd.grad((f * go).sum(), x)
    (want_gx,) = torch.autograd.grad((want * go.double()).sum(), x64)
    assert gx.dtype == dtype
    assert_close_to_max(gx, want_gx, grad_tol, "grad x")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
def test_softmin_pair_gives_both_directions(backend, device, dtype, value_tol, grad_tol):
    """pair(eps, c_xy, h_y, c_yx, h_x) = (x <- y, y <- x): what one symmetric Sinkhorn update needs."""
    dev = require_backend("softmin", backend, device, dtype=dtype)
    x, y, h_y, _ = problem(2, 11, 7, 3, dtype, dev, seed=3)
    _, _, h_x, _ = problem(2, 7, 11, 3, dtype, dev, seed=4)
    softmin = softmin_of(backend, 2)
    x = x.requires_grad_()
    f, g = softmin.pair(0.2, softmin.cost(x, y), h_y, softmin.cost(y, x.detach()), h_x)
    assert f.shape == (2, 11) and g.shape == (2, 7)
    x64 = x.detach().double().requires_grad_()
    want_f = reference_softmin(0.2, x64, y.double(), h_y.double(), 2)
    assert_close_to_max(f, want_f, value_tol, "f (x <- y)")
    assert_close_to_max(g, reference_softmin(0.2, y.double(), x64.detach(), h_x.double(), 2), value_tol, "g (y <- x)")
    assert_close_to_max(torch.autograd.grad(f.sum(), x)[0], torch.autograd.grad(want_f.sum(), x64)[0], grad_tol,
                        "grad x of f")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("p", [2, 1])
def test_softmin_float32_far_from_the_origin(backend, device, p):
    """float32 clouds at 1e3 from the origin: the |x|² + |y|² - 2 x·y expansion would lose every digit of O(1)
    costs (checked, so this test can fail); from differences, the tolerances near the origin still hold."""
    dev = require_backend("softmin", backend, device, dtype=torch.float32)
    keops_formula(backend, (3, p, torch.float32) in KEOPS_SOFTMIN, f"the soft-min with p={p}, float32")
    x, y = clouds(17, 23, batch=1, dtype=torch.float32, device=dev, seed=6, offset=1e3)
    expansion = (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2 * x @ y.transpose(1, 2)
    exact = (x.double()[:, :, None] - y.double()[:, None]).pow(2).sum(-1)
    assert (expansion.double() - exact).abs().max() > 1e-2  # the trap is real at this offset
    h = torch.zeros(1, 23, dtype=torch.float32, device=dev)
    softmin = softmin_of(backend, p)
    x = x.requires_grad_()
    f = softmin(0.1, softmin.cost(x, y), h)
    x64 = x.detach().double().requires_grad_()
    want = reference_softmin(0.1, x64, y.double(), h.double(), p)
    _, value_tol, grad_tol = DTYPES[0].values
    assert_close_to_max(f, want, value_tol, "softmin")
    assert_close_to_max(torch.autograd.grad(f.sum(), x)[0], torch.autograd.grad(want.sum(), x64)[0], grad_tol, "grad x")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("p", [2, 1])
def test_softmin_gradcheck_float64(backend, device, p):
    dev = require_backend("softmin", backend, device)
    x, y = clouds(5, 6, 3, batch=1, device=dev, seed=11)
    h = torch.linspace(-1, 1, 6, dtype=torch.float64, device=dev).view(1, 6)
    softmin = softmin_of(backend, p)
    assert torch.autograd.gradcheck(lambda a: softmin(0.3, softmin.cost(a, y), h), (x.requires_grad_(),))


@pytest.mark.parametrize("backend", dispatch.backends_for("softmin"))
def test_softmin_takes_p_1_or_2(backend):
    if not dispatch.status(backend):
        pytest.skip(f"backend {backend!r} is not available here: {dispatch.status(backend).reason}")
    for p in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match="p must be 1 or 2"):
            softmin_of(backend, p)
    assert repr(softmin_of(backend, 1)).endswith("Softmin(p=1)")


# ------------------------------------------------------------------------------------------------
# The Triton kernels (kernels/softmin.py): tile loops, and the gradients in y and h
# ------------------------------------------------------------------------------------------------

TRITON_CASES = [c for c in CASES if c.values[0] == "triton"]


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("n,m,dim,block_n,block_m", [(13, 29, 3, 4, 8), (7, 5, 2, 2, 2), (1, 17, 3, 2, 4)])
def test_triton_kernels_tiles(backend, device, dtype, value_tol, grad_tol, p, n, m, dim, block_n, block_m):
    """Small forced tiles: the running max over several column tiles, padded rows and columns."""
    dev = require_backend("softmin", backend, device, dtype=dtype, dim=dim)
    from fastlddmm.kernels import softmin as kernels

    x, y, h, go = problem(2, n, m, dim, dtype, dev, seed=n + m)
    eps = 0.1
    x_, y_, h_ = (t.double().requires_grad_() for t in (x, y, h))
    want = reference_softmin(eps, x_, y_, h_, p)
    lse = kernels.forward(x, y, h, eps, p, block_n=block_n, block_m=block_m)
    assert lse.dtype == dtype
    assert_close_to_max(-eps * lse, want, value_tol, "softmin")
    want_gx, want_gy, want_gh = torch.autograd.grad((want * go.double()).sum(), (x_, y_, h_))
    gx = kernels.backward_x(x, y, h, lse, go, eps, p, block_n=block_n, block_m=block_m)
    gy, gh = kernels.backward_y(x, y, h, lse, go, eps, p, block_n=block_n, block_m=block_m)
    assert gx.dtype == gy.dtype == gh.dtype == dtype
    assert_close_to_max(gx, want_gx, grad_tol, "grad x")
    assert_close_to_max(gy, want_gy, grad_tol, "grad y")
    assert_close_to_max(gh, want_gh, grad_tol, "grad h")


@pytest.mark.parametrize("backend,device", TRITON_CASES)
@pytest.mark.parametrize("p", [2, 1])
def test_triton_function_gradcheck_in_x_y_h(backend, device, p):
    dev = require_backend("softmin", backend, device)
    function = dispatch.load("softmin", "triton").SoftminFunction
    x, y = clouds(5, 6, 2, batch=1, device=dev, seed=11)
    h = torch.linspace(-1, 1, 6, dtype=torch.float64, device=dev).view(1, 6)
    inputs = tuple(t.clone().requires_grad_() for t in (x, y, h))
    assert torch.autograd.gradcheck(lambda a, b, c: function.apply(a, b, c, 0.3, p), inputs)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_triton_kernels_reject_bad_input(backend, device):
    dev = require_backend("softmin", backend, device)
    from fastlddmm.kernels import softmin as kernels

    x, y = clouds(3, 4, batch=1, device=dev)
    h = torch.zeros(1, 4, dtype=torch.float64, device=dev)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        kernels.forward(x, y, h, 0.1, 3)
    with pytest.raises(ValueError, match="h must have shape"):
        kernels.forward(x, y, h[:, :3], 0.1, 2)
    with pytest.raises(ValueError, match="y must have x's dtype"):
        kernels.forward(x, y.float(), h, 0.1, 2)
    with pytest.raises(ValueError, match=r"shapes \(B, N, D\) and \(B, M, D\)"):
        kernels.forward(x[0], y[0], h, 0.1, 2)
    with pytest.raises(TypeError, match="float32 or float64"):
        kernels.forward(x.half(), y.half(), h.half(), 0.1, 2)


@pytest.mark.parametrize("backend,device", TRITON_CASES)
def test_triton_kernels_empty_sides(backend, device):
    """M = 0: lse = -inf (f = +inf, an empty soft-min); N = 0: empty outputs."""
    dev = require_backend("softmin", backend, device)
    from fastlddmm.kernels import softmin as kernels

    x, y = clouds(3, 4, batch=1, device=dev)
    lse = kernels.forward(x, y[:, :0], y.new_zeros(1, 0), 0.1, 2)
    assert torch.equal(lse, torch.full_like(lse, float("-inf")))
    assert kernels.forward(x[:, :0], y, y.new_zeros(1, 4), 0.1, 2).shape == (1, 0)


def test_reference_is_exact_for_its_own_formula():
    """A sanity check of the comparison itself: the float32 reference against float64 on the same points
    stays within the float32 tolerance, so a tolerance failure above is the backend's, not rounding."""
    x, y, h, _ = problem(1, 13, 29, 3, torch.float32, "cpu", seed=42)
    f = reference_softmin(0.1, x, y, h, 2)
    want = reference_softmin(0.1, x.double(), y.double(), h.double(), 2)
    assert_close_to_max(f, want, DTYPES[0].values[1], "float32 reference")
    assert_close(f.double(), want, rtol=1e-5, atol=1e-5, name="float32 reference, entrywise")
