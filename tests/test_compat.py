"""fastlddmm.compat against the libraries it stands in for.

* SamplesLoss against the real GeomLoss (the oracle): every loss, both call forms, batched and not,
  values, gradients and potentials.
* knn_points / knn_gather / chamfer_distance against a brute-force twin of pytorch3d's documented
  semantics, written below from pytorch3d/ops/knn.py and pytorch3d/loss/chamfer.py (pytorch3d
  has no CPU wheel, so it cannot be the oracle here): loops over points, no shared code with the
  implementation under test.
* A GeomLoss training script whose import line is swapped gives the same loss curve.

KeOps compiles one formula per reduction, dtype and dimension on first use (~15-30 s each on a
CPU), so the KeOps tests use float64, D = 3 and few formulas.
"""

from __future__ import annotations

import math

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
    for name, g, h in zip("axby", g_got, g_want):
        scale = max(1.0, h.abs().max().item())
        assert_close(g, h.to(dtype), rtol=rtol, atol=atol * scale, name=f"dH/d{name}")
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


def twin_chamfer(x, y, x_lengths=None, y_lengths=None, x_normals=None, y_normals=None, weights=None,
                 batch_reduction="mean", point_reduction="mean", norm=2, single_directional=False,
                 abs_cosine=True):
    """pytorch3d's chamfer_distance, point by point (see fastlddmm.compat.pytorch3d for the rules)."""
    N = x.shape[0]
    xl = torch.full((N,), x.shape[1]) if x_lengths is None else x_lengths
    yl = torch.full((N,), y.shape[1]) if y_lengths is None else y_lengths
    with_normals = x_normals is not None and y_normals is not None

    def direction(x, y, xl, yl, xn, yn):
        per_point, per_normal = [], []
        for n in range(N):
            row_p, row_n = [], []
            for i in range(x.shape[1]):
                if i >= xl[n]:
                    row_p.append(x.new_zeros(()))
                    row_n.append(x.new_zeros(()))
                    continue
                if yl[n] == 0:  # no neighbour: distance 0, gathered normal 0 (cosine 0)
                    row_p.append(x.new_zeros(()))
                    near_normal = None
                else:
                    ds = [_twin_dist(x[n, i], y[n, j], norm) for j in range(int(yl[n]))]
                    j = min(range(len(ds)), key=lambda j: ds[j].item())
                    row_p.append(ds[j])
                    near_normal = yn[n, j] if with_normals else None
                if with_normals:
                    if near_normal is None:
                        cos = x.new_zeros(())
                    else:
                        cos = torch.nn.functional.cosine_similarity(xn[n, i][None], near_normal[None], eps=1e-6)[0]
                    row_n.append(1 - (cos.abs() if abs_cosine else cos))
            per_point.append(torch.stack(row_p))
            if with_normals:
                per_normal.append(torch.stack(row_n))
        terms = [torch.stack(per_point)] + ([torch.stack(per_normal)] if with_normals else [])
        if weights is not None:
            terms = [t * weights[:, None] for t in terms]
        if point_reduction is None:
            return terms
        out = []
        for t in terms:
            t = t.sum(1)
            if point_reduction == "mean":
                t = t / xl.clamp(min=1).to(t.dtype)
            if batch_reduction is not None:
                t = t.sum()
                if batch_reduction == "mean":
                    t = t / (weights.sum() if weights is not None else N)
            out.append(t)
        return out

    fx = direction(x, y, xl, yl, x_normals, y_normals)
    if single_directional:
        return fx[0], (fx[1] if with_normals else None)
    fy = direction(y, x, yl, xl, y_normals, x_normals)
    if point_reduction is None:
        return (fx[0], fy[0]), ((fx[1], fy[1]) if with_normals else None)
    return fx[0] + fy[0], (fx[1] + fy[1] if with_normals else None)


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


def test_knn_points_bad_input():
    p1, p2 = _clouds(torch.float64, requires_grad=False)
    with pytest.raises(ValueError, match="norm must be 1 or 2"):
        knn_points(p1, p2, norm=3)
    with pytest.raises(ValueError, match="K must be a positive integer"):
        knn_points(p1, p2, K=0)
    with pytest.raises(ValueError, match="p1 must have shape"):
        knn_points(p1[0], p2[0])
    with pytest.raises(ValueError, match="same batch dimension"):
        knn_points(p1, p2[:2])
    with pytest.raises(ValueError, match=r"lengths2 must lie in \[0, 6\]"):
        knn_points(p1, p2, lengths2=torch.tensor([7, 1, 1]))
    with pytest.raises(ValueError, match="backend must be"):
        knn_points(p1, p2, backend="tensorized")


@pytest.mark.parametrize("K,norm", [(1, 2), (3, 2), (3, 1)])
def test_knn_points_auto_follows_the_dispatch_table(monkeypatch, K, norm):
    """auto asks fastlddmm.dispatch (dense for small clouds, then the k-d tree in D <= 3 or KeOps): whatever
    it picks, the neighbours are the reference's."""
    p1, p2 = _points(2, 40, 3), _points(2, 33, 3, seed=1)
    l1, l2 = torch.tensor([40, 17]), torch.tensor([33, 30])
    want = knn_points(p1, p2, l1, l2, norm=norm, K=K, backend="reference")
    pr = dispatch.Problem(device="cpu", dtype=p1.dtype, dim=3, n=40, m=33, batch=2, k=K, norm=norm)
    assert dispatch.choose("nearest", "auto", pr) == "reference"
    monkeypatch.setattr(dispatch, "NEAREST_DENSE_MAX_PAIRS", 10)
    chosen = dispatch.choose("nearest", "auto", pr)
    assert chosen == next(b for b in ("kdtree", "keops", "reference") if dispatch.usable("nearest", b, pr))
    got = knn_points(p1, p2, l1, l2, norm=norm, K=K, backend="auto")
    assert torch.equal(got.idx, want.idx)
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


