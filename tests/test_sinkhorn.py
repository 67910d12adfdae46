"""fl.sinkhorn reference: GeomLoss-exact values and gradients, float32 accuracy, envelope-theorem
gradients, and the properties of the (debiased) Sinkhorn divergence. (KeOps: tests/test_keops.py.)"""

from __future__ import annotations

import importlib
import importlib.util
import itertools

import pytest
import torch

from fastlddmm import distances as D
from fastlddmm.reference import sinkhorn as reference_sinkhorn_fn  # the function (package attribute)

RS = importlib.import_module("fastlddmm.reference.sinkhorn")  # the module
has_geomloss = importlib.util.find_spec("geomloss") is not None
has_scipy = importlib.util.find_spec("scipy") is not None
needs_geomloss = pytest.mark.skipif(not has_geomloss, reason="needs geomloss (pip install 'fastlddmm[test]')")

GRID = list(itertools.product((1, 2), (0.05, 0.5), (0.5, 0.9), (None, 0.5), (True, False)))


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
    v = torch.linspace(1.0, 2.0, out.numel(), dtype=out.dtype).view(out.shape)  # weights distinct per item
    grads = torch.autograd.grad((out * v).sum(), [t for t in ins if t is not None])
    return out.detach(), grads


def geomloss_fn(p, blur, scaling, reach, debias):
    from geomloss import SamplesLoss

    loss = SamplesLoss("sinkhorn", p=p, blur=blur, scaling=scaling, reach=reach, debias=debias, backend="tensorized")
    return lambda x, y, a, b: loss(x, y) if a is None else loss(a, x, b, y)


def ours_fn(p, blur, scaling, reach, debias, backend="reference"):
    return lambda x, y, a, b: D.sinkhorn(x, y, a=a, b=b, blur=blur, p=p, scaling=scaling, reach=reach, debias=debias, backend=backend)


# ------------------------------------------------------------------------------------------------
# GeomLoss equality
# ------------------------------------------------------------------------------------------------


@needs_geomloss
@pytest.mark.parametrize("p,blur,scaling,reach,debias", GRID)
def test_float64_equals_geomloss_batched_weighted(p, blur, scaling, reach, debias):
    # Same algorithm, same float64 arithmetic up to summation order: agreement to ~1e-14, checked at 1e-10.
    x, y, a, b = problem()
    ref_v, ref_g = value_and_grads(geomloss_fn(p, blur, scaling, reach, debias), x, y, a, b)
    v, g = value_and_grads(ours_fn(p, blur, scaling, reach, debias), x, y, a, b)
    torch.testing.assert_close(v, ref_v, rtol=1e-10, atol=1e-12)
    for name, gi, ri in zip("xyab", g, ref_g):
        torch.testing.assert_close(gi, ri, rtol=1e-10, atol=1e-12, msg=lambda m: f"gradient wrt {name}: {m}")


@needs_geomloss
@pytest.mark.parametrize("p,reach,debias", [(2, None, True), (1, None, True), (2, 0.5, False), (1, 0.5, True)])
@pytest.mark.parametrize("n,m", [(1, 7), (7, 1), (31, 29)])
def test_float64_equals_geomloss_single_uniform(p, reach, debias, n, m):
    x, y, _, _ = problem(n, m, dim=2, batch=None, seed=n * m, weights=False)
    ref_v, ref_g = value_and_grads(geomloss_fn(p, 0.1, 0.7, reach, debias), x, y, None, None)
    v, g = value_and_grads(ours_fn(p, 0.1, 0.7, reach, debias), x, y, None, None)
    assert v.shape == ()
    torch.testing.assert_close(v, ref_v, rtol=1e-10, atol=1e-12)
    for gi, ri in zip(g, ref_g):
        torch.testing.assert_close(gi, ri, rtol=1e-10, atol=1e-12)


@needs_geomloss
@pytest.mark.parametrize("p,blur,scaling,reach,debias", [(2, 0.5, 0.5, None, True), (2, 0.05, 0.9, 0.5, False), (1, 0.5, 0.9, 0.5, False)])
def test_float32_equals_geomloss(p, blur, scaling, reach, debias):
    # Smooth cases (p = 2, or p = 1 without the xx/yy problems whose zero diagonal GeomLoss computes from the
    # |x|² + |y|² - 2x·y expansion, i.e. from float32 rounding noise): both sides within float32 rounding.
    x, y, a, b = problem(dtype=torch.float32)
    ref_v, ref_g = value_and_grads(geomloss_fn(p, blur, scaling, reach, debias), x, y, a, b)
    v, g = value_and_grads(ours_fn(p, blur, scaling, reach, debias), x, y, a, b)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-6)
    for gi, ri in zip(g, ref_g):
        torch.testing.assert_close(gi, ri, rtol=1e-4, atol=1e-5 * ri.abs().max().item())


@pytest.mark.parametrize("p,blur,scaling,reach,debias", GRID)
def test_float32_matches_float64(p, blur, scaling, reach, debias):
    x, y, a, b = problem(seed=1)
    ref_v, ref_g = value_and_grads(ours_fn(p, blur, scaling, reach, debias), x, y, a, b)
    v, g = value_and_grads(ours_fn(p, blur, scaling, reach, debias), *(t.float() for t in (x, y, a, b)))
    # Values: a few float32 roundings of O(1) potentials. Gradients: at blur = 0.05 the x-gradient
    # a_i (x_i - Σ_j π_ij y_j / a_i) is a difference of nearby O(1) terms, amplified by the
    # ill-conditioning of sharp plans, so it carries ~1e-3 of its scale in float32.
    torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-6)
    grad_tol = 2e-3 if blur < 0.1 else 1e-4
    for gi, ri in zip(g, ref_g):
        torch.testing.assert_close(gi.double(), ri, rtol=0, atol=grad_tol * ri.abs().max().item())


