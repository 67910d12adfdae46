"""fastlddmm.compat against the libraries it stands in for.

* SamplesLoss against the real GeomLoss (the oracle): every loss, both call forms, batched and not,
  values, gradients and potentials.
* SamplesLoss("hausdorff"), which GeomLoss documents but cannot run (geomloss#70): against a dense twin of
  its authors' definition (values, gradients through the unrolled fixed point), float64 gradcheck, its
  two limits (the ICP loss; the kernel distance, GeomLoss's own "energy" for p = 1), symmetry and
  positivity, on every soft-min backend of the dispatch table.
* knn_points / knn_gather / chamfer_distance against a brute-force twin of pytorch3d 0.7.9's semantics,
  written below from pytorch3d/ops/knn.py and pytorch3d/loss/chamfer.py (pytorch3d has no CPU wheel,
  so it cannot be the oracle here): loops over clouds and points, no shared code with the implementation
  under test; a minimal stand-in for pytorch3d's Pointclouds; empty inputs; pytorch3d's exception types
  and messages (its own tests' regexes).
* A GeomLoss training script whose import line is swapped gives the same loss curve.

KeOps compiles one formula per reduction, dtype and dimension on first use (~15-30 s each on a
CPU), so the KeOps tests use float64, D = 3 and few formulas.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import Tensor

from fastlddmm import dispatch
from fastlddmm import chamfer as fl_chamfer
from fastlddmm.compat import KNN, SamplesLoss, chamfer_distance, knn_gather, knn_points
from conftest import assert_close

geomloss = pytest.importorskip("geomloss", reason="needs geomloss (pip install 'fastlddmm[test]') as the oracle")

needs_keops = pytest.mark.skipif(
    not dispatch.status("keops").available,
    reason="needs pykeops and a C++ compiler: pip install 'fastlddmm[keops]'",
)

# float64: same algorithm and arithmetic up to how the cost matrix is formed (GeomLoss: |x|² + |y|²
# - 2x·y, ours: differences), ~1e-15 relative, amplified a little by the Sinkhorn iterations.
# float32: that same difference is ~1e-7·|x|² per cost entry; Sinkhorn divides costs by eps = blur^p
# (0.05² = 2.5e-3 at the default blur), so potentials and gradients move by ~1e-7·|x|²/eps ~ 1e-4.
TOL = {torch.float64: (1e-9, 1e-11), torch.float32: (2e-4, 2e-4)}


def _points(*shape: int, dtype=torch.float64, seed: int = 0, shift: float = 0.0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) + shift).to(dtype)


def _weights(*shape: int, dtype=torch.float64, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.2
    return (w / w.sum(-1, keepdim=True)).to(dtype)  # equal total masses: balanced OT is well posed


# ================================================================================================
# SamplesLoss against GeomLoss
# ================================================================================================

CONFIGS = [
    ("sinkhorn", {}),
    ("sinkhorn", {"p": 1, "blur": 0.1}),
    ("sinkhorn", {"blur": 0.1, "reach": 0.5}),
    ("sinkhorn", {"blur": 0.2, "debias": False, "scaling": 0.7}),
    ("energy", {}),
    ("gaussian", {"blur": 0.5}),
    ("laplacian", {"blur": 0.5}),
]


def _inputs(form: str, batched: bool, dtype):
    """(args for the call, the tensors to differentiate): x (B?, 7, 3), y (B?, 5, 3), weights."""
    lead = (2,) if batched else ()
    x = _points(*lead, 7, 3, dtype=dtype, seed=1).requires_grad_()
    y = _points(*lead, 5, 3, dtype=dtype, seed=2, shift=0.5).requires_grad_()
    if form == "xy":
        return (x, y), (x, y)
    a = _weights(*lead, 7, dtype=dtype, seed=3).requires_grad_()
    b = _weights(*lead, 5, dtype=dtype, seed=4).requires_grad_()
    return (a, x, b, y), (a, x, b, y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("form", ["xy", "axby"])
@pytest.mark.parametrize("loss,kw", CONFIGS)
def test_samples_loss_matches_geomloss(loss, kw, form, batched, dtype):
    rtol, atol = TOL[dtype]
    args, wrt = _inputs(form, batched, dtype)
    got = SamplesLoss(loss, **kw)(*args)
    want = geomloss.SamplesLoss(loss, **kw)(*args)
    assert got.shape == want.shape == ((2,) if batched else ())
    assert got.dtype == want.dtype
    assert_close(got, want, rtol=rtol, atol=atol, name=f"{loss} value")
    v = torch.linspace(0.5, 1.5, got.numel(), dtype=dtype).reshape(got.shape)  # distinct weights per item
    g_got = torch.autograd.grad((got * v).sum(), wrt)
    g_want = torch.autograd.grad((want * v).sum(), wrt)
    for name, g, h in zip("axby" if form == "axby" else "xy", g_got, g_want):
        scale = h.abs().max().item()
        assert_close(g, h, rtol=rtol, atol=atol * max(1.0, scale), name=f"{loss} d/d{name}")


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("loss,kw", CONFIGS)
def test_samples_loss_potentials_match_geomloss(loss, kw, batched):
    args, _ = _inputs("axby", batched, torch.float64)
    f, g = SamplesLoss(loss, potentials=True, **kw)(*args)
    f0, g0 = geomloss.SamplesLoss(loss, potentials=True, **kw)(*args)
    # GeomLoss returns (1, N), (1, M) potentials for plain (N, D) inputs (it adds a batch axis first).
    lead = () if batched else (1,)
    assert f.shape == f0.shape == lead + args[0].shape and g.shape == g0.shape == lead + args[2].shape
    assert_close(f, f0, rtol=1e-9, atol=1e-11, name="F")
    assert_close(g, g0, rtol=1e-9, atol=1e-11, name="G")


def test_column_weights_and_default_repr():
    """GeomLoss also takes (N, 1) / (B, N, 1) weights; the output shapes follow the flattened weights."""
    (a, x, b, y), _ = _inputs("axby", True, torch.float64)
    got = SamplesLoss("sinkhorn", blur=0.1)(a[..., None], x, b[..., None], y)
    want = geomloss.SamplesLoss("sinkhorn", blur=0.1)(a[..., None], x, b[..., None], y)
    assert_close(got, want, rtol=1e-9, atol=1e-11)
    f, _ = SamplesLoss("gaussian", potentials=True)(a[0, :, None], x[0], b[0, :, None], y[0])
    f0, _ = geomloss.SamplesLoss("gaussian", potentials=True)(a[0, :, None], x[0], b[0, :, None], y[0])
    assert f.shape == f0.shape == (1, 7)
    assert "sinkhorn" in repr(SamplesLoss())


def test_geomloss_backend_names_map_to_ours():
    """tensorized = reference = auto on small inputs; truncate is ignored where GeomLoss ignores it."""
    args, _ = _inputs("axby", False, torch.float64)
    want = geomloss.SamplesLoss("sinkhorn", blur=0.1, backend="tensorized")(*args)
    for backend in ("auto", "tensorized", "reference"):
        assert_close(SamplesLoss("sinkhorn", blur=0.1, backend=backend)(*args), want, rtol=1e-9, atol=1e-11)
    got = SamplesLoss("sinkhorn", blur=0.1, truncate=3, backend="tensorized")(*args)
    assert_close(got, geomloss.SamplesLoss("sinkhorn", blur=0.1, truncate=3, backend="tensorized")(*args),
                 rtol=1e-9, atol=1e-11)
    got = SamplesLoss("energy", truncate=None)(*args)  # exact truncate=None is the default behaviour
    assert_close(got, geomloss.SamplesLoss("energy", truncate=None)(*args), rtol=1e-9, atol=1e-11)


@needs_keops
@pytest.mark.parametrize("loss", ["energy", "gaussian", "laplacian"])
def test_kernel_losses_online_keops_match_geomloss(loss):
    """backend="online" runs our KeOps reductions: same values, gradients and potentials as GeomLoss's
    tensorized backend (one compiled formula for the three kernels, float64, D = 3)."""
    args, wrt = _inputs("axby", True, torch.float64)
    got = SamplesLoss(loss, blur=0.5, backend="online")(*args)
    want = geomloss.SamplesLoss(loss, blur=0.5, backend="tensorized")(*args)
    assert_close(got, want, rtol=1e-10, atol=1e-12, name="value")
    for name, g, h in zip("axby", torch.autograd.grad(got.sum(), wrt), torch.autograd.grad(want.sum(), wrt)):
        assert_close(g, h, rtol=1e-10, atol=1e-12, name=f"d/d{name}")
    f, g = SamplesLoss(loss, blur=0.5, potentials=True, backend="online")(*args)
    f0, g0 = geomloss.SamplesLoss(loss, blur=0.5, potentials=True, backend="tensorized")(*args)
    assert_close(f, f0, rtol=1e-10, atol=1e-12, name="F")
    assert_close(g, g0, rtol=1e-10, atol=1e-12, name="G")
    if loss == "energy":  # GeomLoss's multiscale never truncates the energy distance: exact, on KeOps
        assert_close(SamplesLoss(loss, backend="multiscale")(*args), want, rtol=1e-10, atol=1e-12)


@needs_keops
def test_kernel_losses_auto_switches_to_keops_for_large_clouds(monkeypatch):
    monkeypatch.setattr(dispatch, "KERNEL_DENSE_MAX_ENTRIES", 10)
    args, _ = _inputs("axby", True, torch.float64)
    loss = SamplesLoss("gaussian", blur=0.5)
    assert dispatch.choose("kernel_sum", "auto", dispatch.problem(args[1], args[3])) == "keops"
    assert_close(loss(*args), geomloss.SamplesLoss("gaussian", blur=0.5)(*args), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "backend,expected", [("auto", "auto"), ("tensorized", "reference"), ("online", "keops"), ("keops", "keops")]
)
def test_sinkhorn_backend_names_reach_fl_sinkhorn(monkeypatch, backend, expected):
    """GeomLoss's backend names arrive at fl.sinkhorn / fl.sinkhorn_potentials as ours. (The KeOps
    Sinkhorn itself is checked against the reference in test_keops.py, the reference against GeomLoss
    above: this avoids compiling the same KeOps formulas twice.)"""
    import fastlddmm.compat.geomloss as compat_geomloss

    seen = []
    monkeypatch.setattr(compat_geomloss, "_fl_sinkhorn", lambda x, y, **kw: seen.append(kw) or x.new_zeros(()))
    monkeypatch.setattr(compat_geomloss, "_fl_sinkhorn_potentials",
                        lambda x, y, **kw: seen.append(kw) or (x.new_zeros(x.shape[0]), y.new_zeros(y.shape[0])))
    args, _ = _inputs("axby", False, torch.float64)
    SamplesLoss("sinkhorn", p=1, blur=0.3, reach=2.0, scaling=0.8, debias=False, backend=backend)(*args)
    f, g = SamplesLoss("sinkhorn", potentials=True, backend=backend)(*args)
    assert f.shape == (1, 7) and g.shape == (1, 5)
    assert seen[0] == dict(a=args[0], b=args[2], blur=0.3, p=1, scaling=0.8, reach=2.0, debias=False, backend=expected)
    assert seen[1]["backend"] == expected


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"cost": "SqDist(X,Y) / IntCst(2)"}, "cost="),
        ({"cost": lambda x, y: ((x[:, :, None] - y[:, None]) ** 2).sum(-1)}, "cost="),
        ({"loss": "gaussian", "kernel": lambda x, y, **kw: x @ y.transpose(-1, -2)}, "kernel="),
        ({"cluster_scale": 0.1}, "cluster_scale="),
        ({"truncate": 3}, "truncate="),
        ({"loss": "gaussian", "truncate": 3, "backend": "multiscale"}, 'backend="multiscale"'),
        ({"backend": "multiscale"}, 'backend="multiscale"'),
        ({"diameter": 2.0}, "diameter="),
        ({"loss": "hausdorff", "reach": 0.5}, "reach="),
        ({"loss": "hausdorff", "potentials": True}, "potentials=True"),
        ({"loss": "hausdorff", "backend": "multiscale"}, 'backend="multiscale"'),
    ],
)
def test_unsupported_options_raise_naming_them(kwargs, option):
    with pytest.raises(NotImplementedError, match=option.replace("(", r"\(")):
        SamplesLoss(**kwargs)


def test_bad_arguments_raise():
    x, y = _points(7, 3), _points(5, 3)
    with pytest.raises(ValueError, match="loss must be one of"):
        SamplesLoss("wasserstein")
    with pytest.raises(ValueError, match="backend must be one of"):
        SamplesLoss(backend="cuda")
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        SamplesLoss(p=3)
    with pytest.raises(NotImplementedError, match="six-argument form"):
        SamplesLoss()(torch.zeros(7), torch.ones(7) / 7, x, torch.zeros(5), torch.ones(5) / 5, y)
    with pytest.raises(ValueError, match="two .* or four"):
        SamplesLoss()(x)
    with pytest.raises(ValueError, match="α must have shape"):
        SamplesLoss("energy")(torch.ones(6) / 6, x, torch.ones(5) / 5, y)


def test_geomloss_hausdorff_is_still_broken_upstream():
    """Why "hausdorff" has no GeomLoss oracle: GeomLoss's own SamplesLoss("hausdorff") fails on every call
    (jeanfeydy/geomloss#70). If this starts passing through, compare ours against the new oracle."""
    with pytest.raises(KeyError):
        geomloss.SamplesLoss("hausdorff")(_points(7, 3), _points(5, 3))


# ================================================================================================
# SamplesLoss("hausdorff"): the authors' definition, against a dense twin, its limits and properties
# ================================================================================================


def twin_hausdorff(a, x, b, y, blur, p, steps=300):
    """H_eps(α, β) = ½ (<α, b(x) - a(x)> + <β, a(y) - b(y)>), a the fixed point of
    a(x_i) = smin_{eps, k~α}[C(x_i, x_k) - a_k] (Feydy & Trouvé 2018; Feydy et al. 2019; the authors'
    global-divergences ``hausdorff_divergence``), for one (N, D), (M, D) pair: dense matrices, a plain
    averaged fixed-point iteration from 0 at the final eps (no ε-scaling), unrolled for autograd.
    Converges at rate <= 1/2 per step (checked below), so 300 steps are exact to rounding."""
    eps = blur**p

    def cost(u, v):
        d2 = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        return d2 / 2 if p == 2 else d2.clamp_min(1e-8).sqrt()

    def smin(w, f, c):  # -eps log Σ_k w_k exp((f_k - c_ik) / eps)
        return -eps * (w.log()[None, :] + (f[None, :] - c) / eps).logsumexp(1)

    def potential(w, z):
        f, c = torch.zeros_like(w), cost(z, z)
        for _ in range(steps):
            f, last = 0.5 * (f + smin(w, f, c)), f
        assert (f - last).abs().max() <= 1e-12 * (1 + f.abs().max()), "twin potential did not converge"
        return f

    fa, fb = potential(a, x), potential(b, y)
    a_x, a_y = smin(a, fa, cost(x, x)), smin(a, fa, cost(y, x))
    b_y, b_x = smin(b, fb, cost(y, y)), smin(b, fb, cost(x, y))
    return 0.5 * ((a * (b_x - a_x)).sum() + (b * (a_y - b_y)).sum())


def _hausdorff_inputs(lead, n, m, d=3, dtype=torch.float64, seed=20):
    x = _points(*lead, n, d, dtype=dtype, seed=seed).requires_grad_()
    y = _points(*lead, m, d, dtype=dtype, seed=seed + 1, shift=0.5).requires_grad_()
    a = _weights(*lead, n, dtype=dtype, seed=seed + 2).requires_grad_()
    b = _weights(*lead, m, dtype=dtype, seed=seed + 3).requires_grad_()
    return a, x, b, y


def _twin_batched(a, x, b, y, blur, p):
    if x.dim() == 2:
        return twin_hausdorff(a, x, b, y, blur, p)
    return torch.stack([twin_hausdorff(a[k], x[k], b[k], y[k], blur, p) for k in range(x.shape[0])])


# float64: same formula and fixed point (ours converged to 8 ulp), measured <= 1e-15. float32 against the
# float64 twin: values ~1e-7 relative (soft-min rounding, ~ulp·max C); gradients ~ulp·max C / eps, measured
# <= 3e-5 relative at eps = 0.05² (the reconstruction exp((f0 - f) / eps) of the implicit solve).
H_TOL = {torch.float64: (1e-11, 1e-12), torch.float32: (1e-4, 1e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("p,blur", [(2, 0.05), (2, 0.7), (1, 0.1), (1, 3.0)])
@pytest.mark.parametrize("lead,n,m", [((), 7, 5), ((2,), 7, 5), ((), 1, 4), ((2,), 13, 1)])
def test_hausdorff_matches_dense_twin(lead, n, m, p, blur, dtype):
    rtol, atol = H_TOL[dtype]
    a, x, b, y = _hausdorff_inputs(lead, n, m, dtype=dtype)
    got = SamplesLoss("hausdorff", p=p, blur=blur)(a, x, b, y)
    leaves = [t.detach().double().requires_grad_() for t in (a, x, b, y)]  # the twin in float64
    want = _twin_batched(*leaves, blur, p)
    assert got.shape == want.shape == lead and got.dtype == dtype
    assert_close(got, want.to(dtype), rtol=rtol, atol=atol, name="H value")
    v = torch.linspace(0.5, 1.5, got.numel(), dtype=torch.float64).reshape(lead)  # distinct weights per item
    g_got = torch.autograd.grad((got * v.to(dtype)).sum(), (a, x, b, y))
    g_want = torch.autograd.grad((want * v).sum(), leaves)  # autograd through the unrolled fixed point
    if dtype == torch.float32:
        # Gradients carry the soft-min's rounding (~ulp · max C) divided by eps, through the implicit solve; with
        # the C++ soft-min's polynomial exp2 (auto's pick on CPU) that reached 2.2e-4 at blur 0.05 (eps = 0.0025,
        # max C ~ 3): bound it by 4 · ulp · max C / eps.
        c_max = float((x.detach().double()[..., :, None, :] - y.detach().double()[..., None, :, :]).norm(dim=-1).max())
        c_max = c_max**p / p
        rtol = max(rtol, 4 * torch.finfo(torch.float32).eps * c_max / blur**p)
    for name, g, h in zip("axby", g_got, g_want):
        scale = max(1.0, h.abs().max().item())
        assert_close(g, h.to(dtype), rtol=rtol, atol=rtol * 0.1 * scale, name=f"dH/d{name}")
@pytest.mark.parametrize("blur", [0.5, 0.01])
def test_hausdorff_zero_weights(blur):
    """A zero-weight point is absent: value and gradients are those of the clouds without it (the twin),
    and finite even where its own α-derivative overflows (blur = 0.01: H ~ -eps log(1 + δ v) in the mass
    δ added there, whose slope at 0 is huge). At blur = 0.5 that derivative is the one-sided difference's."""
    a, x, b, y = _hausdorff_inputs((), 7, 5, seed=20)
    a = a.detach().clone()
    a[2] = 0.0
    a = (a / a.sum()).requires_grad_()
    loss = SamplesLoss("hausdorff", blur=blur)
    h = loss(a, x, b, y)
    got = torch.autograd.grad(h, (a, x, b, y))
    keep = [0, 1, 3, 4, 5, 6]
    leaves = [a.detach()[keep].requires_grad_(), x.detach()[keep].requires_grad_(), b.detach().requires_grad_(),
              y.detach().requires_grad_()]
    want = twin_hausdorff(*leaves, blur, 2)
    assert_close(h, want, rtol=1e-12, atol=1e-13, name="H")
    g_want = torch.autograd.grad(want, leaves)
    for name, g, w in (("a", got[0][keep], g_want[0]), ("x", got[1][keep], g_want[1]), ("b", got[2], g_want[2]),
                       ("y", got[3], g_want[3])):
        assert_close(g, w, rtol=1e-10, atol=1e-11, name=f"dH/d{name}")
    assert not got[1][2].any()  # a point without mass has no gradient
    if blur == 0.5:
        delta = 1e-7
        moved = a.detach().clone()
        moved[2] = delta
        slope = ((loss(moved, x, b, y) - h) / delta).item()
        assert math.isclose(got[0][2].item(), slope, rel_tol=1e-4), (got[0][2].item(), slope)


def test_hausdorff_large_odd_clouds():
    """1000 + 13 against 517 points (float64, values; the twin without autograd)."""
    a, x, b, y = (t.detach() for t in _hausdorff_inputs((), 1013, 517, seed=25))
    got = SamplesLoss("hausdorff", blur=0.1)(a, x, b, y)
    with torch.no_grad():
        want = twin_hausdorff(a, x, b, y, 0.1, 2, steps=50)  # converged: checked inside
    assert_close(got, want, rtol=1e-11, atol=1e-12, name="H, 1013 points")


@pytest.mark.parametrize("p", [1, 2])
def test_hausdorff_gradcheck(p):
    """float64 finite differences in the weights and points, batched (the value is a function of (α, x,
    β, y) alone because the potentials are converged, not just annealed)."""
    a, x, b, y = _hausdorff_inputs((2,), 4, 3, d=2, seed=30)
    loss = SamplesLoss("hausdorff", p=p, blur=0.4)
    assert torch.autograd.gradcheck(lambda *t: loss(*t), (a, x, b, y), eps=1e-6, atol=1e-7, rtol=1e-6)


def _icp(a, x, b, y, p):  # ½ <α, min_j C(·, y_j)> + ½ <β, min_i C(x_i, ·)>, C = |x - y|^p / p
    d2 = ((x[:, None] - y[None]) ** 2).sum(-1)
    c = d2 / 2 if p == 2 else d2.clamp_min(1e-8).sqrt()
    return 0.5 * ((a * c.min(1).values).sum() + (b * c.min(0).values).sum())


@pytest.mark.parametrize("p", [1, 2])
def test_hausdorff_small_blur_is_the_icp_loss(p):
    """blur -> 0: H_eps -> ½ <α, d(·, y)> + ½ <β, d(·, x)> (the ICP / Chamfer loss with cost C), within
    eps·log(N M) (a soft-min over m points is within eps·log(1 / min weight) of the min). For p = 1 the
    1e-4 floor of the distances (C(x, x) = 1e-4) shifts the limit by -1e-4 (a -> C(x, x) / 2 on each side)."""
    (a, x, b, y), n, m = _hausdorff_inputs((), 9, 6, seed=40), 9, 6
    floor = 1e-4 if p == 1 else 0.0
    limit = _icp(a, x, b, y, p) - floor
    for blur in (1e-2, 1e-3) if p == 2 else (1e-3, 1e-4):
        eps = blur**p
        h = SamplesLoss("hausdorff", p=p, blur=blur)(a, x, b, y)
        assert abs(h.item() - limit.item()) <= eps * math.log(n * m), (blur, h.item(), limit.item())
    # uniform weights, p = 2: a quarter of pytorch3d's chamfer_distance (squared L2, means, both directions)
    h = SamplesLoss("hausdorff", p=2, blur=1e-3)(x, y)
    cham, _ = chamfer_distance(x[None], y[None])
    assert math.isclose(h.item(), cham.item() / 4, rel_tol=0, abs_tol=1e-6 * math.log(n * m))


@pytest.mark.parametrize("p", [1, 2])
def test_hausdorff_large_blur_is_the_kernel_distance(p):
    """blur -> ∞: H_eps -> ½ ||α - β||²_{-C} (unit masses): GeomLoss's own "energy" distance for p = 1
    (the oracle: same floored |x - y|), ½ |mean(α) - mean(β)|² for p = 2. The gap is first order in
    1/eps: multiplying eps by 10 divides it by 10 (checked to 5%), and it is below max(C)²/eps."""
    a, x, b, y = (t.detach() for t in _hausdorff_inputs((), 8, 6, seed=50))
    if p == 1:
        limit = geomloss.SamplesLoss("energy")(a, x, b, y).item()
    else:
        limit = 0.5 * ((a[:, None] * x).sum(0) - (b[:, None] * y).sum(0)).pow(2).sum().item()
    xy = torch.cat([x, y])
    c_max = (((xy[:, None] - xy[None]) ** 2).sum(-1).max().item() / 2) if p == 2 else torch.cdist(xy, xy).max().item()
    eps1 = 1e3 if p == 1 else 1e4  # large, yet eps·1e-16 (the soft-min rounding) stays below 1e-11
    gaps = []
    for eps in (eps1, 10 * eps1):
        h = SamplesLoss("hausdorff", p=p, blur=eps ** (1 / p))(a, x, b, y).item()
        gaps.append(h - limit)
        assert abs(h - limit) <= c_max**2 / eps
    assert gaps[0] != 0 and math.isclose(gaps[0] / gaps[1], 10.0, rel_tol=0.05), gaps


@pytest.mark.parametrize("p,blur", [(2, 0.05), (2, 1.0), (1, 0.2)])
def test_hausdorff_symmetric_positive_definite(p, blur):
    """H(α, β) = H(β, α) >= 0, = 0 (to rounding) when α = β, for probability measures."""
    loss = SamplesLoss("hausdorff", p=p, blur=blur)
    a, x, b, y = (t.detach() for t in _hausdorff_inputs((4,), 11, 7, seed=60))
    h, h_swapped = loss(a, x, b, y), loss(b, y, a, x)
    assert_close(h, h_swapped, rtol=1e-12, atol=1e-14, name="symmetry")
    assert bool((h > 0).all()), h
    same = loss(a, x, a, x)
    assert same.abs().max().item() <= 1e-13 * (1 + x.abs().max().item() ** p)
    # Translating a copy of (α, x) back onto it: H decreases to 0.
    shift = torch.tensor([0.3, -0.2, 0.1], dtype=x.dtype)
    values = [loss(a, x, a, x + t * shift).min().item() for t in (1.0, 0.5, 0.1)]
    assert values[0] > values[1] > values[2] > 0


def test_hausdorff_does_not_depend_on_the_annealing():
    """scaling and diameter only steer the ε-scaling towards the converged potentials: same value."""
    a, x, b, y = (t.detach() for t in _hausdorff_inputs((2,), 10, 8, seed=70))
    want = SamplesLoss("hausdorff", blur=0.05)(a, x, b, y)
    for kw in ({"scaling": 0.9}, {"scaling": 0.1}, {"diameter": 30.0}):
        assert_close(SamplesLoss("hausdorff", blur=0.05, **kw)(a, x, b, y), want, rtol=1e-12, atol=1e-14, name=str(kw))


def _softmin_backends():
    from fastlddmm.ops.softmin import reference as _ref  # noqa: F401 - the twin is always there
    return [name for name in dispatch.backends_for("softmin") if name != "reference"]


@pytest.mark.parametrize("backend", _softmin_backends())
def test_hausdorff_runs_on_every_softmin_backend(backend):
    """Every soft-min backend of the dispatch table (a new one is picked up here): the reference's values
    and gradients. float64, D = 3, small clouds (the Triton interpreter and KeOps compilation are slow)."""
    a, x, b, y = _hausdorff_inputs((2,), 7, 5, seed=80)
    reason = dispatch.why_not("softmin", backend, dispatch.problem(x, y))
    if reason:
        pytest.skip(f"{reason} (runs where that backend can take float64 CPU tensors)")
    for p in (2, 1) if backend != "keops" else (2,):  # KeOps: one formula per p, ~20 s each to compile
        got = SamplesLoss("hausdorff", p=p, blur=0.3, backend=backend)(a, x, b, y)
        want = SamplesLoss("hausdorff", p=p, blur=0.3, backend="tensorized")(a, x, b, y)
        assert_close(got, want, rtol=1e-10, atol=1e-12, name=f"{backend} H, p={p}")
        for name, g, h in zip("axby", torch.autograd.grad(got.sum(), (a, x, b, y)),
                              torch.autograd.grad(want.sum(), (a, x, b, y))):
            assert_close(g, h, rtol=1e-9, atol=1e-11, name=f"{backend} dH/d{name}, p={p}")


def test_hausdorff_call_forms_and_backend_names(monkeypatch):
    """Both call forms and shapes as the other losses; GeomLoss's backend names reach the soft-min op as
    fastlddmm's names (tensorized -> reference, online -> keops), chosen by fastlddmm.dispatch."""
    a, x, b, y = (t.detach() for t in _hausdorff_inputs((), 7, 5, seed=90))
    loss = SamplesLoss("hausdorff", blur=0.2)
    assert loss(x, y).shape == () and loss(x[None], y[None]).shape == (1,)
    assert_close(loss(x, y), loss(torch.full((7,), 1 / 7, dtype=x.dtype), x, torch.full((5,), 0.2, dtype=x.dtype), y),
                 rtol=1e-14, atol=0, name="uniform weights")
    assert_close(loss(a[:, None], x, b[:, None], y), loss(a, x, b, y), rtol=0, atol=0, name="(N, 1) weights")
    import fastlddmm.compat.geomloss as compat_geomloss

    seen = []
    real = compat_geomloss.softmin_for
    monkeypatch.setattr(compat_geomloss, "softmin_for", lambda backend, *args: seen.append(backend) or real("reference", *args))
    for name in ("auto", "tensorized", "online", "reference", "keops"):
        SamplesLoss("hausdorff", backend=name)(x, y)
    assert seen == ["auto", "reference", "keops", "reference", "keops"]


# ================================================================================================
# Brute-force twin of pytorch3d's knn_points / knn_gather / chamfer_distance
# ================================================================================================


def _twin_dist(u: Tensor, v: Tensor, norm: int) -> Tensor:  # (D,), (D,) -> ()
    return ((u - v) ** 2).sum() if norm == 2 else (u - v).abs().sum()


def twin_knn(p1, p2, lengths1, lengths2, norm, K):
    """pytorch3d's knn_points, point by point: sorted K nearest among the first lengths2[n] points;
    dists = squared L2 (norm 2) or L1 (norm 1); 0 / index 0 for padded i and for k >= lengths2[n];
    knn = p2[idx], zeroed where k >= lengths2[n] (not on padded rows)."""
    N, P1, _ = p1.shape
    l1 = [p1.shape[1]] * N if lengths1 is None else lengths1.tolist()
    l2 = [p2.shape[1]] * N if lengths2 is None else lengths2.tolist()
    zero = p1.new_zeros(())
    dists, idx, knn = [], [], []
    for n in range(N):
        rows_d, rows_i, rows_k = [], [], []
        for i in range(P1):
            d_row, i_row, k_row = [zero] * K, [0] * K, [p2.new_zeros(p2.shape[2])] * K
            if i < l1[n]:
                ds = [_twin_dist(p1[n, i], p2[n, j], norm) for j in range(l2[n])]
                order = sorted(range(l2[n]), key=lambda j: ds[j].item())
                for k in range(min(K, l2[n])):
                    d_row[k], i_row[k], k_row[k] = ds[order[k]], order[k], p2[n, order[k]]
            else:  # padded row: idx 0, so knn holds p2[n, 0] where k < lengths2[n]
                k_row = [p2[n, 0] if k < l2[n] else p2.new_zeros(p2.shape[2]) for k in range(K)]
            rows_d.append(torch.stack(d_row))
            rows_i.append(i_row)
            rows_k.append(torch.stack(k_row))
        dists.append(torch.stack(rows_d))
        idx.append(rows_i)
        knn.append(torch.stack(rows_k))
    return torch.stack(dists), torch.tensor(idx, dtype=torch.int64), torch.stack(knn)


def _to_lists(x, lengths):
    """(N, P, D) + lengths -> the list of clouds x[n, :lengths[n]] (what pytorch3d's Pointclouds holds)."""
    n_pts = [x.shape[1]] * x.shape[0] if lengths is None else [int(v) for v in lengths]
    return [x[n, : n_pts[n]] for n in range(x.shape[0])]


def twin_chamfer(xs, ys, xns=None, yns=None, weights=None, batch_reduction="mean", point_reduction="mean", norm=2,
                 single_directional=False, abs_cosine=True, P1=None, P2=None):
    """pytorch3d's chamfer_distance (0.7.9), cloud by cloud and point by point, on lists of clouds xs[n]: (P_n, D)
    (with their normals xns[n]). P1, P2: the padded sizes, for the per-point output of point_reduction=None.
    A cloud with no point is at distance 0, and its gathered normal is 0 (cosine 0). Not for all-zero weights
    (pytorch3d's early exit, tested on its own)."""
    N = len(xs)
    with_normals = xns is not None and yns is not None
    P1 = max([len(c) for c in xs], default=0) if P1 is None else P1
    P2 = max([len(c) for c in ys], default=0) if P2 is None else P2

    def direction(xs, ys, xns, yns, P):
        out_p, out_n = [], []
        for n in range(N):
            terms_p, terms_n = [], []
            for i in range(len(xs[n])):
                if len(ys[n]) == 0:
                    d, cos = xs[n].new_zeros(()), xs[n].new_zeros(())
                else:
                    ds = [_twin_dist(xs[n][i], ys[n][j], norm) for j in range(len(ys[n]))]
                    j = min(range(len(ds)), key=lambda j: ds[j].item())
                    d = ds[j]
                    if with_normals:
                        cos = torch.nn.functional.cosine_similarity(xns[n][i][None], yns[n][j][None], eps=1e-6)[0]
                w = 1.0 if weights is None else weights[n]
                terms_p.append(d * w)
                if with_normals:
                    terms_n.append((1 - (cos.abs() if abs_cosine else cos)) * w)
            out = []
            for terms in [terms_p] + ([terms_n] if with_normals else []):
                zero = xs[n].new_zeros(())
                if point_reduction is None:
                    out.append(torch.stack(terms + [zero] * (P - len(terms))) if P else xs[n].new_zeros(0))
                elif point_reduction == "max":
                    out.append(torch.stack(terms + [zero]).max())  # padded points count as 0; terms >= 0
                else:
                    total = torch.stack(terms + [zero]).sum()
                    out.append(total / max(len(terms), 1) if point_reduction == "mean" else total)
            out_p.append(out[0])
            if with_normals:
                out_n.append(out[1])
        stack = lambda ts, shape: torch.stack(ts) if ts else xs[0].new_zeros(shape) if xs else torch.zeros(shape)  # noqa: E731
        shape = (0, P) if point_reduction is None else (0,)
        return stack(out_p, shape), (stack(out_n, shape) if with_normals else None)

    cx, nx = direction(xs, ys, xns, yns, P1)
    if single_directional:
        loss, loss_n = cx, nx
    else:
        cy, ny = direction(ys, xs, yns, xns, P2)
        if point_reduction == "max":
            loss, loss_n = torch.maximum(cx, cy), None
        elif point_reduction is None:
            loss, loss_n = (cx, cy), ((nx, ny) if with_normals else None)
        else:
            loss, loss_n = cx + cy, (nx + ny if with_normals else None)
    if batch_reduction is None:
        return loss, loss_n
    div = 1 if batch_reduction == "sum" else (weights.sum() if weights is not None else max(N, 1))
    return loss.sum() / div, (loss_n.sum() / div if loss_n is not None else None)


class FakePointclouds:
    """The part of pytorch3d.structures.Pointclouds that chamfer_distance reads, built as pytorch3d builds it
    from a list of (P_n, 3) clouds (and normals): zero padding to the largest cloud; an all-empty batch gives
    (N, 0, 3) float32 points and no normals; a padded (N, P, 3) tensor means N full clouds. No pytorch3d import."""

    def __init__(self, points, normals=None):
        if torch.is_tensor(points):
            points = list(points.unbind(0))
            normals = None if normals is None else list(normals.unbind(0))
        self._points, self._normals = points, normals
        self._lengths = torch.tensor([len(p) for p in points], dtype=torch.int64)

    def num_points_per_cloud(self) -> Tensor:
        return self._lengths

    def _pad(self, clouds):
        P = max(len(c) for c in clouds)
        return torch.stack([torch.cat([c, c.new_zeros(P - len(c), c.shape[1])]) if len(c) else c.new_zeros(P, 3)
                            for c in clouds])

    def points_padded(self) -> Tensor:
        if not self._points or max(len(p) for p in self._points) == 0:
            return torch.zeros((len(self._points), 0, 3))
        return self._pad(self._points)

    def normals_padded(self) -> Tensor | None:
        if self._normals is None or not self._points or max(len(p) for p in self._points) == 0:
            return None
        return self._pad(self._normals)


# Heterogeneous batch: a full cloud, a short one (fewer than K = 3 points in p2), an empty p1.
LENGTHS = {"full": (None, None), "ragged": (torch.tensor([7, 4, 0]), torch.tensor([6, 2, 5]))}
KNN_TOL = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6)}  # same formula, same order of ops


def _clouds(dtype, requires_grad=True):
    p1 = _points(3, 7, 3, dtype=dtype, seed=5).requires_grad_(requires_grad)
    p2 = _points(3, 6, 3, dtype=dtype, seed=6, shift=0.3).requires_grad_(requires_grad)
    return p1, p2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("lengths", ["full", "ragged"])
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("K", [1, 3])
def test_knn_points_matches_twin(K, norm, lengths, dtype):
    rtol, atol = KNN_TOL[dtype]
    p1, p2 = _clouds(dtype)
    l1, l2 = LENGTHS[lengths]
    got = knn_points(p1, p2, l1, l2, norm=norm, K=K, return_nn=True)
    d0, i0, k0 = twin_knn(p1, p2, l1, l2, norm, K)
    assert isinstance(got, KNN) and type(got).__name__ == "KNN" and got._fields == ("dists", "idx", "knn")
    assert got.dists.shape == got.idx.shape == (3, 7, K) and got.knn.shape == (3, 7, K, 3)
    assert got.idx.dtype == torch.int64 and not got.idx.requires_grad
    assert torch.equal(got.idx, i0)
    assert_close(got.dists, d0, rtol=rtol, atol=atol, name="dists")
    assert_close(got.knn, k0, rtol=0, atol=0, name="knn")
    v = torch.rand(got.dists.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    for g, h in zip(torch.autograd.grad((got.dists * v).sum(), (p1, p2)), torch.autograd.grad((d0 * v).sum(), (p1, p2))):
        assert_close(g, h, rtol=rtol, atol=atol, name="d dists")
    w = torch.rand(got.knn.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(dtype)
    assert_close(torch.autograd.grad((got.knn * w).sum(), p2)[0], torch.autograd.grad((k0 * w).sum(), p2)[0],
                 rtol=rtol, atol=atol, name="d knn / d p2")


def test_knn_points_padding_sorting_and_flags():
    p1, p2 = _clouds(torch.float64, requires_grad=False)
    l1, l2 = LENGTHS["ragged"]
    res = knn_points(p1, p2, l1, l2, K=3)
    assert res.knn is None  # return_nn=False
    # Padded p1 rows and k >= lengths2: dists 0 and idx 0.
    assert torch.all(res.dists[1, 4:] == 0) and torch.all(res.idx[1, 4:] == 0)
    assert torch.all(res.dists[1, :, 2] == 0) and torch.all(res.idx[1, :, 2] == 0)
    assert torch.all(res.dists[2] == 0) and torch.all(res.idx[2] == 0)
    # Sorted ascending among the valid neighbours, and return_sorted=False returns the same set.
    assert torch.all(res.dists[0, :, 1:] >= res.dists[0, :, :-1])
    unsorted = knn_points(p1, p2, l1, l2, K=3, return_sorted=False)
    assert torch.equal(unsorted.idx.sort(-1).values, res.idx.sort(-1).values)
    # K larger than the whole cloud: pytorch3d pads the missing neighbours.
    big = knn_points(p1, p2, K=8)
    assert torch.all(big.dists[..., 6:] == 0) and torch.all(big.idx[..., 6:] == 0)
    # knn_gather with lengths zeroes k >= lengths; index semantics x_out[n, l, k] = x[n, idx[n, l, k]].
    feats = _points(3, 6, 4, seed=9)
    out = knn_gather(feats, res.idx, l2)
    assert out.shape == (3, 7, 3, 4)
    assert torch.equal(out[0, 2, 1], feats[0, res.idx[0, 2, 1]]) and torch.all(out[1, :, 2] == 0)
    # version picks a pytorch3d CUDA kernel: ignored.
    assert torch.equal(knn_points(p1, p2, l1, l2, K=3, version=2).idx, res.idx)


def test_knn_points_l1_gradient_takes_pytorch3d_sign_at_ties():
    """pytorch3d's L1 backward: d|p1 - p2|/dp1 = +1 if p1 > p2 else -1 per coordinate (-1 at a tie; torch's abs
    would give 0), and the opposite for p2."""
    p1 = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64, requires_grad=True)
    p2 = torch.tensor([[[0.0, 1.0, 0.5]]], dtype=torch.float64, requires_grad=True)  # a tie on the first coordinate
    res = knn_points(p1, p2, norm=1)
    assert res.dists.item() == 1.5
    g1, g2 = torch.autograd.grad(res.dists.sum(), (p1, p2))
    sign = torch.where(p1 > p2, 1.0, -1.0)  # the kernel's rule, written directly
    assert torch.equal(g1, sign) and torch.equal(g2, -sign)


def test_knn_points_accepts_pointclouds_objects():
    """An extension (pytorch3d's knn_points takes tensors only): a Pointclouds is read as chamfer_distance reads it,
    its num_points_per_cloud() replacing lengths1 / lengths2."""
    p1, p2 = _clouds(torch.float64, requires_grad=False)
    l1, l2 = LENGTHS["ragged"]
    want = knn_points(p1, p2, l1, l2, K=2)
    got = knn_points(FakePointclouds(_to_lists(p1, l1)), FakePointclouds(_to_lists(p2, l2)), K=2)
    assert torch.equal(got.idx, want.idx) and torch.equal(got.dists, want.dists)
    got = knn_points(FakePointclouds(_to_lists(p1, l1)), p2, torch.tensor([0, 0, 0]), l2, K=2)  # lengths1 ignored
    assert torch.equal(got.idx, want.idx)


@pytest.mark.parametrize("K,norm", [(1, 2), (3, 2), (3, 1)])
def test_knn_points_auto_follows_the_dispatch_table(monkeypatch, K, norm):
    """auto asks fastlddmm.dispatch (the C++ k-d tree where it is built; else dense for small clouds, then the
    k-d tree of scipy in D <= 3 or KeOps): whatever it picks, the neighbours are the reference's."""
    p1, p2 = _points(2, 40, 3), _points(2, 33, 3, seed=1)
    l1, l2 = torch.tensor([40, 17]), torch.tensor([33, 30])
    want = knn_points(p1, p2, l1, l2, norm=norm, K=K, backend="reference")
    pr = dispatch.Problem(device="cpu", dtype=p1.dtype, dim=3, n=40, m=33, batch=2, k=K, norm=norm)
    for threshold in (dispatch.NEAREST_DENSE_MAX_PAIRS, 10):  # below and above the dense bound
        monkeypatch.setattr(dispatch, "NEAREST_DENSE_MAX_PAIRS", threshold)
        order = ("cpu", "reference") if threshold > 40 * 33 else ("cpu", "kdtree", "keops", "reference")
        chosen = dispatch.choose("nearest", "auto", pr)
        assert chosen == next(b for b in order if dispatch.usable("nearest", b, pr))
        got = knn_points(p1, p2, l1, l2, norm=norm, K=K, backend="auto")
        assert torch.equal(got.idx, want.idx), chosen
        assert_close(got.dists, want.dists, rtol=1e-12, atol=1e-12)


@needs_keops
@pytest.mark.parametrize("norm", [1, 2])
def test_knn_points_keops_matches_reference(norm):
    """KeOps ArgKMin (K = 3, float64): the same neighbours, hence the same values and gradients."""
    p1 = _points(2, 41, 3, seed=10).requires_grad_()
    p2 = _points(2, 37, 3, seed=11).requires_grad_()
    l1, l2 = torch.tensor([41, 20]), torch.tensor([37, 30])  # every cloud has >= K points: one formula
    got = knn_points(p1, p2, l1, l2, norm=norm, K=3, backend="keops")
    want = knn_points(p1, p2, l1, l2, norm=norm, K=3, backend="reference")
    assert torch.equal(got.idx, want.idx)
    assert_close(got.dists, want.dists, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(got.dists.sum(), (p1, p2))
    h = torch.autograd.grad(want.dists.sum(), (p1, p2))
    for u, w in zip(g, h):
        assert_close(u, w, rtol=1e-12, atol=1e-12)


REDUCTIONS = [("mean", "mean"), ("sum", "mean"), (None, "mean"), ("mean", "sum"), ("sum", "sum"), (None, "sum"),
              ("mean", "max"), ("sum", "max"), (None, "max"), (None, None)]


def _flat(t):
    """Nested tuples of tensors -> one list (point_reduction=None returns pairs)."""
    if t is None:
        return []
    if isinstance(t, tuple):
        return [u for s in t for u in _flat(s)]
    return [t]


def _assert_same_outputs(got, want, wrt, *, tol=1e-12, name="chamfer"):
    """Same structure (tuples, None), shapes, dtypes, values, and gradients of a weighted sum w.r.t. ``wrt``."""
    got_l, want_l = _flat(got[0]) + _flat(got[1]), _flat(want[0]) + _flat(want[1])
    assert (got[1] is None) == (want[1] is None), f"{name}: loss_normals None-ness"
    assert len(got_l) == len(want_l), f"{name}: {len(got_l)} outputs, expected {len(want_l)}"
    for g, w in zip(got_l, want_l):
        assert_close(g, w.to(g.dtype), rtol=tol, atol=tol, name=name)
    total = sum((g * (k + 1)).sum() for k, g in enumerate(got_l))
    total0 = sum((w * (k + 1)).sum() for k, w in enumerate(want_l))
    for g, h in zip(torch.autograd.grad(total, wrt, allow_unused=True),
                    torch.autograd.grad(total0, wrt, allow_unused=True)):
        g = torch.zeros_like(h) if g is None and h is not None else g
        h = torch.zeros_like(g) if h is None and g is not None else h
        if g is not None:
            assert_close(g, h, rtol=tol, atol=tol, name=f"d {name}")


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("single_directional", [False, True])
@pytest.mark.parametrize("lengths", ["full", "ragged"])
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("batch_reduction,point_reduction", REDUCTIONS)
def test_chamfer_distance_matches_twin(batch_reduction, point_reduction, norm, lengths, single_directional, weighted):
    x, y = _clouds(torch.float64)
    xl, yl = LENGTHS[lengths]
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64, requires_grad=True) if weighted else None
    kw = dict(weights=weights, batch_reduction=batch_reduction, point_reduction=point_reduction, norm=norm,
              single_directional=single_directional)
    got = chamfer_distance(x, y, xl, yl, **kw)
    want = twin_chamfer(_to_lists(x, xl), _to_lists(y, yl), P1=7, P2=6, **kw)
    assert got[1] is None
    if point_reduction is None:
        assert isinstance(got[0], Tensor if single_directional else tuple)
    wrt = (x, y) + ((weights,) if weighted else ())
    _assert_same_outputs(got, want, wrt)


@pytest.mark.parametrize("point_reduction,batch_reduction", [("mean", "mean"), ("sum", None), (None, None)])
@pytest.mark.parametrize("abs_cosine", [True, False])
@pytest.mark.parametrize("lengths", ["full", "ragged"])
def test_chamfer_distance_normals_and_weights_match_twin(abs_cosine, lengths, point_reduction, batch_reduction):
    x, y = _clouds(torch.float64)
    xn = _points(3, 7, 3, seed=12).requires_grad_()
    yn = _points(3, 6, 3, seed=13).requires_grad_()
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    xl, yl = LENGTHS[lengths]
    kw = dict(weights=weights, abs_cosine=abs_cosine, point_reduction=point_reduction, batch_reduction=batch_reduction)
    got = chamfer_distance(x, y, xl, yl, x_normals=xn, y_normals=yn, **kw)
    want = twin_chamfer(_to_lists(x, xl), _to_lists(y, yl), _to_lists(xn, xl), _to_lists(yn, yl), P1=7, P2=6, **kw)
    assert got[1] is not None
    _assert_same_outputs(got, want, (x, y, xn, yn), name="chamfer with normals")


@pytest.mark.parametrize("with_normals", [False, True])
@pytest.mark.parametrize("point_reduction", ["mean", "sum", None])
def test_chamfer_distance_reads_pointclouds_like_pytorch3d(with_normals, point_reduction):
    """Pointclouds objects (points_padded, num_points_per_cloud, normals_padded) give the twin's values, and
    gradients reach the tensors the clouds were built from; x_lengths / x_normals are then ignored."""
    gen = torch.Generator().manual_seed(14)
    sizes_x, sizes_y = [5, 1, 8], [3, 6, 0]
    xs = [torch.randn(n, 3, generator=gen, dtype=torch.float64).requires_grad_() for n in sizes_x]
    ys = [torch.randn(n, 3, generator=gen, dtype=torch.float64).requires_grad_() for n in sizes_y]
    xns = [torch.randn(n, 3, generator=gen, dtype=torch.float64).requires_grad_() for n in sizes_x] if with_normals else None
    yns = [torch.randn(n, 3, generator=gen, dtype=torch.float64).requires_grad_() for n in sizes_y] if with_normals else None
    batch = "mean" if point_reduction else None
    kw = dict(point_reduction=point_reduction, batch_reduction=batch)
    got = chamfer_distance(FakePointclouds(xs, xns), FakePointclouds(ys, yns), **kw)
    want = twin_chamfer(xs, ys, xns, yns, P1=8, P2=6, **kw)
    _assert_same_outputs(got, want, tuple(xs + ys + (xns or []) + (yns or [])), name="Pointclouds")
    # The lengths / normals arguments are ignored for a Pointclouds (pytorch3d reads the object only) ...
    again = chamfer_distance(FakePointclouds(xs, xns), FakePointclouds(ys, yns), x_lengths=torch.tensor([1, 1, 1]),
                             x_normals=torch.ones(3, 8, 3, dtype=torch.float64), **kw)
    for g, w in zip(_flat(again[0]) + _flat(again[1]), _flat(got[0]) + _flat(got[1])):
        assert torch.equal(g, w)
    # ... and a Pointclouds mixes with a padded tensor and its lengths.
    padded = FakePointclouds(ys).points_padded()
    mixed = chamfer_distance(FakePointclouds(xs), padded, y_lengths=torch.tensor(sizes_y), **kw)
    for g, w in zip(_flat(mixed[0]), _flat(twin_chamfer(xs, ys, P1=8, P2=6, **kw)[0])):
        assert_close(g, w, rtol=1e-12, atol=1e-12, name="mixed")


def test_chamfer_distance_max_reduction():
    """point_reduction="max" (pytorch3d >= 0.7.8): the Hausdorff distance; refuses normals."""
    x, y = _clouds(torch.float64, requires_grad=False)
    h, h_n = chamfer_distance(x, y, point_reduction="max", batch_reduction=None)
    d2 = ((x[:, :, None] - y[:, None]) ** 2).sum(-1)  # (N, P1, P2)
    want = torch.maximum(d2.min(2).values.max(1).values, d2.min(1).values.max(1).values)  # squared Hausdorff distance
    assert h_n is None and torch.equal(h, want)
    with pytest.raises(ValueError, match=re.escape('Normals must be None if point_reduction is "max"')):
        chamfer_distance(x, y, x_normals=x, point_reduction="max")
    clouds = lambda t: FakePointclouds(list(t.unbind(0)), list(t.unbind(0)))  # noqa: E731 - with normals
    with pytest.raises(AssertionError):
        chamfer_distance(clouds(x), clouds(y), point_reduction="max")
    # Normals on one side only (from a Pointclouds): no normal term, no error.
    assert chamfer_distance(clouds(x), y, point_reduction="max")[1] is None


def test_chamfer_distance_zero_weights_early_exit():
    """pytorch3d's test_incorrect_weights: all-zero weights give a zero that keeps the graph, for the loss and
    the normals alike (not None), an (N, N) matrix without batch reduction."""
    x, y = _clouds(torch.float32)
    weights = torch.zeros(3)
    loss, loss_n = chamfer_distance(x, y, weights=weights, batch_reduction="mean")
    assert loss.shape == loss_n.shape == () and loss.item() == loss_n.item() == 0.0
    assert loss.requires_grad and loss_n.requires_grad
    loss, loss_n = chamfer_distance(x, y, weights=weights, batch_reduction=None)
    assert loss.shape == loss_n.shape == (3, 3) and not loss.any() and not loss_n.any() and loss.requires_grad
    loss, loss_n = chamfer_distance(x, y, weights=weights, batch_reduction=None, point_reduction="max")
    assert loss.shape == (3, 3) and loss_n is None
    loss, loss_n = chamfer_distance(x, y, weights=weights, batch_reduction=None, point_reduction=None)
    assert [t.shape for t in loss] == [t.shape for t in loss_n] == [(3, 3), (3, 3)]
    loss, loss_n = chamfer_distance(x, y, weights=weights.double(), batch_reduction=None)
    assert loss.dtype == torch.float64  # pytorch3d's early exit promotes (it is out of place there)
    assert chamfer_distance(x, y, weights=torch.ones(3, dtype=torch.float64))[0].dtype == torch.float32  # in place


def test_chamfer_distance_defaults_are_fl_chamfer():
    x, y = _clouds(torch.float64, requires_grad=False)
    loss, loss_n = chamfer_distance(x, y)
    assert loss_n is None and loss.shape == ()
    assert_close(loss, fl_chamfer(x, y, backend="reference").mean(), rtol=1e-12, atol=1e-12)
    assert chamfer_distance(x, y, x_normals=x)[1] is None  # normals on one side only: no normal term


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])  # float32: sums of 1e3 terms
def test_chamfer_distance_large_odd_clouds(dtype, tol):
    """1000 + 13 against 517 points, ragged: the dense formula (mins of the squared-distance matrix)."""
    x = _points(2, 1013, 3, dtype=dtype, seed=18)
    y = _points(2, 517, 3, dtype=dtype, seed=19, shift=0.2)
    xl, yl = torch.tensor([1013, 700]), torch.tensor([517, 333])
    d2 = ((x.double()[:, :, None] - y.double()[:, None]) ** 2).sum(-1)  # (2, 1013, 517)
    d2 = d2.masked_fill(torch.arange(517)[None, None, :] >= yl[:, None, None], math.inf)
    d2 = d2.masked_fill(torch.arange(1013)[None, :, None] >= xl[:, None, None], math.inf)
    to_y = [d2[n, : xl[n]].min(1).values for n in range(2)]
    to_x = [d2[n, :, : yl[n]].min(0).values for n in range(2)]
    want = torch.stack([to_y[n].mean() + to_x[n].mean() for n in range(2)])
    got, _ = chamfer_distance(x, y, xl, yl, batch_reduction=None)
    assert_close(got, want.to(dtype), rtol=tol, atol=tol, name="chamfer, 1013 points")
    want_max = torch.stack([torch.maximum(to_y[n].max(), to_x[n].max()) for n in range(2)])
    got_max, _ = chamfer_distance(x, y, xl, yl, batch_reduction=None, point_reduction="max")
    assert_close(got_max, want_max.to(dtype), rtol=tol, atol=tol, name="max, 1013 points")


