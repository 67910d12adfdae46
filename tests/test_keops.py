"""KeOps backends of fl.nearest / fl.chamfer / fl.sinkhorn against the dense reference.

KeOps compiles one C++ module per formula, dimension D and dtype on first use (~10-30 s each on
2 cores, then cached on disk), so these tests share a few shapes on purpose: ArgMin in D = 3
(float32, float64) and D = 2 (float64); Sinkhorn logsumexp + its gradient for p = 2 (float32,
float64) and p = 1 (float64); the barycentric projection for p = 2 (float64).
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

from fastlddmm import _backend
from fastlddmm import distances as D
from fastlddmm.reference import distances as R

pytestmark = pytest.mark.skipif(
    not _backend.status("keops").available,
    reason="needs pykeops and a C++ compiler: pip install 'fastlddmm[keops]'",
)

# (dtype, rtol, atol) for nearest / Chamfer: KeOps only picks the index; the distance is recomputed with
# the reference's formula, so values agree to the rounding of a D-term sum (float32 ~1e-7 relative).
DTYPES = [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-12, 1e-13)]


def clouds(n, m, dim=3, batch=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    x = torch.randn(*shape, n, dim, generator=g, dtype=dtype)
    y = torch.randn(*shape, m, dim, generator=g, dtype=dtype) * 0.8 + 0.3
    return x, y


# ------------------------------------------------------------------------------------------------
# Nearest neighbour and Chamfer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,m,dim,dtype,rtol,atol",
    [(n, m, 3, *dt) for (n, m) in [(1, 7), (7, 1), (1013, 7), (7, 1013)] for dt in DTYPES]
    + [(1013, 1, 2, *DTYPES[1]), (1, 1013, 2, *DTYPES[1]), (7, 7, 2, *DTYPES[1]), (1, 1, 3, *DTYPES[1])],
)
def test_nearest_matches_reference(n, m, dim, dtype, rtol, atol):
    x, y = clouds(n, m, dim, dtype=dtype, seed=n + 3 * m)
    x.requires_grad_()
    y.requires_grad_()
    sq, idx = D.nearest(x, y, backend="keops")
    ref_sq, ref_idx = R.nearest(x, y)
    assert idx.dtype == torch.int64 and idx.shape == (n,) and not idx.requires_grad
    torch.testing.assert_close(sq, ref_sq, rtol=rtol, atol=atol)
    # random clouds: ties only up to rounding, so indices agree almost everywhere
    assert (idx == ref_idx).float().mean() > 0.99
    v = torch.randn(n, dtype=dtype)
    for g, r in zip(torch.autograd.grad((sq * v).sum(), (x, y)), torch.autograd.grad((ref_sq * v).sum(), (x, y))):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_batched_nearest_matches_reference(dtype, rtol, atol):
    x, y = clouds(101, 53, 3, batch=3, dtype=dtype, seed=1)
    sq, idx = D.nearest(x, y, backend="keops")
    ref_sq, _ = R.nearest(x, y)
    assert sq.shape == idx.shape == (3, 101)
    torch.testing.assert_close(sq, ref_sq, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("lengths", [False, True])
def test_chamfer_matches_reference(dtype, rtol, atol, lengths):
    x, y = clouds(1013, 7, 3, batch=3, dtype=dtype, seed=2)
    xl, yl = (torch.tensor([1013, 1, 500]), torch.tensor([7, 7, 1])) if lengths else (None, None)
    xk, yk = x.clone().requires_grad_(), y.clone().requires_grad_()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = D.chamfer(xk, yk, x_lengths=xl, y_lengths=yl, backend="keops")
    ref = D.chamfer(xr, yr, x_lengths=xl, y_lengths=yl, backend="reference")
    assert got.shape == (3,)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    v = torch.tensor([0.3, -1.0, 2.0], dtype=dtype)
    for g, r in zip(torch.autograd.grad((got * v).sum(), (xk, yk)), torch.autograd.grad((ref * v).sum(), (xr, yr))):
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)
    single = D.chamfer(x[0], y[0], backend="keops")
    assert single.shape == ()
    torch.testing.assert_close(single, R.chamfer(x[0], y[0]), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------
# Sinkhorn
# ------------------------------------------------------------------------------------------------


def sinkhorn_problem(n, m, batch, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    x = torch.randn(*shape, n, 3, generator=g, dtype=dtype)
    y = torch.randn(*shape, m, 3, generator=g, dtype=dtype) * 0.8 + 0.5
    a = torch.rand(*shape, n, generator=g, dtype=dtype) + 0.1
    b = torch.rand(*shape, m, generator=g, dtype=dtype) + 0.1
    return x, y, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def run_sinkhorn(backend, x, y, a, b, **kw):
    ins = [t.clone().requires_grad_() for t in (x, y, a, b)]
    out = D.sinkhorn(ins[0], ins[1], a=ins[2], b=ins[3], backend=backend, **kw)
    v = torch.linspace(1.0, 2.0, out.numel(), dtype=out.dtype).view(out.shape)
    return out.detach(), torch.autograd.grad((out * v).sum(), ins)


@pytest.mark.parametrize(
    "p,blur,scaling,reach,debias",
    [(2, 0.05, 0.5, None, True), (2, 0.5, 0.9, 0.5, False), (1, 0.05, 0.9, None, True), (1, 0.5, 0.5, 0.5, True)],
)
@pytest.mark.parametrize("n,m,batch", [(13, 1, 2), (1, 1, None), (1013, 7, None)])
def test_sinkhorn_float64_matches_reference(p, blur, scaling, reach, debias, n, m, batch):
    # Same loop, same potentials; only the summation order of the logsumexp differs: ~1e-15 relative.
    x, y, a, b = sinkhorn_problem(n, m, batch, torch.float64, seed=n)
    kw = dict(p=p, blur=blur, scaling=scaling, reach=reach, debias=debias)
    ref_v, ref_g = run_sinkhorn("reference", x, y, a, b, **kw)
    v, g = run_sinkhorn("keops", x, y, a, b, **kw)
    torch.testing.assert_close(v, ref_v, rtol=1e-10, atol=1e-12)
    for name, gi, ri in zip("xyab", g, ref_g):
        torch.testing.assert_close(gi, ri, rtol=1e-9, atol=1e-11, msg=lambda msg: f"gradient wrt {name}: {msg}")


@pytest.mark.parametrize("blur,reach", [(0.1, None), (0.5, 0.5)])
def test_sinkhorn_float32_matches_reference(blur, reach):
    # KeOps and torch round float32 logsumexps differently (~1e-7 relative per step); values keep that
    # accuracy, gradients lose up to ~1e-4 of their scale at small blur (differences of O(1) terms).
    x, y, a, b = sinkhorn_problem(301, 157, 2, torch.float32, seed=3)
    ref_v, ref_g = run_sinkhorn("reference", x, y, a, b, blur=blur, reach=reach)
    v, g = run_sinkhorn("keops", x, y, a, b, blur=blur, reach=reach)
    torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-6)
    for gi, ri in zip(g, ref_g):
        torch.testing.assert_close(gi, ri, rtol=0, atol=1e-4 * ri.abs().max().item())


def test_sinkhorn_potentials_and_projection_match_reference():
    x, y, a, b = sinkhorn_problem(57, 31, 2, torch.float64, seed=4)
    f, g = D.sinkhorn_potentials(x, y, a=a, b=b, blur=0.1, backend="keops")
    f_ref, g_ref = D.sinkhorn_potentials(x, y, a=a, b=b, blur=0.1, backend="reference")
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    t = D.sinkhorn_projection(x, y, a=a, b=b, blur=0.1, backend="keops")
    t_ref = D.sinkhorn_projection(x, y, a=a, b=b, blur=0.1, backend="reference")
    assert t.shape == x.shape
    torch.testing.assert_close(t, t_ref, rtol=1e-10, atol=1e-12)


def test_auto_uses_keops_for_large_sinkhorn(monkeypatch):
    monkeypatch.setattr(D, "_SINKHORN_DENSE_MAX_PAIRS", 100)
    x, y, a, b = sinkhorn_problem(11, 13, None, torch.float64, seed=5)
    assert D._sinkhorn_solver("auto", x, y, "sinkhorn") is importlib.import_module("fastlddmm.keops.sinkhorn")
    torch.testing.assert_close(D.sinkhorn(x, y, a=a, b=b), D.sinkhorn(x, y, a=a, b=b, backend="reference"), rtol=1e-10, atol=1e-12)


def test_first_use_is_announced_once():
    from fastlddmm.keops import _lazy

    _lazy.lazy_tensor.cache_clear()
    x, y = clouds(7, 5, 3)
    with pytest.warns(_lazy.KeOpsCompilationWarning, match="get_build_folder|cache"):
        D.nearest(x, y, backend="keops")
    with warnings.catch_warnings():
        warnings.simplefilter("error", _lazy.KeOpsCompilationWarning)
        D.nearest(x, y, backend="keops")