@needs_geomloss
@pytest.mark.parametrize("debias", [True, False])
def test_potentials_equal_geomloss(debias):
    from geomloss import SamplesLoss

    x, y, a, b = problem(seed=2)
    loss = SamplesLoss("sinkhorn", p=2, blur=0.1, debias=debias, potentials=True, backend="tensorized")
    f_ref, g_ref = loss(a, x, b, y)
    f, g = D.sinkhorn_potentials(x, y, a=a, b=b, blur=0.1, debias=debias, backend="reference")
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


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
    fn = lambda x, y: reference_sinkhorn_fn(x, y, blur=5.0, p=2, scaling=0.9, debias=debias)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, y), atol=1e-6, rtol=1e-4)


def test_no_grad_mode_is_respected():
    x, y, _, _ = problem(batch=None, weights=False)
    x.requires_grad_()
    with torch.no_grad():
        v = D.sinkhorn(x, y, backend="reference")
    assert not v.requires_grad
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------------------------------------
# Properties of the divergence
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("blur", [0.05, 0.5])
def test_debiased_is_nonnegative_symmetric_and_zero_on_identical_clouds(p, blur):
    x, y, a, b = problem(n=20, m=20, batch=4, seed=4)
    s_xy = D.sinkhorn(x, y, a=a, b=b, p=p, blur=blur, scaling=0.9)
    s_yx = D.sinkhorn(y, x, a=b, b=a, p=p, blur=blur, scaling=0.9)
    assert (s_xy > 0).all()
    torch.testing.assert_close(s_xy, s_yx, rtol=1e-10, atol=1e-12)
    s_xx = D.sinkhorn(x, x.clone(), a=a, b=a.clone(), p=p, blur=blur)
    assert s_xx.abs().max() < 1e-12


def test_zero_weights_remove_points():
    # Padding with zero-weight points (anywhere) is how clouds of different sizes are batched.
    x, y, a, b = problem(n=9, m=11, batch=None, seed=5)
    far = torch.full((3, 3), 7.0, dtype=x.dtype)
    x_pad, a_pad = torch.cat([x, far]), torch.cat([a, a.new_zeros(3)])
    # The padding changes the diameter, hence the ε-schedule: compare with a converged schedule.
    full = D.sinkhorn(x_pad, y, a=a_pad, b=b, blur=0.3, scaling=0.99)
    plain = D.sinkhorn(x, y, a=a, b=b, blur=0.3, scaling=0.99)
    torch.testing.assert_close(full, plain, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not has_scipy, reason="needs scipy (pip install scipy) for the exact assignment")
def test_small_blur_tends_to_half_squared_wasserstein():
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(6)
    x = torch.rand(8, 2, generator=g, dtype=torch.float64)
    y = torch.rand(8, 2, generator=g, dtype=torch.float64) + 0.2
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost.numpy())
    w2_half = cost[rows, cols].mean().item() / 2  # uniform weights 1/8: W_2² / 2 from the optimal permutation
    errors = [abs(D.sinkhorn(x, y, blur=blur, scaling=0.9).item() - w2_half) for blur in (0.3, 0.1, 0.01)]
    assert errors[-1] < 1e-4 * w2_half
    assert errors[0] > errors[1] > errors[2]


def test_unbalanced_tends_to_balanced_for_large_reach():
    x, y, a, b = problem(batch=None, seed=7)
    balanced = D.sinkhorn(x, y, a=a, b=b, blur=0.2)
    loose = D.sinkhorn(x, y, a=a, b=b, blur=0.2, reach=1e4)
    torch.testing.assert_close(loose, balanced, rtol=1e-3, atol=0)


def test_projection_moves_points_onto_a_translated_copy():
    # For y = x + t with a small blur, the plan is the identity pairing: T(x_i) ≈ x_i + t.
    g = torch.Generator().manual_seed(8)
    x = torch.rand(10, 2, generator=g, dtype=torch.float64) * 4
    t = torch.tensor([0.05, -0.03], dtype=torch.float64)
    proj = D.sinkhorn_projection(x, x + t, blur=0.01, scaling=0.9, backend="reference")
    torch.testing.assert_close(proj, x + t, rtol=0, atol=1e-6)
    batched = D.sinkhorn_projection(x[None], (x + t)[None], blur=0.01, scaling=0.9)
    torch.testing.assert_close(batched[0], proj)


# ------------------------------------------------------------------------------------------------
# Schedule and argument checks
# ------------------------------------------------------------------------------------------------


def test_epsilon_schedule_conventions():
    eps = RS.epsilon_schedule(2, 4.0, 0.05, 0.5)
    assert eps[0] == pytest.approx(16.0) and eps[-1] == pytest.approx(0.0025)
    ratios = [b / a for a, b in zip(eps[1:-2], eps[2:-1])]
    assert all(r == pytest.approx(0.25) for r in ratios)  # scaling^p per step
    assert len(eps) == 2 + 7  # exp of arange(2 log 4, 2 log 0.05, 2 log 0.5): 7 steps, plus both ends
    assert RS.epsilon_schedule(1, 0.0, 0.1, 0.5) == pytest.approx([0.1, 0.1])  # all points at one place


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
            D.sinkhorn(x, y, **kwargs)