# ---- empty batches and clouds -----------------------------------------------------------------


def test_empty_clouds_as_in_pytorch3d_tests():
    """pytorch3d's own test_empty_clouds: point_reduction does not divide by zero, nor batch_reduction."""
    points1 = FakePointclouds([torch.zeros(0, 3), torch.zeros(10, 3)])
    points2 = FakePointclouds(torch.ones(2, 40, 3))
    loss, _ = chamfer_distance(points1, points2, batch_reduction=None)
    assert torch.equal(loss, torch.tensor([0.0, 6.0]))
    loss2, _ = chamfer_distance(FakePointclouds([]), FakePointclouds([]))
    assert loss2.shape == () and float(loss2) == 0.0


@pytest.mark.parametrize("shapes", [((0, 5, 3), (0, 4, 3)), ((2, 0, 3), (2, 4, 3)), ((2, 5, 3), (2, 0, 3)),
                                    ((2, 0, 3), (2, 0, 3)), ((0, 0, 3), (0, 0, 3))])
def test_empty_inputs_give_pytorch3d_results(shapes):
    """Empty batch / clouds with no points: zeros of the documented shapes, in the graph (zero gradients)."""
    x = torch.randn(*shapes[0], dtype=torch.float64, requires_grad=True)
    y = torch.randn(*shapes[1], dtype=torch.float64, requires_grad=True)
    N, P1, P2 = x.shape[0], x.shape[1], y.shape[1]
    for K in (1, 3):
        res = knn_points(x, y, K=K, return_sorted=N > 0)  # N = 0 with K > 1 sorted raises (test below)
        assert res.dists.shape == res.idx.shape == (N, P1, K) and not res.dists.any() and not res.idx.any()
        assert res.idx.dtype == torch.int64
    if P2 > 0 or P1 == 0:
        if N > 0:
            assert knn_points(x, y, K=2, return_nn=True).knn.shape == (N, P1, 2, 3)
    for batch_reduction, point_reduction in REDUCTIONS:
        if point_reduction == "max" and (P1 == 0 or P2 == 0):
            continue  # pytorch3d's IndexError (below)
        loss, loss_n = chamfer_distance(x, y, point_reduction=point_reduction, batch_reduction=batch_reduction)
        want = twin_chamfer(_to_lists(x, None), _to_lists(y, None), point_reduction=point_reduction,
                            batch_reduction=batch_reduction, P1=P1, P2=P2)
        assert loss_n is None
        for g, w in zip(_flat(loss), _flat(want[0])):
            assert g.shape == w.shape and not g.any(), (point_reduction, batch_reduction, g)
        total = sum(t.sum() for t in _flat(loss))
        gx, gy = torch.autograd.grad(total, (x, y))
        assert not gx.any() and not gy.any()


