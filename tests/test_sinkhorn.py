"""fl.sinkhorn, fl.sinkhorn_potentials and fl.sinkhorn_projection: the shared solver
(fastlddmm/sinkhorn_solver.py) with the reference soft-min against GeomLoss (values and gradients), its
float32 accuracy, envelope-theorem gradients and the properties of the debiased divergence; then every
soft-min backend of the dispatch table through the public functions, against the float64 reference on the
same points (float32 / float64, p = 1 / 2, odd sizes, batched, weights, reach, debias, clouds far from the
origin), and the ε schedule and argument checks.

KeOps formulas compiled by this file (conftest.keops_formula): the soft-min and its gradient for D = 3,
p = 2 (float32, float64) and p = 1 (float64); the projection's value for D = 3, p = 2, float64.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch

import fastlddmm as fl
from fastlddmm import sinkhorn_solver

from conftest import (assert_close, assert_close_to_max, backend_cases, clouds, keops_formula, require_backend,
                      skip_if_interpreted)

CASES = backend_cases("softmin")
KEOPS_SOFTMIN = {(3, 2, torch.float32), (3, 2, torch.float64), (3, 1, torch.float64)}  # (D, p, dtype)
has_geomloss = importlib.util.find_spec("geomloss") is not None
has_scipy = importlib.util.find_spec("scipy") is not None
needs_geomloss = pytest.mark.skipif(not has_geomloss, reason="needs geomloss: pip install 'fastlddmm[test]'")

GRID = list(itertools.product((1, 2), (0.05, 0.5), (0.5, 0.9), (None, 0.5), (True, False)))

# (dtype, value tolerance, gradient tolerance) of a backend against the float64 reference on the same
# (float32-rounded) points, relative to the reference's largest entry. float32: values ~16 ulps (measured
# <= 6.5e-8 for Triton); gradients 5e-5, as the float32 reference itself (measured 1.4e-5: the loop's last
# step turns potentials of size ~1 into gradients of size ~0.1). float64: same loop, same arithmetic up to
# summation order (~1e-15 measured), a few hundred ulps.
DTYPES = [pytest.param(torch.float32, 2e-6, 5e-5, id="float32"),
          pytest.param(torch.float64, 1e-13, 1e-12, id="float64")]


def problem(n=13, m=17, dim=3, batch=2, dtype=torch.float64, seed=0, weights=True):
    g = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    x = torch.randn(*shape, n, dim, generator=g, dtype=dtype)
    y = torch.randn(*shape, m, dim, generator=g, dtype=dtype) * 0.8 + 0.5
    if not weights:
        return x, y, None, None
    a = torch.rand(*shape, n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(*shape, m, generator=g, dtype=dtype) + 0.1
    return x, y, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def value_and_grads(fn, x, y, a, b):
    ins = [t.clone().requires_grad_() for t in (x, y)] + [None if t is None else t.clone().requires_grad_() for t in (a, b)]
    out = fn(*ins)
    v = torch.linspace(1.0, 2.0, out.numel(), dtype=out.dtype, device=out.device).view(out.shape)  # distinct per item
    grads = torch.autograd.grad((out * v).sum(), [t for t in ins if t is not None])
    return out.detach(), grads


def geomloss_fn(p, blur, scaling, reach, debias):
    from geomloss import SamplesLoss

    loss = SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, reach=reach, debias=debias, backend="tensorized")
    return lambda x, y, a, b: loss(x, y) if a is None else loss(a, x, b, y)


def ours_fn(backend="reference", **kw):
    return lambda x, y, a, b: fl.sinkhorn(x, y, a=a, b=b, backend=backend, **kw)


def ours(p, blur, scaling, reach, debias, backend="reference"):
    return ours_fn(backend, p=p, blur=blur, scaling=scaling, reach=reach, debias=debias)


# ------------------------------------------------------------------------------------------------
# The solver with the reference soft-min: GeomLoss equality
# ------------------------------------------------------------------------------------------------


@needs_geomloss
@pytest.mark.parametrize("p,blur,scaling,reach,debias", GRID)
def test_float64_equals_geomloss_batched_weighted(p, blur, scaling, reach, debias):
    # Same algorithm, same float64 arithmetic up to summation order: agreement to ~1e-14, checked at 1e-10.
    x, y, a, b = problem()
    ref_v, ref_g = value_and_grads(geomloss_fn(p, blur, scaling, reach, debias), x, y, a, b)
    v, g = value_and_grads(ours(p, blur, scaling, reach, debias), x, y, a, b)
    assert_close(v, ref_v, rtol=1e-10, atol=1e-12, name="value")
    for name, gi, ri in zip("xyab", g, ref_g):
        assert_close(gi, ri, rtol=1e-10, atol=1e-12, name=f"gradient wrt {name}")


@needs_geomloss
@pytest.mark.parametrize("p,reach,debias", [(2, None, True), (1, None, True), (2, 0.5, False), (1, 0.5, True)])
@pytest.mark.parametrize("n,m", [(1, 7), (7, 1), (31, 29)])
def test_float64_equals_geomloss_single_uniform(p, reach, debias, n, m):
    x, y, _, _ = problem(n, m, dim=2, batch=None, seed=n * m, weights=False)
    ref_v, ref_g = value_and_grads(geomloss_fn(p, 0.1, 0.7, reach, debias), x, y, None, None)
    v, g = value_and_grads(ours(p, 0.1, 0.7, reach, debias), x, y, None, None)
    assert v.shape == ()
    assert_close(v, ref_v, rtol=1e-10, atol=1e-12, name="value")
    for name, gi, ri in zip("xy", g, ref_g):
        assert_close(gi, ri, rtol=1e-10, atol=1e-12, name=f"gradient wrt {name}")


@needs_geomloss
@pytest.mark.parametrize("p,blur,scaling,reach,debias", [(2, 0.5, 0.5, None, True), (2, 0.05, 0.9, 0.5, False),
                                                          (1, 0.5, 0.9, 0.5, False)])
def test_float32_equals_geomloss(p, blur, scaling, reach, debias):
    # Smooth cases (p = 2, or p = 1 without the xx/yy problems whose zero diagonal GeomLoss computes from the
    # |x|² + |y|² - 2x·y expansion, i.e. from float32 rounding noise): both sides within float32 rounding.
    x, y, a, b = problem(dtype=torch.float32)
    ref_v, ref_g = value_and_grads(geomloss_fn(p, blur, scaling, reach, debias), x, y, a, b)
    v, g = value_and_grads(ours(p, blur, scaling, reach, debias), x, y, a, b)
    assert_close(v, ref_v, rtol=1e-5, atol=1e-6, name="value")
    for name, gi, ri in zip("xyab", g, ref_g):
        assert_close(gi, ri, rtol=1e-4, atol=1e-5 * ri.abs().max().item(), name=f"gradient wrt {name}")


@pytest.mark.parametrize("p,blur,scaling,reach,debias", GRID)
def test_float32_matches_float64(p, blur, scaling, reach, debias):
    x, y, a, b = problem(seed=1)
    ref_v, ref_g = value_and_grads(ours(p, blur, scaling, reach, debias), x, y, a, b)
    v, g = value_and_grads(ours(p, blur, scaling, reach, debias), *(t.float() for t in (x, y, a, b)))
    # Values: a few float32 roundings of O(1) potentials. Gradients: at blur = 0.05 the x-gradient
    # a_i (x_i - Σ_j π_ij y_j / a_i) is a difference of nearby O(1) terms, amplified by the
    # ill-conditioning of sharp plans, so it carries ~1e-3 of its scale in float32.
    assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-6, name="value")
    grad_tol = 2e-3 if blur < 0.1 else 1e-4
    for name, gi, ri in zip("xyab", g, ref_g):
        assert_close(gi.double(), ri, rtol=0, atol=grad_tol * ri.abs().max().item(), name=f"gradient wrt {name}")


@needs_geomloss
@pytest.mark.parametrize("debias", [True, False])
def test_potentials_equal_geomloss(debias):
    from geomloss import SamplesLoss

    x, y, a, b = problem(seed=2)
    loss = SamplesLoss("sinkhorn", p=2, blur=0.1, debias=debias, potentials=True, backend="tensorized")
    f_ref, g_ref = loss(a, x, b, y)
    f, g = fl.sinkhorn_potentials(x, y, a=a, b=b, blur=0.1, debias=debias, backend="reference")
    assert_close(f, f_ref, rtol=1e-10, atol=1e-12, name="f")
    assert_close(g, g_ref, rtol=1e-10, atol=1e-12, name="g")


# ------------------------------------------------------------------------------------------------
# Gradients: envelope theorem
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("debias", [True, False])
def test_reference_gradcheck_when_converged(debias):
    # The gradient goes through the converged potentials only: it is the derivative of the value once
    # the loop has converged, which a blur larger than the data (fast contraction) ensures.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.rand(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x, y: fl.reference.sinkhorn(x, y, blur=5.0, p=2, scaling=0.9, debias=debias)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y), atol=1e-6, rtol=1e-4)


def test_no_grad_mode_is_respected():
    x, y, _, _ = problem(batch=None, weights=False)
    x.requires_grad_()
    with torch.no_grad():
        v = fl.sinkhorn(x, y, backend="reference")
    assert not v.requires_grad
    assert torch.is_grad_enabled()


def test_public_reference_names_are_the_solver_with_the_dense_softmin():
    x, y, a, b = problem(seed=3)
    assert torch.equal(fl.reference.sinkhorn(x, y, a, b, blur=0.2), fl.sinkhorn(x, y, a=a, b=b, blur=0.2, backend="reference"))
    for got, want in zip(fl.reference.sinkhorn_potentials(x, y, a, b, blur=0.2),
                         fl.sinkhorn_potentials(x, y, a=a, b=b, blur=0.2, backend="reference")):
        assert torch.equal(got, want)
    assert torch.equal(fl.reference.sinkhorn_projection(x, y, a, b, blur=0.2),
                       fl.sinkhorn_projection(x, y, a=a, b=b, blur=0.2, backend="reference"))


# ------------------------------------------------------------------------------------------------
# Properties of the divergence
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("blur", [0.05, 0.5])
def test_debiased_is_nonnegative_symmetric_and_zero_on_identical_clouds(p, blur):
    x, y, a, b = problem(n=20, m=20, batch=4, seed=4)
    s_xy = fl.sinkhorn(x, y, a=a, b=b, p=p, blur=blur, scaling=0.9)
    s_yx = fl.sinkhorn(y, x, a=b, b=a, p=p, blur=blur, scaling=0.9)
    assert (s_xy > 0).all()
    assert_close(s_xy, s_yx, rtol=1e-10, atol=1e-12, name="symmetry")
    s_xx = fl.sinkhorn(x, x.clone(), a=a, b=a.clone(), p=p, blur=blur)
    assert s_xx.abs().max() < 1e-12


def test_zero_weights_remove_points():
    # Padding with zero-weight points (anywhere) is how clouds of different sizes are batched.
    x, y, a, b = problem(n=9, m=11, batch=None, seed=5)
    far = torch.full((3, 3), 7.0, dtype=x.dtype)
    x_pad, a_pad = torch.cat([x, far]), torch.cat([a, a.new_zeros(3)])
    # The padding changes the diameter, hence the ε-schedule: compare with a converged schedule.
    full = fl.sinkhorn(x_pad, y, a=a_pad, b=b, blur=0.3, scaling=0.99)
    plain = fl.sinkhorn(x, y, a=a, b=b, blur=0.3, scaling=0.99)
    assert_close(full, plain, rtol=1e-6, atol=1e-9, name="padded")


@pytest.mark.skipif(not has_scipy, reason="needs scipy (pip install scipy) for the exact assignment")
def test_small_blur_tends_to_half_squared_wasserstein():
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(6)
    x = torch.rand(8, 2, generator=g, dtype=torch.float64)
    y = torch.rand(8, 2, generator=g, dtype=torch.float64) + 0.2
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost.numpy())
    w2_half = cost[rows, cols].mean().item() / 2  # uniform weights 1/8: W_2² / 2 from the optimal permutation
    errors = [abs(fl.sinkhorn(x, y, blur=blur, scaling=0.9).item() - w2_half) for blur in (0.3, 0.1, 0.01)]
    assert errors[-1] < 1e-4 * w2_half
    assert errors[0] > errors[1] > errors[2]


def test_unbalanced_tends_to_balanced_for_large_reach():
    x, y, a, b = problem(batch=None, seed=7)
    balanced = fl.sinkhorn(x, y, a=a, b=b, blur=0.2)
    loose = fl.sinkhorn(x, y, a=a, b=b, blur=0.2, reach=1e4)
    assert_close(loose, balanced, rtol=1e-3, atol=0, name="reach 1e4")


def test_projection_moves_points_onto_a_translated_copy():
    # For y = x + t with a small blur, the plan is the identity pairing: T(x_i) ≈ x_i + t.
    g = torch.Generator().manual_seed(8)
    x = torch.rand(10, 2, generator=g, dtype=torch.float64) * 4
    t = torch.tensor([0.05, -0.03], dtype=torch.float64)
    proj = fl.sinkhorn_projection(x, x + t, blur=0.01, scaling=0.9, backend="reference")
    assert_close(proj, x + t, rtol=0, atol=1e-6, name="projection")
    batched = fl.sinkhorn_projection(x[None], (x + t)[None], blur=0.01, scaling=0.9)
    assert_close(batched[0], proj, rtol=1e-12, atol=1e-12, name="batched projection")


# ------------------------------------------------------------------------------------------------
# Every soft-min backend through the public functions
# ------------------------------------------------------------------------------------------------


_REFERENCE_RESULTS: dict = {}  # float64 reference runs, shared by the backends compared on the same problem


def compare(backend, dev, x, y, a, b, value_tol, grad_tol, **kw):
    """fl.sinkhorn with ``backend`` on (x, y, a, b) against the float64 reference on the same points."""
    if backend == "reference" and dev.type == "cpu" and x.dtype == torch.float64:
        pytest.skip("the float64 reference on the CPU is the ground truth of this comparison (float32 and CUDA "
                    "runs of the reference are compared with it)")
    on = [None if t is None else t.to(dev) for t in (x, y, a, b)]
    value, grads = value_and_grads(ours_fn(backend, **kw), *on)
    assert value.dtype == x.dtype and value.device == dev and all(g.dtype == x.dtype for g in grads)
    double = [None if t is None else t.detach().cpu().double() for t in (x, y, a, b)]
    key = (tuple(None if t is None else (tuple(t.shape), t.sum().item(), t.pow(2).sum().item()) for t in double),
           tuple(sorted(kw.items())))
    if key not in _REFERENCE_RESULTS:
        _REFERENCE_RESULTS[key] = value_and_grads(ours_fn("reference", **kw), *double)
    ref_value, ref_grads = _REFERENCE_RESULTS[key]
    assert_close_to_max(value, ref_value, value_tol, "sinkhorn")
    for name, g, r in zip("xyab", grads, ref_grads):
        assert_close_to_max(g, r, grad_tol, f"grad {name}")


def skip_keops(backend, dim, p, dtype):
    keops_formula(backend, (dim, p, dtype) in KEOPS_SOFTMIN, f"the soft-min with D={dim}, p={p}, {dtype}")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
@pytest.mark.parametrize("p", [2, 1])
def test_backend_matches_reference(backend, device, dtype, value_tol, grad_tol, p):
    dev = require_backend("softmin", backend, device, dtype=dtype)
    skip_keops(backend, 3, p, dtype)
    x, y = clouds(13, 29, dtype=dtype, seed=1)
    compare(backend, dev, x, y, None, None, value_tol, grad_tol, p=p, blur=0.1)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
def test_backend_batched_zero_weights_reach(backend, device, dtype, value_tol, grad_tol):
    dev = require_backend("softmin", backend, device, dtype=dtype)
    skip_keops(backend, 3, 2, dtype)
    x, y = clouds(11, 7, 3, batch=3, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(5)
    a = torch.rand(3, 11, generator=g, dtype=torch.float64).to(dtype)
    b = torch.rand(3, 7, generator=g, dtype=torch.float64).to(dtype)
    a[1, 8:] = 0  # zero weights: how clouds of different sizes are batched
    b[2, :2] = 0
    compare(backend, dev, x, y, a, b, value_tol, grad_tol, blur=0.2, reach=0.7, scaling=0.6)


# The option grid of the old KeOps tests, at 1, 13 + 1 (batched) and 1013 + 7 points, float64: the same loop
# and potentials as the reference, only the logsumexp's summation order differs.
OPTIONS = [(2, 0.05, 0.5, None, True), (2, 0.5, 0.9, 0.5, False), (1, 0.05, 0.9, None, True), (1, 0.5, 0.5, 0.5, True)]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("p,blur,scaling,reach,debias", OPTIONS)
@pytest.mark.parametrize("n,m,batch", [(13, 1, 2), (1, 1, None), (1013, 7, None)])
def test_backend_options_and_edge_sizes_float64(backend, device, p, blur, scaling, reach, debias, n, m, batch):
    dev = require_backend("softmin", backend, device)
    skip_if_interpreted(backend, device, max(n, m))
    x, y, a, b = problem(n, m, 3, batch, seed=n)
    _, value_tol, grad_tol = DTYPES[1].values
    compare(backend, dev, x, y, a, b, value_tol, grad_tol, p=p, blur=blur, scaling=scaling, reach=reach, debias=debias)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
def test_backend_p1_no_debias_and_one_dimension(backend, device, dtype, value_tol, grad_tol):
    dev = require_backend("softmin", backend, device, dtype=dtype)
    skip_keops(backend, 3, 1, dtype)
    x, y = clouds(40, 3, batch=2, dtype=dtype, seed=7)  # 40 rows: a full GPU tile plus a padded one
    compare(backend, dev, x, y, None, None, value_tol, grad_tol, p=1, blur=0.1, reach=2.0, debias=False)
    keops_formula(backend, False, "the soft-min with D=1")
    x1, y1 = clouds(1, 5, dim=1, dtype=dtype, seed=8)  # N = 1, D = 1
    compare(backend, dev, x1, y1, None, None, value_tol, grad_tol, p=2, blur=0.1)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("blur,reach", [(0.1, None), (0.5, 0.5)])
def test_backend_float32_hundreds_of_points(backend, device, blur, reach):
    dev = require_backend("softmin", backend, device, dtype=torch.float32)
    skip_if_interpreted(backend, device, 301)
    x, y, a, b = problem(301, 157, 3, 2, torch.float32, seed=3)
    _, value_tol, grad_tol = DTYPES[0].values
    compare(backend, dev, x, y, a, b, value_tol, grad_tol, blur=blur, reach=reach)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("p", [2, 1])
def test_backend_float32_far_from_the_origin(backend, device, p):
    """Clouds at 1e3 from the origin in float32: the |x|² + |y|² - 2 x·y expansion would lose every digit of
    O(1) distances (checked, so this test can fail); from differences, the tolerances near the origin hold."""
    dev = require_backend("softmin", backend, device, dtype=torch.float32)
    skip_keops(backend, 3, p, torch.float32)
    x, y = clouds(17, 23, dtype=torch.float32, seed=6, offset=1e3)
    expansion = (x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :] - 2 * x @ y.T
    exact = (x.double()[:, None] - y.double()[None]).pow(2).sum(-1)
    assert (expansion.double() - exact).abs().max() > 1e-2  # the trap is real at this offset
    _, value_tol, grad_tol = DTYPES[0].values
    compare(backend, dev, x, y, None, None, value_tol, grad_tol, p=p, blur=0.1)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("debias", [True, False])
def test_backend_potentials_match_reference(backend, device, debias):
    dev = require_backend("softmin", backend, device)
    x, y, a, b = problem(9, 14, batch=None, seed=4)
    f, g = fl.sinkhorn_potentials(x.to(dev), y.to(dev), a=a.to(dev), b=b.to(dev), blur=0.1, debias=debias,
                                  backend=backend)
    rf, rg = fl.sinkhorn_potentials(x, y, a=a, b=b, blur=0.1, debias=debias, backend="reference")
    assert f.shape == (9,) and g.shape == (14,)
    # float64, same loop and arithmetic up to summation order: ~1e-15 measured, 1e-10 margin
    assert_close(f.cpu(), rf, rtol=1e-10, atol=1e-12, name="f")
    assert_close(g.cpu(), rg, rtol=1e-10, atol=1e-12, name="g")


# Projection: T depends on the potentials through exp(g / eps), so rounding of g (~ulp · |g|) is amplified by
# 1/eps: at blur = 0.3 (eps = 0.09, p = 2) the float32 *reference* is itself off by 4.6e-5 of the max
# from float64, the Triton path by 1.2e-4 (measured); hence 5e-4 for float32. float64: measured 2.4e-13.
PROJECTION_DTYPES = [pytest.param(torch.float32, 5e-4, id="float32"), pytest.param(torch.float64, 1e-11, id="float64")]


@pytest.mark.parametrize("backend,device", backend_cases("projection"))
@pytest.mark.parametrize("dtype,tol", PROJECTION_DTYPES)
@pytest.mark.parametrize("p", [2, 1])
def test_backend_projection_matches_reference(backend, device, dtype, tol, p):
    dev = require_backend("projection", backend, device, dtype=dtype)
    keops_formula(backend, (p, dtype) == (2, torch.float64), f"the projection with p={p}, {dtype}")
    x, y = clouds(13, 17, batch=2, dtype=dtype, seed=15)
    b = torch.rand(2, 17, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    kw = dict(blur=0.3, p=p, reach=2.0 if p == 1 else None)
    xx, yy = x.to(dev).requires_grad_(), y.to(dev).requires_grad_()
    t = fl.sinkhorn_projection(xx, yy, b=b.to(dev, dtype), backend=backend, **kw)
    xr, yr = x.double().requires_grad_(), y.double().requires_grad_()
    want = fl.sinkhorn_projection(xr, yr, b=b, backend="reference", **kw)
    assert t.shape == x.shape and t.dtype == dtype
    assert_close_to_max(t, want, tol, "T")
    keops_formula(backend, False, "the projection's gradients (three formulas)")
    v = torch.linspace(-1, 1, t.numel(), dtype=torch.float64).view(t.shape)
    grads = torch.autograd.grad((t * v.to(dev, dtype)).sum(), (xx, yy))
    want_grads = torch.autograd.grad((want * v).sum(), (xr, yr))
    for name, g, w in zip(("x", "y"), grads, want_grads):
        assert_close_to_max(g, w, tol, f"grad {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[1] == "cuda"])
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
@pytest.mark.parametrize("p", [2, 1])
def test_gpu_sizes(backend, device, dtype, value_tol, grad_tol, p):
    dev = require_backend("softmin", backend, device, dtype=dtype)
    skip_keops(backend, 3, p, dtype)
    x, y = clouds(1500, 2001, dtype=dtype, batch=2, seed=13)
    compare(backend, dev, x, y, None, None, value_tol, grad_tol, p=p, blur=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[1] == "cuda"])
def test_gpu_float32_far_from_the_origin_large(backend, device):
    """3000 x 2500 float32 points at 1e3 from the origin against float64: the target agreement (1e-4)."""
    dev = require_backend("softmin", backend, device, dtype=torch.float32)
    x, y = clouds(3000, 2500, dtype=torch.float32, device=dev, seed=14, offset=1e3)
    value = fl.sinkhorn(x, y, blur=0.05, backend=backend).double()
    want = fl.sinkhorn(x.double(), y.double(), blur=0.05, backend="reference")
    assert_close(value, want, rtol=1e-4, atol=1e-6, name="sinkhorn offset (GPU)")


# ------------------------------------------------------------------------------------------------
# Schedule and argument checks
# ------------------------------------------------------------------------------------------------


def test_epsilon_schedule_conventions():
    eps = sinkhorn_solver.epsilon_schedule(2, 4.0, 0.05, 0.5)
    assert eps[0] == pytest.approx(16.0) and eps[-1] == pytest.approx(0.0025)
    ratios = [b / a for a, b in zip(eps[1:-2], eps[2:-1])]
    assert all(r == pytest.approx(0.25) for r in ratios)  # scaling^p per step
    assert len(eps) == 2 + 7  # exp of arange(2 log 4, 2 log 0.05, 2 log 0.5): 7 steps, plus both ends
    assert sinkhorn_solver.epsilon_schedule(1, 0.0, 0.1, 0.5) == pytest.approx([0.1, 0.1])  # all points at one place


def test_diameter_spans_every_batch_item():
    x = torch.zeros(2, 3, 2, dtype=torch.float64)
    y = torch.zeros(2, 4, 2, dtype=torch.float64)
    x[0, 0] = torch.tensor([-1.0, 0.0])
    y[1, 2] = torch.tensor([2.0, 4.0])
    assert sinkhorn_solver.max_diameter(x, y) == pytest.approx(5.0)  # box [-1, 2] x [0, 4]


def test_bad_sinkhorn_arguments():
    x, y, a, b = problem(batch=None)
    for kwargs, exc, msg in [
        ({"p": 3}, ValueError, "p must be one of"),
        ({"blur": 0.0}, ValueError, "blur must be positive"),
        ({"blur": "1"}, TypeError, "blur must be a positive number"),
        ({"scaling": 1.0}, ValueError, r"scaling must lie in \(0, 1\)"),
        ({"reach": -1.0}, ValueError, "reach must be positive"),
        ({"debias": 1}, TypeError, "debias must be True or False"),
        ({"a": a[:-1]}, ValueError, "a must have shape"),
        ({"b": -b}, ValueError, "b must be finite and non-negative"),
        ({"a": torch.zeros_like(a)}, ValueError, "positive total mass"),
        ({"a": a.float()}, TypeError, "dtype and device"),
    ]:
        with pytest.raises(exc, match=msg):
            fl.sinkhorn(x, y, **kwargs)
    with pytest.raises(ValueError, match="p must be one of"):
        fl.sinkhorn_projection(x, y, p=3)
    with pytest.raises(TypeError, match="debias"):
        fl.sinkhorn_potentials(x, y, debias="yes")
