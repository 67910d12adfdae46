"""The projection op (fastlddmm/ops/projection): T_i = Σ_j softmax_j(h_j - C(x_i, y_j) / eps) v_j, the
reduction of the Sinkhorn barycentric projection. The reference twin against a hand-written loop, then the
contract (``softmax_weighted_sum``, differentiable in x, h and v) for every backend of the dispatch table,
and the Triton kernels' tile loops. (fl.sinkhorn_projection over the backends: tests/test_sinkhorn.py.)

KeOps formulas compiled by this file (conftest.keops_formula): the value for D = 3, p = 2, float64 (the one
fl.sinkhorn_projection(backend="keops") compiles). Its gradients are three more formulas (~45 s with g++
on 2 cores, measured): run them with FASTLDDMM_TEST_KEOPS_ALL=1.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlddmm as fl
from fastlddmm import dispatch

from conftest import assert_close_to_max, backend_cases, clouds, keops_formula, require_backend, skip_if_interpreted

CASES = backend_cases("projection")

# (dtype, value tolerance, gradient tolerance), relative to the largest entry of the float64 reference on the
# same points: one reduction, no loop to amplify rounding; float32 measured <= 1.2e-6 for the streaming
# kernels, so 1e-6 / 5e-6 (~10-40 ulps); float64 a few hundred ulps.
DTYPES = [pytest.param(torch.float32, 1e-6, 5e-6, id="float32"),
          pytest.param(torch.float64, 1e-13, 1e-12, id="float64")]


def weighted_sum(backend):
    return dispatch.load("projection", backend).softmax_weighted_sum


def problem(batch, n, m, dim, dtype, device, seed):
    x, y = clouds(n, m, dim, batch=batch, dtype=dtype, device=device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    h = (torch.randn(batch, m, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    v = torch.randn(batch, m, dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    go = torch.randn(batch, n, dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return x, y, h, v, go


def test_reference_matches_hand_written_loop():
    x, y = clouds(3, 4, 2, batch=1, seed=5)
    h = torch.tensor([[0.3, -1.0, 2.0, 0.0]], dtype=torch.float64)
    v = torch.arange(8, dtype=torch.float64).view(1, 4, 2)
    for p in (1, 2):
        got = fl.reference.softmax_weighted_sum(0.7, x, y, h, v, p)[0]
        for i, xi in enumerate(x[0].tolist()):
            w = [math.exp(hj - math.dist(xi, yj) ** p / p / 0.7) for hj, yj in zip(h[0].tolist(), y[0].tolist())]
            for d in range(2):
                want = sum(wj * vj[d] for wj, vj in zip(w, v[0].tolist())) / sum(w)
                assert got[i, d].item() == pytest.approx(want, rel=1e-13)


SIZES = [(2, 1, 1, 3), (2, 7, 5, 2), (1, 13, 29, 3), (2, 29, 13, 3), (1, 1013, 7, 3), (1, 7, 1013, 3)]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("batch,n,m,dim", SIZES, ids=[f"B{b}-{n}x{m}-D{d}" for b, n, m, d in SIZES])
def test_projection_values_and_gradients(backend, device, dtype, value_tol, grad_tol, p, batch, n, m, dim):
    dev = require_backend("projection", backend, device, dtype=dtype, dim=dim)
    skip_if_interpreted(backend, device, max(n, m))
    keops_formula(backend, (dim, p, dtype) == (3, 2, torch.float64), f"the projection with D={dim}, p={p}, {dtype}")
    x, y, h, v, go = problem(batch, n, m, dim, dtype, dev, seed=n + m)
    eps = 0.2
    leaves = [t.clone().requires_grad_() for t in (x, h, v)]
    t = weighted_sum(backend)(eps, leaves[0], y, leaves[1], leaves[2], p)
    assert t.shape == (batch, n, dim) and t.dtype == dtype and t.device == x.device
    leaves64 = [t_.detach().double().requires_grad_() for t_ in leaves]
    want = fl.reference.softmax_weighted_sum(eps, leaves64[0], y.double(), leaves64[1], leaves64[2], p)
    assert_close_to_max(t, want, value_tol, "T")
    keops_formula(backend, False, "the projection's gradients in x, h and v (three formulas)")
    grads = torch.autograd.grad((t * go).sum(), leaves)
    want_grads = torch.autograd.grad((want * go.double()).sum(), leaves64)
    for name, g, w in zip(("x", "h", "v"), grads, want_grads):
        assert g.dtype == dtype
        assert_close_to_max(g, w, grad_tol, f"grad {name}")


@pytest.mark.parametrize("backend,device", CASES)
def test_projection_gradcheck_float64(backend, device):
    dev = require_backend("projection", backend, device)
    keops_formula(backend, False, "the projection's gradients in x, h and v (three formulas)")
    x, y, h, v, _ = problem(1, 4, 5, 3, torch.float64, dev, seed=7)
    inputs = tuple(t.requires_grad_() for t in (x, h, v))
    assert torch.autograd.gradcheck(lambda a, b, c: weighted_sum(backend)(0.5, a, y, b, c, 2), inputs)


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] == "triton"])
def test_triton_cost_side_is_not_differentiated(backend, device):
    """The contract passes y detached; the Triton function says so rather than return a wrong gradient."""
    dev = require_backend("projection", backend, device)
    x, y, h, v, _ = problem(1, 4, 5, 3, torch.float64, dev, seed=8)
    t = weighted_sum(backend)(0.5, x, y.requires_grad_(), h, v.requires_grad_(), 2)
    with pytest.raises(NotImplementedError, match="not differentiated"):
        torch.autograd.grad(t.sum(), (y,))


@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[0] == "triton"])
@pytest.mark.parametrize("dtype,value_tol,grad_tol", DTYPES)
@pytest.mark.parametrize("p", [2, 1])
def test_triton_kernels_tiles(backend, device, dtype, value_tol, grad_tol, p):
    """weighted_sum and its backward with tiles of 4 x 8: several column tiles, padded rows and columns."""
    dev = require_backend("projection", backend, device, dtype=dtype)
    from fastlddmm.kernels import softmin as kernels

    n, m = 13, 29
    x, y, h, v, go = problem(2, n, m, 3, dtype, dev, seed=17)
    eps, tiles = 0.2, dict(block_n=4, block_m=8)
    x_, h_, v_ = (t.double().requires_grad_() for t in (x, h, v))
    want = fl.reference.softmax_weighted_sum(eps, x_, y.double(), h_, v_, p)
    lse = kernels.forward(x, y, h, eps, p, **tiles)
    out = kernels.weighted_sum(x, y, h, v, lse, eps, p, **tiles)
    assert_close_to_max(out, want, value_tol, "weighted sum")
    want_gx, want_gh, want_gv = torch.autograd.grad((want * go.double()).sum(), (x_, h_, v_))
    gx, gv, gh = kernels.weighted_sum_backward(x, y, h, v, lse, out, go, eps, p, **tiles)
    assert_close_to_max(gx, want_gx, grad_tol, "grad x")
    assert_close_to_max(gv, want_gv, grad_tol, "grad v")
    assert_close_to_max(gh, want_gh, grad_tol, "grad h")
    # only what is asked for is computed
    gx_only, gv_none, gh_none = kernels.weighted_sum_backward(x, y, h, v, lse, out, go, eps, p, need_vh=False, **tiles)
    assert gv_none is None and gh_none is None
    assert_close_to_max(gx_only, want_gx, grad_tol, "grad x alone")