def test_empty_inputs_raise_where_pytorch3d_raises():
    """Where pytorch3d fails on empty inputs, the same exception type, and a message saying why."""
    e = torch.zeros(0, 5, 3)
    with pytest.raises(RuntimeError, match="empty batch"):  # its lengths.max() of an empty tensor
        chamfer_distance(e, e, x_lengths=torch.zeros(0, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="empty batch"):  # its knn_gather's lengths.min()
        chamfer_distance(e, e, x_normals=e, y_normals=e)
    x, none = torch.randn(2, 5, 3), torch.zeros(2, 0, 3)
    with pytest.raises(RuntimeError, match="no points"):  # knn_gather's index 0 into an empty cloud tensor
        chamfer_distance(x, none, x_normals=x, y_normals=none)
    with pytest.raises(RuntimeError, match="no points"):  # the same, from the y -> x direction
        chamfer_distance(none, x, x_normals=none, y_normals=x)
    assert chamfer_distance(none, x, x_normals=none, y_normals=x, single_directional=True)[1] == 0
    with pytest.raises(IndexError, match="no points"):  # max over an empty dimension
        chamfer_distance(none, x, point_reduction="max")
    with pytest.raises(IndexError, match="no points"):
        chamfer_distance(x, none, point_reduction="max")
    assert chamfer_distance(x, none, point_reduction="max", single_directional=True)[0] == 0
    with pytest.raises(RuntimeError, match="empty batch"):  # its lengths2.min() before sorting
        knn_points(e, e, K=3)
    with pytest.raises(RuntimeError, match="empty batch"):  # knn_gather's lengths.min()
        knn_points(e, e, return_nn=True)
    with pytest.raises(RuntimeError, match="no points"):
        knn_points(x, none, return_nn=True)
    with pytest.raises(RuntimeError, match="empty batch"):
        knn_gather(e, torch.zeros(0, 5, 1, dtype=torch.int64))
    # knn_points does not check lengths in pytorch3d: an empty batch with lengths works.
    assert knn_points(e, e, torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)).dists.shape == (0, 5, 1)


