"""Triton backends of fl.nearest / fl.chamfer / fl.sinkhorn (kernels/nearest.py, kernels/softmin.py)
against the dense reference: values and gradients, float32 / float64, odd sizes, batched, weights,
reach, offset clouds.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported): tiny sizes (N, M <= 40), and forced small tiles (block_n / block_m) so the
streaming loops, the running max and the padded lanes are all exercised. With a GPU the same tests
run compiled on CUDA tensors, and the @pytest.mark.gpu ones add larger sizes.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastlddmm as fl
from fastlddmm import _backend
from fastlddmm import distances as D
from fastlddmm.reference import distances as R

from conftest import assert_close, backend_device

RS = importlib.import_module("fastlddmm.reference.sinkhorn")

pytestmark = pytest.mark.skipif(
    not _backend.status("triton").available,
    reason=f"backend 'triton' unavailable: {_backend.status('triton').reason}",
)

DEV = backend_device("triton")

needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: run `pytest -m gpu` on a machine with one"
)

# (dtype, value tolerance, gradient tolerance) for the soft-min and Sinkhorn, both relative to the largest
# entry of the reference, which is always computed in float64 (on the float32-rounded points for float32
# runs, so only the kernels' arithmetic is measured). float32: values ~16 ulps (measured <= 6.5e-8);
# gradients 5e-5, as the float32 reference itself (measured 1.4e-5 for both: the loop's last step
# differences potentials of size ~1 into gradients of size ~0.1). float64: a few hundred ulps.
SINKHORN_DTYPES = [(torch.float32, 2e-6, 5e-5), (torch.float64, 1e-13, 1e-12)]
# One soft-min alone (no loop to amplify rounding): float32 values and gradients measured <= 1.2e-6
# relative to the largest entry, so 1e-6 / 5e-6 (~10-40 ulps); float64 as above.
SOFTMIN_DTYPES = [(torch.float32, 1e-6, 5e-6), (torch.float64, 1e-13, 1e-12)]


def close_to_max(actual, expected, tol, name):
    """|actual - expected| <= tol · (|expected| + max |expected|), elementwise, in float64."""
    expected = expected.detach().double()
    assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * float(expected.abs().max()), name=name)
# Nearest / Chamfer: Triton only picks the index, the distance is recomputed with the reference's formula;
# only the gradient to y differs: its O(1) terms (one per x_i sent to y_j) are summed in another order
# (index backward vs dense), so a few float32 ulps of the terms' size in absolute error.
NEAREST_DTYPES = [(torch.float32, 1e-5, 5e-6), (torch.float64, 1e-12, 1e-13)]


def kernels():
    from fastlddmm.kernels import nearest, softmin

    return softmin, nearest


def clouds(n, m, dim=3, batch=None, dtype=torch.float64, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    x = torch.randn(*shape, n, dim, generator=g, dtype=torch.float64) + offset
    y = torch.randn(*shape, m, dim, generator=g, dtype=torch.float64) * 0.8 + 0.3 + offset
    return x.to(device=DEV, dtype=dtype), y.to(device=DEV, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# The soft-min kernels alone (multi-tile, against softmin_dense and its autograd)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,value_tol,grad_tol", SOFTMIN_DTYPES)
@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("n,m,dim,block_n,block_m", [(13, 29, 3, 4, 8), (7, 5, 2, 2, 2), (1, 17, 3, 2, 4)])
def test_softmin_kernels_match_dense(dtype, value_tol, grad_tol, p, n, m, dim, block_n, block_m):
    softmin, _ = kernels()
    x, y = clouds(n, m, dim, batch=2, dtype=dtype, seed=n + m)
    g = torch.Generator().manual_seed(3)
    h = (torch.randn(2, m, generator=g, dtype=torch.float64) * 3).to(device=DEV, dtype=dtype)
    h[0, 1] = RS.ZERO_WEIGHT_LOG  # a zero-weight point
    eps = 0.1
    x_, y_, h_ = (t.double().requires_grad_() for t in (x, y, h))
    ref = RS.softmin_dense(eps, RS.cost_matrix(x_, y_, p), h_)  # (2, n)

    lse = softmin.forward(x, y, h, eps, p, block_n=block_n, block_m=block_m)
    assert lse.dtype == dtype
    close_to_max(-eps * lse, ref, value_tol, "softmin")

    go = torch.randn(2, n, generator=g, dtype=torch.float64).to(device=DEV, dtype=dtype)
    ref_gx, ref_gy, ref_gh = torch.autograd.grad((ref * go.double()).sum(), (x_, y_, h_))
    gx = softmin.backward_x(x, y, h, lse, go, eps, p, block_n=block_n, block_m=block_m)
    gy, gh = softmin.backward_y(x, y, h, lse, go, eps, p, block_n=block_n, block_m=block_m)
    assert gx.dtype == gy.dtype == gh.dtype == dtype
    close_to_max(gx, ref_gx, grad_tol, "grad x")
    close_to_max(gy, ref_gy, grad_tol, "grad y")
    close_to_max(gh, ref_gh, grad_tol, "grad h")


@pytest.mark.parametrize("p", [2, 1])
def test_softmin_function_gradcheck(p):
    from fastlddmm.triton_ops.softmin import SoftminFunction

    x, y = clouds(5, 6, 2, batch=1, dtype=torch.float64, seed=11)
    h = torch.linspace(-1, 1, 6, dtype=torch.float64, device=DEV).view(1, 6)
    inputs = tuple(t.clone().requires_grad_() for t in (x, y, h))
    assert torch.autograd.gradcheck(lambda a, b, c: SoftminFunction.apply(a, b, c, 0.3, p), inputs)


def test_softmin_rejects_bad_input():
    softmin, _ = kernels()
    x, y = clouds(3, 4, dtype=torch.float64, batch=1)
    h = torch.zeros(1, 4, dtype=torch.float64, device=DEV)
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        softmin.forward(x, y, h, 0.1, 3)
    with pytest.raises(ValueError, match="h must have shape"):
        softmin.forward(x, y, h[:, :3], 0.1, 2)
    with pytest.raises(ValueError, match="y must have x's dtype"):
        softmin.forward(x, y.float(), h, 0.1, 2)


# ------------------------------------------------------------------------------------------------
# Sinkhorn through the public API (the generic loop of the reference with the Triton soft-min)
# ------------------------------------------------------------------------------------------------


def _sinkhorn_value_and_grads(backend, x, y, a, b, **kw):
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    inputs = [x, y]
    if a is not None:
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        inputs += [a, b]
    value = fl.sinkhorn(x, y, a=a, b=b, backend=backend, **kw)
    v = torch.linspace(0.5, 1.5, value.numel(), dtype=value.dtype, device=value.device).view(value.shape)
    return value.detach(), torch.autograd.grad((value * v).sum(), inputs)


def _compare_sinkhorn(x, y, a, b, value_tol, grad_tol, **kw):
    value, grads = _sinkhorn_value_and_grads("triton", x, y, a, b, **kw)
    assert value.dtype == x.dtype and all(g.dtype == x.dtype for g in grads)
    double = [None if t is None else t.double() for t in (x, y, a, b)]
    ref_value, ref_grads = _sinkhorn_value_and_grads("reference", *double, **kw)
    close_to_max(value, ref_value, value_tol, "sinkhorn")
    for name, g, r in zip(("x", "y", "a", "b"), grads, ref_grads):
        close_to_max(g, r, grad_tol, f"grad {name}")


@pytest.mark.parametrize("dtype,value_tol,grad_tol", SINKHORN_DTYPES)
@pytest.mark.parametrize("p", [2, 1])
def test_sinkhorn_matches_reference(dtype, value_tol, grad_tol, p):
    x, y = clouds(13, 29, dtype=dtype, seed=1)
    _compare_sinkhorn(x, y, None, None, value_tol, grad_tol, p=p, blur=0.1)


@pytest.mark.parametrize("dtype,value_tol,grad_tol", SINKHORN_DTYPES)
def test_sinkhorn_batched_weights_reach(dtype, value_tol, grad_tol):
    x, y = clouds(11, 7, dim=2, batch=3, dtype=dtype, seed=2)
    g = torch.Generator().manual_seed(5)
    a = torch.rand(3, 11, generator=g, dtype=torch.float64).to(device=DEV, dtype=dtype)
    b = torch.rand(3, 7, generator=g, dtype=torch.float64).to(device=DEV, dtype=dtype)
    a[1, 8:] = 0  # zero weights: how clouds of different sizes are batched
    b[2, :2] = 0
    _compare_sinkhorn(x, y, a, b, value_tol, grad_tol, blur=0.2, reach=0.7, scaling=0.6)


@pytest.mark.parametrize("dtype,value_tol,grad_tol", SINKHORN_DTYPES)
def test_sinkhorn_p1_reach_no_debias_edge_sizes(dtype, value_tol, grad_tol):
    x, y = clouds(40, 3, batch=2, dtype=dtype, seed=7)  # 40 rows: a full tile plus a padded one (GPU tiles)
    _compare_sinkhorn(x, y, None, None, value_tol, grad_tol, p=1, blur=0.1, reach=2.0, debias=False)
    x1, y1 = clouds(1, 5, dim=1, dtype=dtype, seed=8)  # N = 1, D = 1
    _compare_sinkhorn(x1, y1, None, None, value_tol, grad_tol, p=2, blur=0.1)


@pytest.mark.parametrize("debias", [True, False])
def test_sinkhorn_potentials_match_reference(debias):
    x, y = clouds(9, 14, dtype=torch.float64, seed=4)
    f, g = fl.sinkhorn_potentials(x, y, blur=0.1, debias=debias, backend="triton")
    rf, rg = fl.sinkhorn_potentials(x, y, blur=0.1, debias=debias, backend="reference")
    # float64, same loop and arithmetic up to summation order: agreement to ~1e-15 measured, 1e-10 margin
    assert_close(f, rf, rtol=1e-10, atol=1e-12, name="f")
    assert_close(g, rg, rtol=1e-10, atol=1e-12, name="g")


def test_sinkhorn_float32_offset_clouds():
    """Clouds at 1e3 from the origin in float32: the |x|² + |y|² - 2 x·y expansion would lose every
    digit of O(1) distances (checked below, so this test can fail); the kernels use differences."""
    x, y = clouds(17, 23, dtype=torch.float32, seed=6, offset=1e3)
    expansion = (x * x).sum(-1)[:, None] + (y * y).sum(-1)[None, :] - 2 * x @ y.T
    exact = RS.cost_matrix(x.double()[None], y.double()[None], 2)[0] * 2
    assert (expansion.double() - exact).abs().max() > 1e-2  # the trap is real at this offset
    # Same tolerances as near the origin (against float64 on the same float32 points): no loss of accuracy.
    _, value_tol, grad_tol = SINKHORN_DTYPES[0]
    _compare_sinkhorn(x, y, None, None, value_tol, grad_tol, blur=0.1)
    _compare_sinkhorn(x, y, None, None, value_tol, grad_tol, p=1, blur=0.1)


# Projection: T depends on the potentials through exp(g / eps), so rounding of g (~ulp · |g|) is amplified by
# 1/eps: at blur = 0.3 (eps = 0.09, p = 2) the float32 *reference* is itself off by 4.6e-5 of the max
# from float64, the Triton path by 1.2e-4 (measured); hence 5e-4 for float32. float64: measured 2.4e-13.
PROJECTION_DTYPES = [(torch.float32, 5e-4), (torch.float64, 1e-11)]


@pytest.mark.parametrize("dtype,tol", PROJECTION_DTYPES)
@pytest.mark.parametrize("p", [2, 1])
def test_sinkhorn_projection_matches_reference(dtype, tol, p):
    x, y = clouds(13, 17, batch=2, dtype=dtype, seed=15)
    b = torch.rand(2, 17, generator=torch.Generator().manual_seed(16), dtype=torch.float64).to(device=DEV, dtype=dtype)
    results = []
    for backend, cast in (("triton", dtype), ("reference", torch.float64)):
        xx, yy = x.to(cast).requires_grad_(), y.to(cast).requires_grad_()
        t = fl.sinkhorn_projection(xx, yy, b=b.to(cast), blur=0.3, p=p, reach=2.0 if p == 1 else None, backend=backend)
        v = torch.linspace(-1, 1, t.numel(), dtype=cast, device=DEV).view(t.shape)
        results.append((t, *torch.autograd.grad((t * v).sum(), (xx, yy))))
    assert results[0][0].dtype == dtype
    for name, u, r in zip(("T", "grad x", "grad y"), *results):
        close_to_max(u, r, tol, name)


@pytest.mark.parametrize("dtype,value_tol,grad_tol", SOFTMIN_DTYPES)
@pytest.mark.parametrize("p", [2, 1])
def test_weighted_sum_kernels_match_dense(dtype, value_tol, grad_tol, p):
    softmin, _ = kernels()
    n, m = 13, 29
    x, y = clouds(n, m, 3, batch=2, dtype=dtype, seed=17)
    g = torch.Generator().manual_seed(18)
    h = (torch.randn(2, m, generator=g, dtype=torch.float64) * 3).to(device=DEV, dtype=dtype)
    vals = torch.randn(2, m, 3, generator=g, dtype=torch.float64).to(device=DEV, dtype=dtype)
    eps, tiles = 0.2, dict(block_n=4, block_m=8)
    x_, h_, v_ = (t.double().requires_grad_() for t in (x, h, vals))
    ref = (h_[:, None, :] - RS.cost_matrix(x_, y.double(), p) / eps).softmax(-1) @ v_  # (2, n, 3)

    lse = softmin.forward(x, y, h, eps, p, **tiles)
    out = softmin.weighted_sum(x, y, h, vals, lse, eps, p, **tiles)
    close_to_max(out, ref, value_tol, "weighted sum")
    go = torch.randn(2, n, 3, generator=g, dtype=torch.float64).to(device=DEV, dtype=dtype)
    ref_gx, ref_gh, ref_gv = torch.autograd.grad((ref * go.double()).sum(), (x_, h_, v_))
    gx, gv, gh = softmin.weighted_sum_backward(x, y, h, vals, lse, out, go, eps, p, **tiles)
    close_to_max(gx, ref_gx, grad_tol, "grad x")
    close_to_max(gv, ref_gv, grad_tol, "grad v")
    close_to_max(gh, ref_gh, grad_tol, "grad h")


def test_auto_does_not_pick_triton_on_cpu():
    x, y = clouds(4, 5, dtype=torch.float64)
    assert D._sinkhorn_solver("auto", x.cpu(), y.cpu(), "sinkhorn") is not D._SINKHORN["triton"]()
    assert D._auto_nearest(x.cpu(), y.cpu()) is not D._index_triton


# ------------------------------------------------------------------------------------------------
# Nearest neighbour and Chamfer
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol,atol", NEAREST_DTYPES)
@pytest.mark.parametrize("n,m,dim", [(13, 29, 3), (29, 13, 3), (1, 7, 2), (7, 1, 2), (31, 37, 5)])
def test_nearest_matches_reference(dtype, rtol, atol, n, m, dim):
    _, nearest = kernels()
    x, y = clouds(n, m, dim, dtype=dtype, seed=n * m)
    ref_sq, ref_idx = R.nearest(x, y)
    # Small tiles: several column tiles and a padded last row / column tile.
    assert torch.equal(nearest.nearest_index(x, y, block_n=4, block_m=8), ref_idx)
    x.requires_grad_()
    y.requires_grad_()
    sq, idx = fl.nearest(x, y, backend="triton")
    assert torch.equal(idx, ref_idx) and idx.dtype == torch.int64 and not idx.requires_grad
    ref_sq, _ = R.nearest(x, y)
    assert_close(sq, ref_sq, rtol=rtol, atol=atol, name="sq dist")
    v = torch.linspace(-1, 1, n, dtype=dtype, device=DEV)
    grads, ref_grads = torch.autograd.grad((sq * v).sum(), (x, y)), torch.autograd.grad((ref_sq * v).sum(), (x, y))
    for name, g, r in zip("xy", grads, ref_grads):
        assert_close(g, r, rtol=rtol, atol=atol, name=f"grad {name}")


def test_nearest_ties_and_offset():
    _, nearest = kernels()
    # Duplicated targets in different tiles: the smallest index wins, as torch.argmin.
    y = torch.tensor([[5.0, 5.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64, device=DEV)
    x = torch.tensor([[0.1, 0.0], [0.9, 0.0]], dtype=torch.float64, device=DEV)
    assert nearest.nearest_index(x, y, block_n=2, block_m=2).tolist() == [1, 2]
    # float32 at 1e3 from the origin: differences find the true neighbour where the expansion can't.
    x, y = clouds(23, 31, dtype=torch.float32, seed=9, offset=1e3)
    assert torch.equal(nearest.nearest_index(x, y, block_n=8, block_m=8), R.nearest(x.double(), y.double())[1])
    xb, yb = clouds(19, 11, dtype=torch.float32, batch=3, seed=10)
    idx = nearest.nearest_index(xb, yb, block_n=4, block_m=4)  # batch grid axis
    assert torch.equal(idx, torch.stack([R.nearest(xb[k], yb[k])[1] for k in range(3)]))


@pytest.mark.parametrize("dtype,rtol,atol", NEAREST_DTYPES)
def test_chamfer_batched_with_lengths(dtype, rtol, atol):
    x, y = clouds(17, 13, batch=3, dtype=dtype, seed=12)
    xl = torch.tensor([17, 5, 11], device=DEV)
    yl = torch.tensor([13, 13, 2], device=DEV)
    x.requires_grad_()
    y.requires_grad_()
    c = fl.chamfer(x, y, x_lengths=xl, y_lengths=yl, backend="triton")
    r = fl.chamfer(x, y, x_lengths=xl, y_lengths=yl, backend="reference")
    assert_close(c, r, rtol=rtol, atol=atol, name="chamfer")
    v = torch.tensor([1.0, -0.5, 2.0], dtype=dtype, device=DEV)
    grads, ref_grads = torch.autograd.grad((c * v).sum(), (x, y)), torch.autograd.grad((r * v).sum(), (x, y))
    for name, g, gr in zip("xy", grads, ref_grads):
        assert_close(g, gr, rtol=rtol, atol=atol, name=f"grad {name}")


# ------------------------------------------------------------------------------------------------
# GPU sizes (compiled kernels, default tiles)
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype,value_tol,grad_tol", SINKHORN_DTYPES)
@pytest.mark.parametrize("p", [2, 1])
def test_gpu_sinkhorn_sizes(dtype, value_tol, grad_tol, p):
    x, y = clouds(1500, 2001, dtype=dtype, batch=2, seed=13)
    _compare_sinkhorn(x, y, None, None, value_tol, grad_tol, p=p, blur=0.05)


@pytest.mark.gpu
@needs_gpu
def test_gpu_auto_picks_triton_and_offset():
    x, y = clouds(3000, 2500, dtype=torch.float32, seed=14, offset=1e3)
    assert D._sinkhorn_solver("auto", x, y, "sinkhorn") is D._SINKHORN["triton"]()
    assert D._sinkhorn_solver("auto", x, y, "sinkhorn_projection") is D._SINKHORN["triton"]()
    assert D._auto_nearest(x, y) is D._index_triton
    assert torch.equal(D._index_triton(x, y), R.nearest(x.double(), y.double())[1])
    value = fl.sinkhorn(x, y, blur=0.05, backend="triton").double()
    ref = fl.sinkhorn(x.double(), y.double(), blur=0.05, backend="reference")
    # float32 against float64 on the same points: the target agreement (1e-4 relative)
    assert_close(value, ref, rtol=1e-4, atol=1e-6, name="sinkhorn offset (GPU)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter error; a GPU is present")
def test_cpu_tensors_without_interpreter_say_how():
    import os
    import subprocess
    import sys

    code = (
        "import torch, fastlddmm as fl\n"
        "from fastlddmm._backend import BackendUnavailableError\n"
        "x = torch.randn(4, 3)\n"
        "for call in (lambda: fl.sinkhorn(x, x, backend='triton'), lambda: fl.chamfer(x, x, backend='triton')):\n"
        "    try:\n"
        "        call()\n"
        "    except BackendUnavailableError as e:\n"
        "        assert 'TRITON_INTERPRET=1' in str(e), e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
