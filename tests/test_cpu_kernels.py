"""The C++ CPU kernels of issue 18 (backend "cpu": softmin, projection, nearest, euler_flow) against the
PyTorch twins: values and gradients, float32 / float64, odd sizes, batches, weights, p = 1 and 2, clouds far
from the origin, float64 gradcheck, K-NN indices, and results that do not depend on the thread count.

Tolerances (relative to the largest magnitude of the compared tensor; float32 results are compared with
the float64 reference of the same inputs, so the reference's own float32 rounding does not count):
  float64: 1e-11. The kernels' exp2 is accurate to ~5e-16 and every sum is kept per lane, then in double.
  float32, values: 2e-5; gradients: 1e-4. Sources: the float32 exp2 (< 3e-7 relative), the cost expanded
    as |x'|²/2 + |y'|²/2 - x'·y' on centred clouds (p = 2: absolute error ~ R² · 6e-8 / eps in an exponent,
    R the clouds' radius: ~1e-5 at R = 2, eps = 0.01), and float32 lane sums of up to ~10^3 terms.
"""

from __future__ import annotations

import pytest
import torch

import fastlddmm as fl
from fastlddmm import dispatch
from fastlddmm.ops import euler_flow
from fastlddmm.ops.flow import reference as flow_reference
from fastlddmm.ops.nearest import gather_distances
from fastlddmm.ops.nearest import reference as nearest_reference
from fastlddmm.ops.projection import reference as projection_reference
from fastlddmm.ops.softmin import reference as softmin_reference

pytestmark = pytest.mark.skipif(not dispatch.status("cpu"),
                                reason="fastlddmm._C is not built: pip install . with a C++ compiler builds it")

if dispatch.status("cpu"):
    from fastlddmm.ops.flow import cpu as flow_cpu
    from fastlddmm.ops.nearest import cpu as nearest_cpu
    from fastlddmm.ops.projection import cpu as projection_cpu
    from fastlddmm.ops.softmin import cpu as softmin_cpu