# ---- errors, in pytorch3d's words and types -----------------------------------------------------

P3D_ERRORS = [
    # (call, exception types pytorch3d raises, pytorch3d's message (a regex, as its own tests use))
    (lambda x, y, n: chamfer_distance(x, y, batch_reduction="max"), (ValueError,), "batch_reduction must be one of"),
    (lambda x, y, n: chamfer_distance(x, y, point_reduction="min"), (ValueError,), "point_reduction must be one of"),
    (lambda x, y, n: chamfer_distance(x, y, point_reduction=None), (ValueError,),
     "Batch reduction must be None if point_reduction is None"),
    (lambda x, y, n: chamfer_distance(x, y, norm=0), (ValueError,), re.escape("Support for 1 or 2 norm.")),
    (lambda x, y, n: chamfer_distance(x, y, norm=3), (ValueError,), re.escape("Support for 1 or 2 norm.")),
    (lambda x, y, n: knn_points(x, y, norm=3), (ValueError,), re.escape("Support for 1 or 2 norm.")),
    (lambda x, y, n: chamfer_distance(x, y, x_normals=n[None]), (ValueError,), "Expected normals to be of shape"),
    (lambda x, y, n: chamfer_distance(x[None], y), (ValueError,), "Expected points to be of shape"),
    (lambda x, y, n: chamfer_distance(x, y, x_lengths=torch.tensor([1, 2, 3])), (ValueError,),
     re.escape("Expected lengths to be of shape (N,)")),
    (lambda x, y, n: chamfer_distance(x, y, x_lengths=torch.full((7,), 11)), (ValueError,), "A length value was too long"),
    (lambda x, y, n: chamfer_distance(x=[1, 1, 1], y=[1, 1, 1]), (ValueError,), "Pointclouds objects or torch.Tensor"),
    (lambda x, y, n: chamfer_distance(x, y[:3]), (ValueError,), re.escape("y does not have the correct shape.")),
    (lambda x, y, n: chamfer_distance(x, y[..., :2]), (ValueError,), re.escape("y does not have the correct shape.")),
    (lambda x, y, n: chamfer_distance(x, y, weights=-torch.ones(7)), (ValueError,), re.escape("weights cannot be negative.")),
    (lambda x, y, n: chamfer_distance(x, y, weights=torch.zeros(6)), (ValueError,), re.escape("weights must be of shape (N,).")),
    (lambda x, y, n: chamfer_distance(x, y, x_normals=n, point_reduction="max"), (ValueError,),
     re.escape('Normals must be None if point_reduction is "max"')),
    (lambda x, y, n: knn_points(x, y[:3]), (ValueError,), re.escape("pts1 and pts2 must have the same batch dimension.")),
    (lambda x, y, n: knn_points(x, y[..., :2]), (ValueError,), re.escape("pts1 and pts2 must have the same point dimension.")),
    (lambda x, y, n: knn_gather(y, torch.zeros(3, 4, 1, dtype=torch.int64)), (ValueError,),
     re.escape("x and idx must have same batch dimension.")),
    # Not a tensor: pytorch3d's knn_points and its lengths / normals / weights checks raise AttributeError.
    (lambda x, y, n: knn_points([1, 1, 1], y), (AttributeError, TypeError), "object has no attribute"),
    (lambda x, y, n: chamfer_distance(x, y, x_lengths=[10] * 7), (AttributeError, TypeError), "object has no attribute"),
    (lambda x, y, n: chamfer_distance(x, y, x_normals=n.tolist()), (AttributeError, TypeError), "object has no attribute"),
    (lambda x, y, n: chamfer_distance(x, y, weights=[1.0] * 7), (AttributeError, TypeError), "object has no attribute"),
    # Where pytorch3d fails inside torch or its kernel: RuntimeError / IndexError (ours says what is wrong).
    (lambda x, y, n: chamfer_distance(x, y, x_normals=n[:, :5], y_normals=y), (RuntimeError, ValueError),
     "Expected normals to be of shape"),
    (lambda x, y, n: chamfer_distance(x, y.double()), (RuntimeError, TypeError), "same dtype"),
    (lambda x, y, n: knn_points(x, y, lengths1=torch.full((7,), 2.0)), (RuntimeError, TypeError), "expected scalar type Long"),
    (lambda x, y, n: chamfer_distance(x.half(), y.half()), (RuntimeError, TypeError), "float32 or float64"),
    (lambda x, y, n: knn_points(x[0], y[0]), (IndexError, ValueError), "Expected points to be of shape"),
    (lambda x, y, n: chamfer_distance(x, y, weights=torch.tensor(1.0)), (IndexError, ValueError),
     re.escape("weights must be of shape (N,).")),
    (lambda x, y, n: chamfer_distance(x, y, weights=torch.ones(7, 2)), (RuntimeError, ValueError),
     re.escape("weights must be of shape (N,).")),
]


