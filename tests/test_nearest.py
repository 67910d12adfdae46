"""The nearest op (fastlddmm/ops/nearest): the reference twins against brute force, the ``knn_index``
contract for every backend of the dispatch table, fl.nearest / fl.chamfer over every backend (values,
gradients, lengths), input errors, and the Triton kernel's tile loops.

Every backend only *finds* indices; the front-ends recompute the distances with the reference's formula,
so values and gradients equal the reference's whenever the same neighbours are found.

KeOps formulas compiled by this file (see conftest.keops_formula): ArgMin in squared Euclidean distance for
D = 3 (float32, float64) and D = 2 (float64); ArgKMin with K = 3, D = 3, float64, L2 and L1 (the ones
tests/test_compat.py's knn_points compiles too).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastlddmm as fl
from fastlddmm import dispatch

from conftest import assert_close, backend_cases, clouds, keops_formula, require_backend, skip_if_interpreted

CASES = backend_cases("nearest")
KEOPS_ARGMIN = {(3, torch.float32), (3, torch.float64), (2, torch.float64)}

# (dtype, rtol, atol) for distances recomputed from indices: float32 sums of D squared differences round at
# ~1e-7 relative; the gradient to y sums O(1) terms (one per x_i sent to y_j) in another order than the
# dense reference's backward, so a few float32 ulps of the terms' size in absolute error. float64: ~1e-16.
DTYPES = [pytest.param(torch.float32, 1e-5, 5e-6, id="float32"),
          pytest.param(torch.float64, 1e-12, 1e-13, id="float64")]


def brute_nearest(x, y):  # (N, D), (M, D) -> list of (sq_dist, index), plain python floats
    out = []
    for xi in x.tolist():
        d = [sum((a - b) ** 2 for a, b in zip(xi, yj)) for yj in y.tolist()]
        j = min(range(len(d)), key=d.__getitem__)
        out.append((d[j], j))
    return out


def brute_chamfer(x, y):
    d_xy = [d for d, _ in brute_nearest(x, y)]
    d_yx = [d for d, _ in brute_nearest(y, x)]
    return sum(d_xy) / len(d_xy) + sum(d_yx) / len(d_yx)


def dense_knn(x, y, k, norm, y_lengths=None):  # (B, N, D), (B, M, D) -> (B, N, k): a full sort, no chunks
    diff = x.double()[:, :, None, :] - y.double()[:, None, :, :]
    d = diff.pow(2).sum(-1) if norm == 2 else diff.abs().sum(-1)
    if y_lengths is not None:
        d = d.masked_fill(torch.arange(y.shape[1])[None, None, :] >= y_lengths[:, None, None], float("inf"))
    return d.sort(dim=-1, stable=True).indices[..., :k]


def knn(backend):
    return dispatch.load("nearest", backend).knn_index


# ------------------------------------------------------------------------------------------------
# The reference twins against brute force
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,dim", [(1, 1, 3), (7, 5, 2), (13, 1, 3), (1, 9, 2), (23, 17, 3)])
def test_reference_nearest_and_chamfer_match_brute_force(n, m, dim):
    x, y = clouds(n, m, dim)
    sq, idx = fl.reference.nearest(x, y)
    expected = brute_nearest(x, y)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [j for _, j in expected]  # random gaussian clouds: no ties
    assert_close(sq, torch.tensor([d for d, _ in expected], dtype=x.dtype), rtol=1e-12, atol=1e-14, name="sq dist")
    assert fl.reference.chamfer(x, y).item() == pytest.approx(brute_chamfer(x, y), rel=1e-12)


def test_reference_chamfer_lengths_match_brute_force_on_slices():
    x, y = clouds(11, 9, 3, batch=3)
    xl, yl = torch.tensor([11, 1, 6]), torch.tensor([4, 9, 1])
    got = fl.reference.chamfer(x, y, xl, yl)
    for k in range(3):
        assert got[k].item() == pytest.approx(brute_chamfer(x[k, : xl[k]], y[k, : yl[k]]), rel=1e-12)
    _, idx = fl.reference.nearest(x, y, yl)
    assert bool((idx < yl[:, None]).all())


def test_reference_twins_gradcheck():
    x, y = (t.requires_grad_() for t in clouds(6, 5, 3))
    assert torch.autograd.gradcheck(fl.reference.chamfer, (x, y))
    assert torch.autograd.gradcheck(lambda a, b: fl.reference.nearest(a, b)[0], (x, y))
    z = clouds(6, 6, 3, seed=4)[1].requires_grad_()
    assert torch.autograd.gradcheck(fl.reference.l2, (x, z))
    xb, yb = (t.requires_grad_() for t in clouds(5, 4, 2, batch=2, seed=1))
    lengths = (torch.tensor([5, 2]), torch.tensor([3, 4]))
    assert torch.autograd.gradcheck(lambda a, b: fl.reference.chamfer(a, b, *lengths), (xb, yb))


def test_reference_l2_is_the_mean_squared_correspondence():
    x, y = clouds(7, 7, 3)
    want = sum(sum((a - b) ** 2 for a, b in zip(p, q)) for p, q in zip(x.tolist(), y.tolist())) / 7
    assert fl.reference.l2(x, y).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("n,m,dim", [(1, 7, 3), (1013, 7, 3), (7, 1013, 2), (257, 300, 3)])
def test_reference_search_by_row_blocks(monkeypatch, n, m, dim):
    """The dense search works CHUNK_BYTES of (rows, M, D) at a time: several blocks even at these sizes."""
    monkeypatch.setattr(dispatch.load("nearest", "reference"), "CHUNK_BYTES", 4096)
    x, y = clouds(n, m, dim, batch=1, seed=n + m)
    for k, norm in ((1, 2), (3, 2), (3, 1)):
        k = min(k, m)
        assert torch.equal(knn("reference")(x, y, k, norm), dense_knn(x, y, k, norm)), (k, norm)


# ------------------------------------------------------------------------------------------------
# knn_index: the contract, for every backend
# ------------------------------------------------------------------------------------------------

SIZES = [  # (batch, n, m, dim): 1, 7, 1000 + 13 points, primes, D = 2, 3, 5
    (2, 1, 1, 3), (1, 1, 7, 3), (1, 7, 1, 2), (2, 13, 29, 3), (1, 29, 13, 3), (1, 31, 37, 5),
    (1, 1013, 7, 3), (1, 7, 1013, 3), (1, 1013, 1, 2), (1, 1, 1013, 2), (3, 101, 53, 3),
]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("batch,n,m,dim", SIZES, ids=[f"B{b}-{n}x{m}-D{d}" for b, n, m, d in SIZES])
def test_knn_index_finds_the_nearest(backend, device, dtype, batch, n, m, dim):
    dev = require_backend("nearest", backend, device, dtype=dtype, dim=dim, k=1, norm=2)
    skip_if_interpreted(backend, device, max(n, m))
    keops_formula(backend, (dim, dtype) in KEOPS_ARGMIN, f"ArgMin in D={dim}, {dtype}")
    x, y = clouds(n, m, dim, batch=batch, dtype=dtype, device=dev, seed=n + 3 * m)
    x.requires_grad_()
    idx = knn(backend)(x, y, 1, 2, None, None)
    assert idx.shape == (batch, n, 1) and idx.dtype == torch.int64 and idx.device == x.device
    assert not idx.requires_grad
    want = fl.reference.nearest(x.detach().double().cpu(), y.double().cpu())[1]  # the true neighbours
    got = idx[..., 0].cpu()
    if dtype == torch.float64:
        assert torch.equal(got, want)  # random clouds: no ties at float64 resolution
    else:
        # float32 distances may tie within rounding: the distance at the index found is the minimum
        gx, gy = x.detach().double().cpu(), y.double().cpu()
        d_got = (gx - torch.gather(gy, 1, got[..., None].expand(-1, -1, dim))).pow(2).sum(-1)
        d_want = (gx - torch.gather(gy, 1, want[..., None].expand(-1, -1, dim))).pow(2).sum(-1)
        assert_close(d_got, d_want, rtol=1e-5, atol=1e-6, name="distance at the index found")
        assert (got == want).double().mean() > 0.99


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("norm", [2, 1])
def test_knn_index_k3_sorted_with_lengths(backend, device, norm):
    """K = 3 neighbours sorted by distance (L2 or L1), rows past x_lengths and neighbours past y_lengths 0."""
    dev = require_backend("nearest", backend, device, k=3, norm=norm)
    x, y = clouds(41, 37, 3, batch=2, device=dev, seed=10)
    xl, yl = torch.tensor([41, 20], device=dev), torch.tensor([37, 30], device=dev)  # each >= K: one KeOps formula
    idx = knn(backend)(x, y, 3, norm, xl, yl).cpu()
    assert idx.shape == (2, 41, 3) and idx.dtype == torch.int64
    want = dense_knn(x.cpu(), y.cpu(), 3, norm, yl.cpu())
    assert torch.equal(idx[0], want[0])
    assert torch.equal(idx[1, :20], want[1, :20])
    assert not idx[1, 20:].any()


@pytest.mark.parametrize("backend,device", CASES)
def test_knn_index_more_neighbours_than_points(backend, device):
    """K larger than a cloud: the missing neighbours are 0 (pytorch3d's convention)."""
    dev = require_backend("nearest", backend, device, k=3)
    keops_formula(backend, False, "ArgKMin with K = 2 and 1 (a cloud of fewer than K points)")
    x, y = clouds(9, 6, 3, batch=2, device=dev, seed=12)
    yl = torch.tensor([2, 1], device=dev)
    idx = knn(backend)(x, y, 3, 2, None, yl).cpu()
    want = dense_knn(x.cpu(), y.cpu(), 3, 2, yl.cpu())
    assert torch.equal(idx[0, :, :2], want[0, :, :2]) and not idx[0, :, 2:].any()
    assert not idx[1].any()  # one point: its index is 0, and so are the two missing ones


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_knn_index_lengths_equal_slices(backend, device, dtype):
    dev = require_backend("nearest", backend, device, dtype=dtype, k=1)
    x, y = clouds(17, 13, 3, batch=3, dtype=dtype, device=dev, seed=12)
    xl, yl = torch.tensor([17, 5, 11], device=dev), torch.tensor([13, 13, 2], device=dev)
    idx = knn(backend)(x, y, 1, 2, xl, yl)
    assert idx.shape == (3, 17, 1)
    for b in range(3):
        alone = knn(backend)(x[b : b + 1, : xl[b]], y[b : b + 1, : yl[b]], 1, 2, None, None)
        assert torch.equal(idx[b : b + 1, : xl[b]], alone)
        assert not idx[b, xl[b] :].any()
    assert bool((idx[..., 0] < yl[:, None]).all())


@pytest.mark.parametrize("backend,device", CASES)
def test_knn_index_ties(backend, device):
    """Duplicated targets in different tiles: the reference and Triton pick the smallest index (as
    torch.argmin), any backend one at the minimal distance."""
    dev = require_backend("nearest", backend, device, dim=2, k=1)
    y = torch.tensor([[[5.0, 5.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]]], dtype=torch.float64, device=dev)
    x = torch.tensor([[[0.1, 0.0], [0.9, 0.0]]], dtype=torch.float64, device=dev)
    idx = knn(backend)(x, y, 1, 2, None, None)[0, :, 0].tolist()
    if backend in ("reference", "triton"):
        assert idx == [1, 2]
    else:
        assert idx[0] in (1, 3) and idx[1] in (2, 4)


@pytest.mark.parametrize("backend,device", CASES)
def test_knn_index_float32_far_from_the_origin(backend, device):
    """float32 clouds at 1e3 from the origin: the |x|² + |y|² - 2 x·y expansion would lose every digit of
    O(1) distances (checked, so this test can fail); from coordinate differences the true neighbour is found."""
    dev = require_backend("nearest", backend, device, dtype=torch.float32, k=1)
    x, y = clouds(23, 31, batch=1, dtype=torch.float32, device=dev, seed=9, offset=1e3)
    expansion = (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2 * x @ y.transpose(1, 2)
    exact = (x.double()[:, :, None] - y.double()[:, None]).pow(2).sum(-1)
    assert (expansion.double() - exact).abs().max() > 1e-2  # the trap is real at this offset
    idx = knn(backend)(x, y, 1, 2, None, None)[..., 0].cpu()
    assert torch.equal(idx, fl.reference.nearest(x.double().cpu(), y.double().cpu())[1])


# ------------------------------------------------------------------------------------------------
# fl.nearest and fl.chamfer over every backend
# ------------------------------------------------------------------------------------------------

FRONT_SIZES = [(13, 29, 3), (29, 13, 3), (1, 7, 2), (7, 1, 2), (1013, 7, 3), (7, 1013, 3)]


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("n,m,dim", FRONT_SIZES, ids=[f"{n}x{m}-D{d}" for n, m, d in FRONT_SIZES])
def test_nearest_values_and_gradients(backend, device, dtype, rtol, atol, n, m, dim):
    dev = require_backend("nearest", backend, device, dtype=dtype, dim=dim, k=1)
    skip_if_interpreted(backend, device, max(n, m))
    keops_formula(backend, (dim, dtype) in KEOPS_ARGMIN, f"ArgMin in D={dim}, {dtype}")
    x, y = (t.requires_grad_() for t in clouds(n, m, dim, dtype=dtype, device=dev, seed=n * m))
    sq, idx = fl.nearest(x, y, backend=backend)
    ref_sq, ref_idx = fl.reference.nearest(x, y)
    assert sq.shape == idx.shape == (n,) and idx.dtype == torch.int64 and not idx.requires_grad
    if dtype == torch.float64:
        assert torch.equal(idx, ref_idx)
    assert_close(sq, ref_sq, rtol=rtol, atol=atol, name="sq dist")
    v = torch.linspace(-1, 1, n, dtype=dtype, device=dev)
    grads = torch.autograd.grad((sq * v).sum(), (x, y))
    ref_grads = torch.autograd.grad((ref_sq * v).sum(), (x, y))
    # y_j receives one O(1) term per x_i it is nearest to (~N/M of them), summed in another order than the
    # dense reference's backward: the rounding error grows with that count.
    per_y = max(1, -(-n // m))
    for name, g, r, scale in zip("xy", grads, ref_grads, (1, per_y)):
        assert_close(g, r, rtol=rtol, atol=atol * scale, name=f"grad {name}")
    # batched (B, N, D) input: one more leading axis on both outputs
    sq_b, idx_b = fl.nearest(x.detach()[None].expand(2, -1, -1), y.detach()[None].expand(2, -1, -1), backend=backend)
    assert sq_b.shape == idx_b.shape == (2, n)
    assert torch.equal(idx_b[0], idx) and torch.equal(idx_b[1], idx)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("size", ["small", "large"])
@pytest.mark.parametrize("lengths", [False, True], ids=["full", "lengths"])
def test_chamfer_values_and_gradients(backend, device, dtype, rtol, atol, size, lengths):
    dev = require_backend("nearest", backend, device, dtype=dtype, k=1)
    n, m = (17, 13) if size == "small" else (1013, 7)
    skip_if_interpreted(backend, device, max(n, m))
    x, y = clouds(n, m, batch=3, dtype=dtype, device=dev, seed=12)
    xl = torch.tensor([n, 5, 1], device=dev) if lengths else None
    yl = torch.tensor([m, 1, 2], device=dev) if lengths else None
    xb, yb = x.clone().requires_grad_(), y.clone().requires_grad_()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = fl.chamfer(xb, yb, x_lengths=xl, y_lengths=yl, backend=backend)
    want = fl.reference.chamfer(xr, yr, xl, yl)
    assert got.shape == (3,)
    assert_close(got, want, rtol=rtol, atol=atol, name="chamfer")
    v = torch.tensor([0.3, -1.0, 2.0], dtype=dtype, device=dev)
    grads = torch.autograd.grad((got * v).sum(), (xb, yb))
    ref_grads = torch.autograd.grad((want * v).sum(), (xr, yr))
    for name, g, r in zip("xy", grads, ref_grads):
        assert_close(g, r, rtol=rtol, atol=atol, name=f"grad {name}")
    single = fl.chamfer(x[0], y[0], backend=backend)
    assert single.shape == ()
    assert_close(single, fl.reference.chamfer(x[0], y[0]), rtol=rtol, atol=atol, name="chamfer (N, D)")


@pytest.mark.parametrize("backend,device", CASES)
def test_chamfer_of_identical_clouds_is_zero_and_symmetric(backend, device):
    dev = require_backend("nearest", backend, device, k=1)
    x, y = clouds(50, 40, 3, device=dev)
    assert fl.chamfer(x, x.clone(), backend=backend).item() == 0.0
    assert fl.chamfer(x, y, backend=backend).item() == pytest.approx(fl.chamfer(y, x, backend=backend).item(), rel=1e-14)


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("n,m", [(7, 5), (300, 400)])  # both sides of auto's dense / streaming switch
def test_auto_matches_reference(dtype, rtol, atol, n, m):
    x, y = clouds(n, m, 3, batch=2, dtype=dtype, seed=7)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, ref = fl.chamfer(xa, y), fl.reference.chamfer(xr, y)
    assert_close(got, ref, rtol=rtol, atol=atol, name="auto chamfer")
    assert_close(torch.autograd.grad(got.sum(), xa)[0], torch.autograd.grad(ref.sum(), xr)[0], rtol=rtol, atol=atol,
                 name="auto chamfer grad x")
    sq, idx = fl.nearest(x[0], y[0])
    assert sq.shape == idx.shape == (n,) and idx.dtype == torch.int64
    assert_close(sq, fl.reference.nearest(x[0], y[0])[0], rtol=rtol, atol=atol, name="auto nearest")


# ------------------------------------------------------------------------------------------------
# Input errors (checked before any backend runs)
# ------------------------------------------------------------------------------------------------

FRONT_ENDS = [fl.chamfer, fl.nearest, fl.sinkhorn, fl.sinkhorn_potentials, fl.sinkhorn_projection]


@pytest.mark.parametrize("fn", FRONT_ENDS, ids=lambda f: f.__name__)
def test_bad_inputs_raise_clear_errors(fn):
    x, y = clouds(5, 4, 3)
    for args, exc, msg in [
        ((x.numpy(), y), TypeError, "x must be a torch.Tensor"),
        ((x.half(), y.half()), TypeError, "float32 or float64"),
        ((x, y[:, :2]), ValueError, "same point dimension"),
        ((x[0], y), ValueError, r"shape \(N, D\) or \(B, N, D\)"),
        ((x.unsqueeze(0), y), ValueError, "both be batched"),
        ((x, y.float()), TypeError, "same dtype"),
        ((x, y.clone().fill_(float("nan"))), ValueError, "NaN or Inf"),
        ((x[:0], y), ValueError, "empty"),
    ]:
        with pytest.raises(exc, match=msg):
            fn(*args)
    with pytest.raises(ValueError, match="backend must be"):
        fn(x, y, backend="fast")


def test_bad_lengths_raise():
    x, y = clouds(5, 4, 3, batch=2)
    with pytest.raises(ValueError, match=r"y_lengths must lie in \[1, 4\]"):
        fl.chamfer(x, y, y_lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="x_lengths must lie"):
        fl.chamfer(x, y, x_lengths=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integers"):
        fl.chamfer(x, y, x_lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
        fl.chamfer(x, y, x_lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="only meaningful for batched"):
        fl.chamfer(x[0], y[0], x_lengths=torch.tensor([1]))


def test_top_level_exports():
    for name in ("chamfer", "nearest", "sinkhorn", "sinkhorn_potentials", "sinkhorn_projection", "backends"):
        assert callable(getattr(fl, name))
    for name in ("chamfer", "nearest", "l2", "knn_index", "sinkhorn", "sinkhorn_potentials", "sinkhorn_projection",
                 "euler_flow", "softmin", "softmax_weighted_sum", "kernel_sum"):
        assert callable(getattr(fl.reference, name)), name


# ------------------------------------------------------------------------------------------------
# The Triton kernel (kernels/nearest.py): tile loops with forced small tiles
# ------------------------------------------------------------------------------------------------

TRITON_DEVICES = [c for c in CASES if c.values[0] == "triton"]


def triton_kernel(device):
    dev = require_backend("nearest", "triton", device)
    from fastlddmm.kernels import nearest

    return nearest, dev


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("n,m,dim", [(13, 29, 3), (29, 13, 3), (1, 7, 2), (7, 1, 2), (31, 37, 5)])
def test_triton_kernel_tiles(backend, device, dtype, n, m, dim):
    """Tiles of 4 rows x 8 columns: several column tiles, a padded last row and column tile."""
    nearest, dev = triton_kernel(device)
    x, y = clouds(n, m, dim, dtype=dtype, device=dev, seed=n * m)
    want = fl.reference.nearest(x, y)[1]
    assert torch.equal(nearest.nearest_index(x, y, block_n=4, block_m=8), want)
    xb, yb = clouds(19, 11, dim, batch=3, dtype=dtype, device=dev, seed=10)  # the batch grid axis
    want = torch.stack([fl.reference.nearest(xb[k], yb[k])[1] for k in range(3)])
    assert torch.equal(nearest.nearest_index(xb, yb, block_n=4, block_m=4), want)


@pytest.mark.parametrize("backend,device", TRITON_DEVICES)
def test_triton_kernel_ties_across_tiles_and_nan(backend, device):
    nearest, dev = triton_kernel(device)
    y = torch.tensor([[5.0, 5.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64, device=dev)
    x = torch.tensor([[0.1, 0.0], [0.9, 0.0]], dtype=torch.float64, device=dev)
    assert nearest.nearest_index(x, y, block_n=2, block_m=2).tolist() == [1, 2]  # a later tile must be better
    # NaN distances never win (the front-ends refuse NaN; the kernel is robust anyway)
    y_nan = y.clone()
    y_nan[1] = float("nan")
    assert nearest.nearest_index(x, y_nan, block_n=2, block_m=2).tolist() == [3, 2]


@pytest.mark.gpu
@pytest.mark.parametrize("backend,device", [c for c in CASES if c.values[1] == "cuda"])
def test_gpu_large_offset_clouds(backend, device):
    """The GPU sizes: 3000 x 2500 float32 points at 1e3 from the origin, against float64."""
    dev = require_backend("nearest", backend, device, dtype=torch.float32, k=1)
    keops_formula(backend, True, "")
    x, y = clouds(3000, 2500, batch=1, dtype=torch.float32, device=dev, seed=14, offset=1e3)
    idx = knn(backend)(x, y, 1, 2, None, None)[..., 0]
    want = fl.reference.nearest(x.double(), y.double())[1]
    assert (idx == want).double().mean() > 0.999  # float32 ties within rounding may differ
    sq = fl.nearest(x, y, backend=backend)[0]
    assert_close(sq.double(), fl.reference.nearest(x.double(), y.double())[0], rtol=1e-4, atol=1e-4, name="sq dist")


# ------------------------------------------------------------------------------------------------
# KeOps compiles on first use: announced once per process
# ------------------------------------------------------------------------------------------------

_KEOPS_WARNING_SCRIPT = """
import warnings, torch, fastlddmm as fl
x = torch.randn(7, 3, dtype=torch.float64)
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    fl.nearest(x, x + 1, backend="keops")
    fl.nearest(x, x + 2, backend="keops")
kinds = [w for w in seen if type(w.message).__name__ == "KeOpsCompilationWarning"]
print("RESULT", len(kinds), "cache" in str(kinds[0].message) if kinds else None)
"""


def test_keops_first_use_is_announced_once(tmp_path):
    if not dispatch.status("keops"):
        pytest.skip(f"backend 'keops' is not available here: {dispatch.status('keops').reason}")
    proc = subprocess.run([sys.executable, "-c", _KEOPS_WARNING_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT 1 True" in proc.stdout.splitlines(), proc.stdout  # KeOps prints its own lines too