DTYPES = [(torch.float64, 1e-11, 1e-11), (torch.float32, 2e-5, 1e-4)]  # (dtype, values, gradients)
SIZES = [(1, 1), (7, 13), (1013, 7), (1, 1013), (1013, 517)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str, floor: float = 0.0) -> None:
    """|actual - expected| <= rel * max(max|expected|, floor) everywhere, NaN/Inf included; says where it
    fails. floor: the scale of the problem where the expected values can be exactly 0 (e.g. M = 1)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values at {(~torch.isfinite(actual)).nonzero()[:5].tolist()}"
    scale = expected.abs().max().clamp_min(max(floor, 1e-300))
    err = (actual - expected).abs()
    if not (err <= rel * scale).all():
        i = int(err.argmax())
        raise AssertionError(f"{what}: max error {float(err.max() / scale):.3g} (relative to max |expected| "
                             f"{float(scale):.3g}) > {rel:g} at flat index {i}: {float(actual.flatten()[i])!r} vs "
                             f"{float(expected.flatten()[i])!r}")


def clouds(batch, n, m, dim, dtype, offset=1e3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, dim, generator=g, dtype=torch.float64) + offset
    y = 0.8 * torch.randn(batch, m, dim, generator=g, dtype=torch.float64) + offset + 0.3
    return x.to(dtype), y.to(dtype)


# ------------------------------------------------------------------------------------------------
# Soft-min (+ its gradient in x) and the Sinkhorn solver on it
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rv, rg", DTYPES)
@pytest.mark.parametrize("n, m", SIZES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dim", [2, 3, 5])
def test_softmin_matches_reference(dtype, rv, rg, n, m, p, dim):
    x, y = clouds(2, n, m, dim, dtype)  # offset 1e3: the |x|² + |y|² - 2 x·y trap unless centred
    h = torch.randn(2, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    eps = 0.1 if p == 2 else 0.3
    xg = x.clone().requires_grad_()
    f = softmin_cpu.Softmin(p)(eps, softmin_cpu.Softmin(p).cost(xg, y), h)
    w = torch.randn(f.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (gx,) = torch.autograd.grad((f.double() * w).sum(), xg)
    x64 = x.double().requires_grad_()
    f64 = softmin_reference.softmin(eps, softmin_reference.cost_matrix(x64, y.double(), p), h.double())
    (g64,) = torch.autograd.grad((f64 * w).sum(), x64)
    assert f.dtype == dtype and gx.dtype == dtype
    assert_close(f, f64, rv, "soft-min values")
    assert_close(gx, g64, rg, "soft-min gradient in x")


def test_softmin_does_not_differentiate_y_or_h():
    x, y = clouds(1, 5, 6, 3, torch.float64, offset=0.0)
    h = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    f = softmin_cpu.softmin(0.1, x, y, h, 2)
    with pytest.raises(NotImplementedError, match="query points x only"):
        f.sum().backward()


def test_softmin_gradcheck_float64():
    x, y = clouds(2, 4, 5, 3, torch.float64, offset=0.0)
    h = torch.randn(2, 5, dtype=torch.float64)
    for p in (1, 2):
        assert torch.autograd.gradcheck(lambda xx: softmin_cpu.softmin(0.5, xx, y, h, p), (x.clone().requires_grad_(),))


@pytest.mark.parametrize("dtype, rv, rg", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias", [True, False])
def test_sinkhorn_matches_reference(dtype, rv, rg, p, debias):
    """fl.sinkhorn (the shared solver) with the cpu soft-min: weights, batch, gradients in x and y."""
    x, y = clouds(2, 300, 217, 3, dtype)
    g = torch.Generator().manual_seed(3)
    a = torch.rand(2, 300, generator=g, dtype=torch.float64).to(dtype)
    b = torch.rand(2, 217, generator=g, dtype=torch.float64).to(dtype)
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    value = fl.sinkhorn(xg, yg, a=a, b=b, p=p, blur=0.1, debias=debias, backend="cpu")
    grads = torch.autograd.grad(value.sum(), (xg, yg))
    x64, y64 = x.double().requires_grad_(), y.double().requires_grad_()
    expected = fl.sinkhorn(x64, y64, a=a.double(), b=b.double(), p=p, blur=0.1, debias=debias, backend="reference")
    expected_grads = torch.autograd.grad(expected.sum(), (x64, y64))
    assert_close(value, expected, rv, "Sinkhorn value")
    for got, want, name in zip(grads, expected_grads, ("x", "y")):
        assert_close(got, want, rg, f"Sinkhorn gradient in {name}")


def test_sinkhorn_unbatched_and_unbalanced():
    x, y = clouds(1, 50, 40, 3, torch.float64, offset=0.0)
    for reach in (None, 0.5):
        got = fl.sinkhorn(x[0], y[0], reach=reach, backend="cpu")
        want = fl.sinkhorn(x[0], y[0], reach=reach, backend="reference")
        assert got.shape == () and float(abs(got - want)) <= 1e-11 * float(abs(want))


# ------------------------------------------------------------------------------------------------
# Barycentric projection
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rv, rg", DTYPES)
@pytest.mark.parametrize("n, m", SIZES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dim", [2, 3, 4])
def test_projection_matches_reference(dtype, rv, rg, n, m, p, dim):
    x, y = clouds(2, n, m, dim, dtype)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, m, generator=g, dtype=torch.float64)
    v = torch.randn(2, m, dim, generator=g, dtype=torch.float64)
    eps = 0.2
    inputs = [t.to(dtype).clone().requires_grad_() for t in (x, h, v)]
    out = projection_cpu.softmax_weighted_sum(eps, inputs[0], y, inputs[1], inputs[2], p)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * w).sum(), inputs)
    ref = [t.double().clone().requires_grad_() for t in (x, h, v)]
    out64 = projection_reference.softmax_weighted_sum(eps, ref[0], y.double(), ref[1], ref[2], p)
    ref_grads = torch.autograd.grad((out64 * w).sum(), ref)
    assert_close(out, out64, rv, "projection values")
    for got, want, name in zip(grads, ref_grads, ("x", "h", "v")):
        assert got.dtype == dtype
        assert_close(got, want, rg, f"projection gradient in {name}", floor=1.0)  # M = 1: grad x is 0


def test_projection_gradcheck_float64():
    x, y = clouds(2, 4, 5, 3, torch.float64, offset=0.0)
    h = torch.randn(2, 5, dtype=torch.float64)
    v = torch.randn(2, 5, 3, dtype=torch.float64)
    for p in (1, 2):
        assert torch.autograd.gradcheck(
            lambda xx, hh, vv: projection_cpu.softmax_weighted_sum(0.5, xx, y, hh, vv, p),
            tuple(t.clone().requires_grad_() for t in (x, h, v)))


def test_sinkhorn_projection_matches_reference():
    x, y = clouds(1, 120, 90, 3, torch.float64)
    xg, yg = x[0].clone().requires_grad_(), y[0].clone().requires_grad_()
    got = fl.sinkhorn_projection(xg, yg, backend="cpu")
    grads = torch.autograd.grad(got.square().sum(), (xg, yg))
    xr, yr = x[0].clone().requires_grad_(), y[0].clone().requires_grad_()
    want = fl.reference.sinkhorn_projection(xr, yr)
    want_grads = torch.autograd.grad(want.square().sum(), (xr, yr))
    assert_close(got, want, 1e-11, "projection")
    for a, b, name in zip(grads, want_grads, ("x", "y")):
        assert_close(a, b, 1e-9, f"projection gradient in {name}")


# ------------------------------------------------------------------------------------------------
# Nearest neighbours
# ------------------------------------------------------------------------------------------------


def check_knn(x, y, k, norm, x_lengths=None, y_lengths=None):
    """Indices exact except on ties: wherever they differ from the reference's, the distances at the
    returned indices are the reference's (same formula, same dtype: equal up to the last bits)."""
    got = nearest_cpu.knn_index(x, y, k, norm, x_lengths, y_lengths)
    want = nearest_reference.knn_index(x, y, k, norm, x_lengths, y_lengths)
    assert got.dtype == torch.int64 and got.shape == want.shape
    d_got = gather_distances(x, y, got, norm)
    d_want = gather_distances(x, y, want, norm)
    batch, n = x.shape[:2]
    xl = [n] * batch if x_lengths is None else x_lengths.tolist()
    yl = [y.shape[1]] * batch if y_lengths is None else y_lengths.tolist()
    for b in range(batch):
        kk = min(k, yl[b])
        assert (got[b, xl[b]:] == 0).all() and (got[b, :, kk:] == 0).all(), "padded places must hold 0"
        if xl[b] == 0 or kk == 0:
            continue
        g, w = got[b, : xl[b], :kk], want[b, : xl[b], :kk]
        dg, dw = d_got[b, : xl[b], :kk], d_want[b, : xl[b], :kk]
        assert (g < yl[b]).all() and (g >= 0).all()
        tol = 1e-6 if x.dtype == torch.float32 else 1e-13
        assert torch.allclose(dg, dw, rtol=tol, atol=tol * float(dw.abs().max().clamp_min(1))), "distances differ"
        differ = g != w
        # a differing index is a tie: same distance as the reference's neighbour of that rank
        assert torch.allclose(dg[differ], dw[differ], rtol=tol, atol=0), "a differing index that is not a tie"
        assert (dg[:, 1:] >= dg[:, :-1]).all(), "neighbours must be sorted by distance"
        srt = g.sort(dim=1).values  # no neighbour twice
        assert (srt[:, 1:] != srt[:, :-1]).all(), "a neighbour returned twice"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, m", SIZES)
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("dim", [2, 3, 7])
def test_knn_matches_reference(dtype, n, m, k, norm, dim):
    x, y = clouds(2, n, m, dim, dtype)
    check_knn(x, y, k, norm)


