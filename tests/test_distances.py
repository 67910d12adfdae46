"""fl.chamfer / fl.nearest: the dense reference against a brute-force loop, the non-KeOps fast paths
of "auto" (cKDTree, chunked dense) against the reference, backend dispatch and input errors.
(KeOps paths: tests/test_keops.py; Sinkhorn: tests/test_sinkhorn.py.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fastlddmm
from fastlddmm import _backend
from fastlddmm import distances as D
from fastlddmm.reference import distances as R

# (dtype, rtol, atol): float32 sums of D squared differences round at ~1e-7 relative; float64 ~1e-16.
DTYPES = [(torch.float32, 1e-5, 1e-6), (torch.float64, 1e-12, 1e-13)]
has_scipy = importlib.util.find_spec("scipy") is not None


def clouds(n, m, dim=3, batch=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    x = torch.randn(*shape, n, dim, generator=g, dtype=dtype)
    y = torch.randn(*shape, m, dim, generator=g, dtype=dtype) * 0.8 + 0.3
    return x, y


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


# ------------------------------------------------------------------------------------------------
# Reference against brute force
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m,dim", [(1, 1, 3), (7, 5, 2), (13, 1, 3), (1, 9, 2), (23, 17, 3)])
def test_reference_nearest_and_chamfer_match_brute_force(n, m, dim):
    x, y = clouds(n, m, dim)
    sq, idx = R.nearest(x, y)
    expected = brute_nearest(x, y)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [j for _, j in expected]  # random gaussian clouds: no ties
    torch.testing.assert_close(sq, torch.tensor([d for d, _ in expected], dtype=x.dtype), rtol=1e-12, atol=1e-14)
    assert R.chamfer(x, y).item() == pytest.approx(brute_chamfer(x, y), rel=1e-12)


def test_reference_chamfer_lengths_match_brute_force_on_slices():
    x, y = clouds(11, 9, 3, batch=3)
    xl, yl = torch.tensor([11, 1, 6]), torch.tensor([4, 9, 1])
    got = R.chamfer(x, y, xl, yl)
    for k in range(3):
        assert got[k].item() == pytest.approx(brute_chamfer(x[k, : xl[k]], y[k, : yl[k]]), rel=1e-12)


def test_reference_chamfer_gradcheck():
    x, y = clouds(6, 5, 3)
    assert torch.autograd.gradcheck(R.chamfer, (x.requires_grad_(), y.requires_grad_()))
    xb, yb = clouds(5, 4, 2, batch=2, seed=1)
    lengths = (torch.tensor([5, 2]), torch.tensor([3, 4]))
    assert torch.autograd.gradcheck(lambda a, b: R.chamfer(a, b, *lengths), (xb.requires_grad_(), yb.requires_grad_()))


# ------------------------------------------------------------------------------------------------
# The index finders of "auto" (other than KeOps) against the reference
# ------------------------------------------------------------------------------------------------

FINDERS = [
    pytest.param(D._index_chunked, id="chunked"),
    pytest.param(D._index_kdtree, id="kdtree", marks=pytest.mark.skipif(not has_scipy, reason="needs scipy (pip install scipy)")),
]


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("n,m,dim", [(1, 7, 3), (1013, 7, 3), (7, 1013, 2), (257, 300, 3)])
def test_index_finders_match_reference(finder, dtype, rtol, atol, n, m, dim, monkeypatch):
    monkeypatch.setattr(D, "_CHUNK_BYTES", 4096)  # several chunks even at these sizes
    x, y = clouds(n, m, dim, dtype=dtype, seed=n + m)
    ref_sq, ref_idx = R.nearest(x, y)
    idx = finder(x, y)
    assert idx.dtype == torch.int64 and idx.shape == (n,)
    # Ties are possible only up to rounding: compare the distances at the returned indices.
    torch.testing.assert_close(D._gather_sq_dist(x, y, idx), ref_sq, rtol=rtol, atol=atol)
    assert (idx == ref_idx).float().mean() > 0.99


@pytest.mark.parametrize("finder", FINDERS)
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
def test_chamfer_items_values_and_gradients_match_reference(finder, dtype, rtol, atol):
    x, y = clouds(31, 29, 3, batch=3, dtype=dtype, seed=3)
    xl, yl = torch.tensor([31, 1, 17]), torch.tensor([5, 29, 1])
    v = torch.randn(3, dtype=dtype)
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    xf, yf = x.clone().requires_grad_(), y.clone().requires_grad_()
    ref = R.chamfer(xr, yr, xl, yl)
    got = D._chamfer_items(xf, yf, xl, yl, finder)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    for g_ref, g in zip(torch.autograd.grad((ref * v).sum(), (xr, yr)), torch.autograd.grad((got * v).sum(), (xf, yf))):
        torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------
# Public functions: shapes, auto, dispatch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,rtol,atol", DTYPES)
@pytest.mark.parametrize("n,m", [(7, 5), (300, 400)])  # both sides of the dense / cKDTree switch of "auto"
def test_auto_matches_reference(dtype, rtol, atol, n, m):
    x, y = clouds(n, m, 3, batch=2, dtype=dtype, seed=7)
    xa, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, ref = D.chamfer(xa, y, backend="auto"), D.chamfer(xr, y, backend="reference")
    assert got.shape == (2,)
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), xa)[0], torch.autograd.grad(ref.sum(), xr)[0], rtol=rtol, atol=atol)
    sq, idx = D.nearest(x[0], y[0], backend="auto")
    ref_sq, _ = D.nearest(x[0], y[0], backend="reference")
    assert sq.shape == idx.shape == (n,) and idx.dtype == torch.int64
    torch.testing.assert_close(sq, ref_sq, rtol=rtol, atol=atol)


def test_auto_choices(monkeypatch):
    x, y = clouds(10, 10, 3)
    assert D._auto_nearest(x, y) is D._index_reference
    big_x, big_y = clouds(1000, 1000, 3)
    if has_scipy:
        assert D._auto_nearest(big_x, big_y) is D._index_kdtree
    hx, hy = clouds(1000, 1000, 8)
    expected = D._index_keops if _backend.status("keops").available else D._index_chunked
    assert D._auto_nearest(hx, hy) is expected


def test_nearest_index_is_not_differentiable_and_sq_dist_is():
    x, y = clouds(9, 6, 3)
    x.requires_grad_()
    sq, idx = D.nearest(x, y, backend="auto")
    assert not idx.requires_grad and idx.dtype == torch.int64
    assert sq.requires_grad
    sq_b, idx_b = D.nearest(x.unsqueeze(0), y.unsqueeze(0), backend="reference")
    assert sq_b.shape == idx_b.shape == (1, 9)


def test_chamfer_of_identical_clouds_is_zero_and_symmetric():
    x, y = clouds(50, 40, 3)
    assert D.chamfer(x, x).item() == 0.0
    assert D.chamfer(x, y).item() == pytest.approx(D.chamfer(y, x).item(), rel=1e-14)


def test_top_level_exports():
    from fastlddmm import distances

    for name in ("chamfer", "nearest", "sinkhorn", "sinkhorn_potentials", "sinkhorn_projection"):
        assert callable(getattr(distances, name))
    assert callable(fastlddmm.reference.sinkhorn)


# ------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [D.chamfer, D.nearest, D.sinkhorn])
def test_bad_inputs_raise_clear_errors(fn):
    x, y = clouds(5, 4, 3)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fn(x.numpy(), y)
    with pytest.raises(TypeError, match="float32 or float64"):
        fn(x.half(), y.half())
    with pytest.raises(ValueError, match="same point dimension"):
        fn(x, y[:, :2])
    with pytest.raises(ValueError, match=r"shape \(N, D\) or \(B, N, D\)"):
        fn(x[0], y)
    with pytest.raises(ValueError, match="both be batched"):
        fn(x.unsqueeze(0), y)
    with pytest.raises(TypeError, match="same dtype"):
        fn(x, y.float())
    with pytest.raises(ValueError, match="NaN or Inf"):
        fn(x, y.clone().fill_(float("nan")))
    with pytest.raises(ValueError, match="empty"):
        fn(x[:0], y)
    with pytest.raises(ValueError, match="backend must be"):
        fn(x, y, backend="fast")


def test_bad_lengths_raise():
    x, y = clouds(5, 4, 3, batch=2)
    with pytest.raises(ValueError, match=r"y_lengths must lie in \[1, 4\]"):
        D.chamfer(x, y, y_lengths=torch.tensor([5, 1]))
    with pytest.raises(ValueError, match="x_lengths must lie"):
        D.chamfer(x, y, x_lengths=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integers"):
        D.chamfer(x, y, x_lengths=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="only meaningful for batched"):
        D.chamfer(x[0], y[0], x_lengths=torch.tensor([1]))


def test_unbuilt_backend_says_why(monkeypatch):
    x, y = clouds(5, 4, 3)
    real_status = _backend.status

    def no_keops(name):
        if name == "keops":
            return _backend.BackendStatus("keops", False, "pykeops is missing: pip install 'fastlddmm[keops]' (needs g++)")
        return real_status(name)

    monkeypatch.setattr(_backend, "status", no_keops)
    for call in (lambda: D.chamfer(x, y, backend="keops"), lambda: D.nearest(x, y, backend="keops"),
                 lambda: D.sinkhorn(x, y, backend="keops")):
        with pytest.raises(_backend.BackendUnavailableError, match=r"pip install 'fastlddmm\[keops\]'"):
            call()
    # "auto" falls back without error
    assert D._auto_nearest(*clouds(1000, 1000, 8)) is D._index_chunked
    assert torch.isfinite(D.sinkhorn(x, y, backend="auto"))


def test_backend_without_this_op_says_so(monkeypatch):
    x, y = clouds(5, 4, 3)
    monkeypatch.setattr(_backend, "require", lambda name, device=None: None)  # pretend "cpu" is built
    with pytest.raises(_backend.BackendUnavailableError, match="has no chamfer yet"):
        D.chamfer(x, y, backend="cpu")
    with pytest.raises(_backend.BackendUnavailableError, match="has no sinkhorn yet"):
        D.sinkhorn(x, y, backend="cpu")