@pytest.mark.parametrize("call,types,message", P3D_ERRORS)
def test_errors_have_pytorch3d_types_and_words(call, types, message):
    """pytorch3d's own tests (test_chamfer.py: test_incorrect_inputs, test_invalid_norm, test_incorrect_weights,
    reductions) and the types pytorch3d raises elsewhere: each of them catches ours."""
    x = _points(7, 10, 3, dtype=torch.float32, seed=15)
    y = _points(7, 18, 3, dtype=torch.float32, seed=16)
    normals = _points(7, 10, 3, dtype=torch.float32, seed=17)
    for exc_type in types:
        with pytest.raises(exc_type, match=message):
            call(x, y, normals)


def test_more_permissive_and_stricter_than_pytorch3d():
    x, y = _clouds(torch.float64, requires_grad=False)
    # norm compares == 1 or == 2 as in pytorch3d; float64 and int32 lengths run.
    assert_close(chamfer_distance(x, y, norm=2.0)[0], chamfer_distance(x, y)[0], rtol=0, atol=0)
    lengths = torch.tensor([7, 3, 1], dtype=torch.int32)
    assert_close(chamfer_distance(x, y, x_lengths=lengths)[0], chamfer_distance(x, y, x_lengths=lengths.long())[0],
                 rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"must lie in \[0, 7\]"):  # pytorch3d reads negative lengths as 0
        chamfer_distance(x, y, x_lengths=torch.tensor([7, -1, 1]))
    with pytest.raises(ValueError, match="A length value was too long"):  # pytorch3d's knn_points does not check
        knn_points(x, y, lengths2=torch.tensor([7, 1, 1]))
    with pytest.raises(ValueError, match="K must be a positive integer"):
        knn_points(x, y, K=0)
    with pytest.raises(ValueError, match="backend must be"):
        knn_points(x, y, backend="tensorized")