@pytest.mark.parametrize("norm", [1, 2])
def test_knn_deep_tree(norm):
    """40,000 reference points: a tree of 11 levels, searched across many cells."""
    x, y = clouds(1, 2000, 40000, 3, torch.float32)
    check_knn(x, y, 3, norm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_batched_with_lengths(dtype):
    x, y = clouds(3, 1013, 517, 3, dtype)
    x_lengths = torch.tensor([1013, 1, 0])
    y_lengths = torch.tensor([3, 517, 200])  # 3 < k: only 3 neighbours, the rest 0
    for norm in (1, 2):
        check_knn(x, y, 5, norm, x_lengths, y_lengths)


def test_knn_ties_duplicates_and_surfaces():
    """Clouds that break grids and naive trees: an integer grid (ties everywhere), every point 50 times
    (duplicates), and a thin sphere surface with a dense blob. Exact (up to ties) in all of them."""
    g = torch.Generator().manual_seed(5)
    grid = torch.stack(torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij"), -1).reshape(1, -1, 3)
    check_knn(grid + 0.5 * (torch.rand(grid.shape, generator=g) > 0.5), grid, 3, 2)
    dup = torch.rand(1, 40, 3, generator=g).repeat_interleave(50, dim=1)
    check_knn(torch.rand(1, 500, 3, generator=g), dup, 2, 2)
    s = torch.randn(1, 20000, 3, generator=g)
    sphere = torch.cat([s / s.norm(dim=-1, keepdim=True), 1e-3 * torch.randn(1, 5000, 3, generator=g)], 1)
    check_knn(sphere[:, ::7] * 1.01, sphere, 1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chamfer_with_lengths_matches_reference(dtype):
    x, y = clouds(2, 1013, 700, 3, dtype)
    xl, yl = torch.tensor([1013, 300]), torch.tensor([650, 700])
    xg = x.clone().requires_grad_()
    got = fl.chamfer(xg, y, x_lengths=xl, y_lengths=yl, backend="cpu")
    (g,) = torch.autograd.grad(got.sum(), xg)
    xr = x.clone().requires_grad_()
    want = fl.reference.chamfer(xr, y, xl, yl)
    (gr,) = torch.autograd.grad(want.sum(), xr)
    rel = 1e-5 if dtype == torch.float32 else 1e-12
    assert_close(got, want, rel, "Chamfer")
    assert_close(g, gr, rel, "Chamfer gradient")


# ------------------------------------------------------------------------------------------------
# The flow: the register-blocked paths (D = 2, 3) and the generic one
# ------------------------------------------------------------------------------------------------


def flow_params(layers, width, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(layers, width, dim), (layers, width), (layers, dim, width), (layers, dim)]
    scales = [0.5, 0.5, 0.3, 0.1]
    return [(s * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype) for shape, s in zip(shapes, scales)]


@pytest.mark.parametrize("dtype, rv, rg", [(torch.float64, 1e-11, 1e-11), (torch.float32, 1e-5, 1e-5)])
@pytest.mark.parametrize("n", [1, 7, 1013])
@pytest.mark.parametrize("dim", [2, 3, 5])
@pytest.mark.parametrize("activation", ["relu", "tanh", "softplus"])
def test_flow_matches_reference(dtype, rv, rg, n, dim, activation):
    """float32 against the float32 twin (same operations, different order): 1e-5 of the largest value."""
    params = [p.requires_grad_() for p in flow_params(4, 37, dim, dtype)]
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(n, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    results = []
    for backend in ("cpu", "reference"):
        xf, energy = (euler_flow(x, *params, 0.25, activation, backend="cpu") if backend == "cpu"
                      else flow_reference.euler_flow(x, *params, 0.25, activation))
        grads = torch.autograd.grad((xf * w).sum() + 3.0 * energy, [x, *params])
        results.append((xf, energy, grads))
    (xf, e, g), (xf_r, e_r, g_r) = results
    assert_close(xf, xf_r, rv, "x_final")
    assert_close(e, e_r, rv, "energy")
    for a, b, name in zip(g, g_r, ("x", "weight1", "bias1", "weight2", "bias2")):
        assert_close(a, b, rg, f"gradient in {name}")


def test_flow_gradcheck_float64():
    for dim in (3, 4):
        params = [p.requires_grad_() for p in flow_params(2, 5, dim, torch.float64)]
        x = torch.randn(9, dim, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda *a: tuple(euler_flow(a[0], *a[1:], 0.5, "tanh", backend="cpu")), (x, *params))


def test_flow_kinetic_sum_contract():
    """The launcher's raw S = Σ_l Σ_i |v|² (float64), and backward taking dLoss/dS."""
    params = flow_params(3, 16, 3, torch.float32)
    x = torch.randn(100, 3)
    _, states, kinetic = flow_cpu.forward(x, *params, 0.1, "relu")
    assert states.shape == (0, 100, 3)  # nothing saved: the backward recomputes the layers from x
    assert kinetic.dtype == torch.float64 and kinetic.shape == ()
    xs, s = x.double(), 0.0
    for layer in range(3):
        v = flow_reference.velocity(xs, *(p.double()[layer] for p in params), "relu")
        s += float(v.square().sum())
        xs = xs + 0.1 * v
    assert abs(float(kinetic) - s) <= 1e-5 * s
    grads = flow_cpu.backward(torch.zeros_like(x), torch.tensor(1.0, dtype=torch.float64), x[None], *params, 0.1, "relu")
    assert all(torch.isfinite(t).all() for t in grads) and float(grads[1].abs().sum()) > 0


# ------------------------------------------------------------------------------------------------
# Threads: the same bits with one thread and with two
# ------------------------------------------------------------------------------------------------


def _with_threads(count, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _flat(result):
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for r in result for t in _flat(r)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_thread_count(dtype):
    """Sizes large enough that the kernels do split the work between two threads (see threads_for)."""
    x, y = clouds(1, 1500, 1300, 3, dtype, offset=1.0)
    h = torch.randn(1, 1300, dtype=torch.float64).to(dtype)
    v = torch.randn(1, 1300, 3, dtype=torch.float64).to(dtype)
    params = [p.requires_grad_() for p in flow_params(4, 37, 3, dtype)]
    params5 = [p.requires_grad_() for p in flow_params(3, 20, 5, dtype)]
    big_x, big_y = clouds(1, 12000, 11000, 3, dtype, offset=0.0)

    def softmin():
        xg = x.clone().requires_grad_()
        f = softmin_cpu.softmin(0.05, xg, y, h, 2)
        return f, torch.autograd.grad(f.sum(), xg)

    def projection():
        ins = [t.clone().requires_grad_() for t in (x, h, v)]
        out = projection_cpu.softmax_weighted_sum(0.05, ins[0], y, ins[1], ins[2], 1)
        return out, torch.autograd.grad(out.square().sum(), ins)

    def flow(ps, dim):
        xs = torch.randn(5003, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
        xs.requires_grad_()
        xf, e = euler_flow(xs, *ps, 0.25, "relu", backend="cpu")
        return xf, e, torch.autograd.grad(xf.square().sum() + e, [xs, *ps])

    cases = {"softmin": softmin, "projection": projection, "flow D=3": lambda: flow(params, 3),
             "flow D=5": lambda: flow(params5, 5),
             "knn": lambda: nearest_cpu.knn_index(big_x, big_y, 3, 2)}
    for name, fn in cases.items():
        one, two = _flat(_with_threads(1, fn)), _flat(_with_threads(2, fn))
        for a, b in zip(one, two):
            assert torch.equal(a, b), f"{name}: one thread and two threads differ"


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------


def test_auto_picks_cpu_on_cpu_tensors():
    x = torch.rand(50, 3)
    for op in ("softmin", "projection", "nearest"):
        assert dispatch.choose(op, "auto", dispatch.problem(x, x)) == "cpu"
        # float16 is not a kernel dtype: auto falls back without an error
        assert dispatch.choose(op, "auto", dispatch.problem(x.half(), x.half())) != "cpu"
    assert dispatch.choose("nearest", "auto", dispatch.problem(torch.rand(50, 70), torch.rand(50, 70))) != "cpu"
    with pytest.raises(dispatch.BackendUnavailableError, match="D <= 64"):
        dispatch.choose("nearest", "cpu", dispatch.problem(torch.rand(5, 70), torch.rand(5, 70)))