REDUCTIONS = [("mean", "mean"), ("sum", "mean"), (None, "mean"), ("mean", "sum"), ("sum", "sum"), (None, "sum"), (None, None)]


def _flat(t):
    """Nested tuples of tensors -> one list (point_reduction=None returns pairs)."""
    if t is None:
        return []
    if isinstance(t, tuple):
        return [u for s in t for u in _flat(s)]
    return [t]


@pytest.mark.parametrize("single_directional", [False, True])
@pytest.mark.parametrize("lengths", ["full", "ragged"])
@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("batch_reduction,point_reduction", REDUCTIONS)
def test_chamfer_distance_matches_twin(batch_reduction, point_reduction, norm, lengths, single_directional):
    x, y = _clouds(torch.float64)
    xl, yl = LENGTHS[lengths]
    kw = dict(batch_reduction=batch_reduction, point_reduction=point_reduction, norm=norm,
              single_directional=single_directional)
    got, got_n = chamfer_distance(x, y, xl, yl, **kw)
    want, want_n = twin_chamfer(x, y, xl, yl, **kw)
    assert got_n is None and want_n is None
    got_l, want_l = _flat(got), _flat(want)
    assert len(got_l) == len(want_l) == (1 if point_reduction else (1 if single_directional else 2))
    for g, w in zip(got_l, want_l):
        assert g.shape == w.shape
        assert_close(g, w, rtol=1e-12, atol=1e-12, name="chamfer")
    total = sum((g * (k + 1)).sum() for k, g in enumerate(got_l))
    total0 = sum((w * (k + 1)).sum() for k, w in enumerate(want_l))
    for g, h in zip(torch.autograd.grad(total, (x, y)), torch.autograd.grad(total0, (x, y))):
        assert_close(g, h, rtol=1e-12, atol=1e-12, name="d chamfer")


@pytest.mark.parametrize("point_reduction,batch_reduction", [("mean", "mean"), (None, None)])
@pytest.mark.parametrize("abs_cosine", [True, False])
@pytest.mark.parametrize("lengths", ["full", "ragged"])
def test_chamfer_distance_normals_and_weights_match_twin(abs_cosine, lengths, point_reduction, batch_reduction):
    x, y = _clouds(torch.float64)
    xn = _points(3, 7, 3, seed=12).requires_grad_()
    yn = _points(3, 6, 3, seed=13).requires_grad_()
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    xl, yl = LENGTHS[lengths]
    kw = dict(x_normals=xn, y_normals=yn, weights=weights, abs_cosine=abs_cosine,
              point_reduction=point_reduction, batch_reduction=batch_reduction)
    got, got_n = chamfer_distance(x, y, xl, yl, **kw)
    want, want_n = twin_chamfer(x, y, xl, yl, **kw)
    got_l, want_l = _flat(got) + _flat(got_n), _flat(want) + _flat(want_n)
    assert len(got_l) == len(want_l) == (2 if point_reduction else 4)
    for g, w in zip(got_l, want_l):
        assert_close(g, w, rtol=1e-12, atol=1e-12, name="chamfer with normals")
    total = sum((g * (k + 1)).sum() for k, g in enumerate(got_l))
    total0 = sum((w * (k + 1)).sum() for k, w in enumerate(want_l))
    for g, h in zip(torch.autograd.grad(total, (x, y, xn, yn)), torch.autograd.grad(total0, (x, y, xn, yn))):
        assert_close(g, h, rtol=1e-12, atol=1e-12, name="d chamfer with normals")


def test_chamfer_distance_conventions():
    x, y = _clouds(torch.float64, requires_grad=False)
    # Defaults: batch mean of fl.chamfer (squared L2, means over points, both directions).
    loss, loss_n = chamfer_distance(x, y)
    assert loss_n is None and loss.shape == ()
    assert_close(loss, fl_chamfer(x, y, backend="reference").mean(), rtol=1e-12, atol=1e-12)
    # Normals given on one side only: no normal term.
    assert chamfer_distance(x, y, x_normals=x)[1] is None
    # All-zero weights: pytorch3d's early exit, a zero for the loss and for the normals alike.
    zero, zero_n = chamfer_distance(x, y, weights=torch.zeros(3, dtype=torch.float64))
    assert zero.shape == () and float(zero) == 0.0 and zero_n is not None and float(zero_n) == 0.0
    zero, _ = chamfer_distance(x, y, weights=torch.zeros(3, dtype=torch.float64), batch_reduction=None)
    assert zero.shape == (3, 3) and torch.all(zero == 0)
    # Reduction arguments, in pytorch3d's words.
    with pytest.raises(ValueError, match="batch_reduction must be None when point_reduction is None"):
        chamfer_distance(x, y, point_reduction=None)
    with pytest.raises(ValueError, match="point_reduction must be one of"):
        chamfer_distance(x, y, point_reduction="max")
    with pytest.raises(ValueError, match="weights cannot be negative"):
        chamfer_distance(x, y, weights=torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="Pointclouds"):
        chamfer_distance([x], y)


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