# ================================================================================================
# Swapping the import line of a GeomLoss training script
# ================================================================================================

SCRIPT = """
import torch
{import_line}

def train(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    y = (torch.randn(30, 2, generator=gen, dtype=torch.float64) * 0.5 + 1.0).to(dtype)
    loss_fn = SamplesLoss("sinkhorn", p=2, blur=0.1, scaling=0.7)
    opt = torch.optim.Adam([x], lr=0.05)
    curve = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return curve, x.detach()
"""


def _run_script(import_line: str, dtype):
    namespace: dict = {}
    exec(SCRIPT.format(import_line=import_line), namespace)  # noqa: S102 - our own test script
    return namespace["train"](dtype)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])  # float32: see TOL
def test_swapping_the_import_gives_the_same_training_curve(dtype, rtol):
    curve0, x0 = _run_script("from geomloss import SamplesLoss", dtype)
    curve1, x1 = _run_script("from fastlddmm.compat import SamplesLoss", dtype)
    assert curve0[-1] < 0.7 * curve0[0]  # the cloud does move towards the target
    for k, (a, b) in enumerate(zip(curve1, curve0)):
        assert math.isclose(a, b, rel_tol=rtol, abs_tol=rtol), f"step {k}: {a} vs GeomLoss {b}"
    assert_close(x1, x0, rtol=rtol, atol=rtol, name="final points")
