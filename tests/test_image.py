"""fastlddmm.image: coordinate convention, composition, losses, networks, multistep training."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fastlddmm.image as fi
from fastlddmm.image import digits, losses
from fastlddmm.image.transforms import Affine, Compose, DisplacementField, identity_map, spacing, warp

# (dtype, atol): float32 keeps ~7 digits of coordinates in [0, 1] through a few grid_sample
# evaluations (each a handful of flops); float64 the same at ~1e-15 per operation.
DTYPES = [(torch.float32, 1e-5), (torch.float64, 1e-10)]
SHAPES = [(7, 11), (5, 6, 9)]  # 2D and 3D, odd / unequal sizes on purpose


def _displacement_of(transform, shape, batch, dtype):
    """A grid DisplacementField standing for ``transform`` (sampled at the pixel centres)."""
    grid = identity_map(shape, batch=batch, dtype=dtype)
    return DisplacementField(transform(grid) - grid)


def _rotation(dim, angle, dtype):
    r = torch.eye(dim, dtype=dtype)
    c, s = math.cos(angle), math.sin(angle)
    r[0, 0], r[0, 1], r[1, 0], r[1, 1] = c, -s, s, c
    return r


# ---------------------------------------------------------------- transforms and coordinates

def test_identity_map_convention():
    grid = identity_map((3, 5), batch=2, dtype=torch.float64)
    assert grid.shape == (2, 2, 3, 5)
    # Coordinate 0 runs along axis 0 (rows), coordinate 1 along axis 1; pixel centres 0 .. 1.
    assert torch.equal(grid[0, 0, :, 0], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert torch.equal(grid[0, 1, 0], torch.linspace(0, 1, 5, dtype=torch.float64))
    assert spacing((3, 5)) == (0.5, 0.25)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_warp_by_identity_returns_image(dtype, atol, shape):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 2, *shape, generator=gen, dtype=dtype)
    torch.testing.assert_close(warp(image, fi.Identity(len(shape))), image, atol=atol, rtol=0)
    # Also through grid_sample: a zero displacement evaluated by __call__ (no on-grid shortcut).
    zero = DisplacementField(torch.zeros(3, len(shape), *shape, dtype=dtype))
    torch.testing.assert_close(warp(image, zero(identity_map(shape, batch=3, dtype=dtype))), image, atol=atol, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_translation_by_one_pixel_shifts_along_the_right_axis(shape):
    """(image ∘ phi)(x) = image(x + h e_a): warped[i] = image[i + 1] along axis a, for every axis a."""
    dim = len(shape)
    image = torch.rand(1, 1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h = spacing(shape)
    for a in range(dim):
        t = torch.zeros(dim, dtype=torch.float64)
        t[a] = h[a]
        warped = warp(image, _displacement_of(Affine(torch.eye(dim, dtype=torch.float64), t), shape, 1,
                                              torch.float64))
        inner = [slice(None)] * (dim + 2)
        inner[2 + a] = slice(0, shape[a] - 1)
        shifted = [slice(None)] * (dim + 2)
        shifted[2 + a] = slice(1, None)
        torch.testing.assert_close(warped[tuple(inner)], image[tuple(shifted)], atol=1e-12, rtol=0)
        last = [slice(None)] * (dim + 2)
        last[2 + a] = -1
        assert torch.all(warped[tuple(last)] == 0)  # sampled outside the image: zero background


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_composition_of_affine_maps_is_the_affine_product(dtype, atol, shape):
    dim = len(shape)
    centre = torch.full((dim,), 0.5, dtype=dtype)
    # psi: rotate by 0.2 rad and shrink by 0.7 about the centre: maps the box into itself, so that
    # phi's grid displacement is interpolated inside its grid, where bilinear is exact for affine maps.
    a_psi = 0.7 * _rotation(dim, 0.2, dtype)
    t_psi = centre - a_psi @ centre
    a_phi = torch.eye(dim, dtype=dtype) + 0.1 * torch.randn(dim, dim, dtype=dtype,
                                                          generator=torch.Generator().manual_seed(2)).to(dtype)
    t_phi = torch.arange(dim, dtype=dtype) * 0.05 - 0.03
    psi, phi = Affine(a_psi, t_psi), Affine(a_phi, t_phi)
    product = Affine(a_phi @ a_psi, a_phi @ t_psi + t_phi)
    x = identity_map(shape, batch=2, dtype=dtype)
    # exact composition of exact maps
    torch.testing.assert_close((phi @ psi)(x), product(x), atol=atol, rtol=0)
    # composition of grid displacement fields (interpolated) equals the product too
    composed = Compose(_displacement_of(phi, shape, 2, dtype), _displacement_of(psi, shape, 2, dtype))
    torch.testing.assert_close(composed.on_grid(shape, batch=2, dtype=dtype), product(x), atol=atol, rtol=0)
    torch.testing.assert_close(composed(x), product(x), atol=atol, rtol=0)
    # on a point list (B, dim, N) as well as on grids
    points = x.flatten(2)[:, :, ::3]
    torch.testing.assert_close(composed(points), product(points), atol=atol, rtol=0)
    # and so do the warped images
    image = torch.rand(2, 1, *shape, dtype=dtype, generator=torch.Generator().manual_seed(3)).to(dtype)
    torch.testing.assert_close(warp(image, composed), warp(image, product), atol=atol, rtol=0)
    # and the order matters: psi ∘ phi is a different map
    assert not torch.allclose((psi @ phi)(x), product(x), atol=1e-3)


def test_sample_rejects_bad_input():
    with pytest.raises(ValueError, match="coords"):
        fi.sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="batch size"):
        fi.sample(torch.zeros(2, 1, 4, 4), torch.zeros(1, 2, 4, 4))
    with pytest.raises(TypeError, match="coords"):
        fi.sample(torch.zeros(1, 1, 4, 4), [[0.0]])
    with pytest.raises(ValueError, match="padding_mode"):
        fi.sample(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4), padding_mode="wrap")


def test_warp_gradcheck_float64():
    shape = (5, 4)
    image = torch.rand(1, 1, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    # Displacements that keep points strictly inside cells (bilinear is not differentiable on cell edges).
    u = 0.05 + 0.1 * torch.rand(1, 2, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda u: warp(image, DisplacementField(u)(identity_map(shape, dtype=u.dtype))), (u,))


# ---------------------------------------------------------------- losses and metrics

@pytest.mark.parametrize("shape", SHAPES)
def test_diffusion_is_zero_for_a_translation_and_exact_for_linear_maps(shape):
    dim = len(shape)
    t = torch.tensor([0.13, -0.07, 0.02][:dim], dtype=torch.float64)
    translation = _displacement_of(Affine(torch.eye(dim, dtype=torch.float64), t), shape, 2, torch.float64)
    phi = translation.on_grid(shape, batch=2, dtype=torch.float64)
    assert float(losses.diffusion(phi)) == pytest.approx(0.0, abs=1e-20)
    # u = M x: forward differences are exact, |∇u|_F² = |M|_F² everywhere (unit-box derivatives).
    m = 0.3 * torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    linear = Affine(torch.eye(dim, dtype=torch.float64) + m).on_grid(shape, batch=2, dtype=torch.float64)
    torch.testing.assert_close(losses.diffusion(linear, reduction="none"),
                               torch.full((2,), float(m.square().sum()), dtype=torch.float64), atol=1e-12, rtol=0)


def _icon_diffusion(phi):
    """icon_registration 1.1.9's DiffusionRegularizedNet.compute_bending_energy_loss, transcribed:
    v = identity - phi; sum over axes of mean((v[.., 1:, ..] - v[.., :-1, ..])²) (each mean over
    batch, coordinates and cells), times the first spatial size squared (not the spacing)."""
    v = identity_map(phi.shape[2:], batch=phi.shape[0], dtype=phi.dtype) - phi
    if phi.dim() == 4:
        energy = ((-v[:, :, 1:] + v[:, :, :-1]) ** 2).mean() + ((-v[:, :, :, 1:] + v[:, :, :, :-1]) ** 2).mean()
    else:
        energy = (((-v[:, :, 1:] + v[:, :, :-1]) ** 2).mean() + ((-v[:, :, :, 1:] + v[:, :, :, :-1]) ** 2).mean()
                  + ((-v[:, :, :, :, 1:] + v[:, :, :, :, :-1]) ** 2).mean())
    return energy * phi.shape[2] ** 2


@pytest.mark.parametrize("shape", [(28, 28), (7, 7), (5, 5, 5)])
def test_icon_diffusion_weight_gives_icons_objective(shape):
    gen = torch.Generator().manual_seed(21)
    dtype = torch.float64
    phi = identity_map(shape, batch=3, dtype=dtype) + 0.02 * torch.randn(3, len(shape), *shape, generator=gen, dtype=dtype)
    lam = losses.icon_diffusion_weight(0.05, shape)
    # float64, a few hundred squared differences summed in different orders: ~1e-15 relative
    torch.testing.assert_close(lam * losses.diffusion(phi), 0.5 * 0.05 * _icon_diffusion(phi), rtol=1e-12, atol=0)
    # icon's whole loss 2·SSD + lmbda·D_icon is twice ours, SSD + lam·diffusion: the same minimiser
    a, b = torch.rand(2, 3, 1, *shape, generator=gen, dtype=dtype)
    warped = warp(a, phi)
    icon = 2 * (warped - b).square().mean() + 0.05 * _icon_diffusion(phi)
    ours = losses.ssd(warped, b) + lam * losses.diffusion(phi)
    torch.testing.assert_close(icon, 2 * ours, rtol=1e-12, atol=0)
    # the weight scales with lmbda, and it is not lmbda itself (our diffusion is scaled by the spacing)
    assert losses.icon_diffusion_weight(0.1, shape) == pytest.approx(2 * lam, rel=1e-15)
    n = shape[0]
    assert lam == pytest.approx(0.05 * n * n / (2 * len(shape) * (n - 1) ** 2), rel=1e-15)
    for bad in ((28, 27), (28,), (1, 1), (4, 4, 4, 4)):
        with pytest.raises(ValueError, match="square"):
            losses.icon_diffusion_weight(0.05, bad)


@pytest.mark.parametrize("shape", SHAPES)
def test_jacobian_and_folds(shape):
    dim = len(shape)
    x = identity_map(shape, batch=1, dtype=torch.float64)
    torch.testing.assert_close(losses.jacobian_determinant(x), torch.ones(1, *(n - 1 for n in shape), dtype=torch.float64))
    assert float(losses.folds_fraction(x)) == 0.0
    m = torch.eye(dim, dtype=torch.float64) + 0.2 * torch.randn(dim, dim, dtype=torch.float64,
                                                                generator=torch.Generator().manual_seed(7))
    det = losses.jacobian_determinant(Affine(m)(x))
    torch.testing.assert_close(det, torch.full_like(det, float(torch.linalg.det(m))), atol=1e-12, rtol=0)
    # a reflection along axis 0 folds every cell
    flip = torch.eye(dim, dtype=torch.float64)
    flip[0, 0] = -1
    assert float(losses.folds_fraction(Affine(flip, torch.eye(dim, dtype=torch.float64)[0])(x))) == 1.0
    # a fold over half of axis 0 only: x0 -> |x0 - 0.5| folds the cells of the upper half
    y = x.clone()
    y[:, 0] = (x[:, 0] - 0.5).abs()
    frac = float(losses.folds_fraction(y))
    assert 0.3 < frac < 0.7


def test_ssd_and_lncc():
    gen = torch.Generator().manual_seed(8)
    a = torch.rand(2, 1, 12, 13, dtype=torch.float64, generator=gen)
    b = torch.rand(2, 1, 12, 13, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(losses.ssd(a, b, reduction="none"), (a - b).square().mean((1, 2, 3)))
    assert float(losses.ssd(a, a)) == 0.0
    # LNCC ignores local affine intensity changes; eps = 1e-5 against window variances ~1/12 -> ~1e-4 error.
    assert float(losses.lncc(a, a)) == pytest.approx(0.0, abs=1e-3)
    assert float(losses.lncc(a, 3 * a + 1)) == pytest.approx(0.0, abs=1e-3)
    assert float(losses.lncc(a, -a)) == pytest.approx(2.0, abs=1e-3)
    assert 0.5 < float(losses.lncc(a, b)) < 1.5  # unrelated noise: correlation near 0
    a3 = torch.rand(1, 1, 6, 7, 8, dtype=torch.float64, generator=gen)
    assert float(losses.lncc(a3, 2 * a3, window=3)) == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="window"):
        losses.lncc(a, b, window=20)
    with pytest.raises(ValueError, match="same shape"):
        losses.ssd(a, b[:, :, :5])


def test_inverse_consistency():
    shape = (9, 8)
    t = torch.tensor([0.1, -0.05], dtype=torch.float64)
    fwd = DisplacementField(t.view(1, 2, 1, 1).expand(1, 2, *shape).clone())
    back = DisplacementField((-t).view(1, 2, 1, 1).expand(1, 2, *shape).clone())
    assert float(losses.inverse_consistency(fwd, back, shape, batch=1, dtype=torch.float64)) == pytest.approx(0, abs=1e-24)
    # twice the same translation: off by 2t everywhere
    assert float(losses.inverse_consistency(fwd, fwd, shape, batch=1, dtype=torch.float64)) == pytest.approx(
        float((2 * t).square().sum()), rel=1e-12)


# ---------------------------------------------------------------- networks and multistep

class _Fixed(torch.nn.Module):
    """A 'network' returning a given transform, and recording the moving image it was shown."""

    def __init__(self, transform):
        super().__init__()
        self.transform, self.seen = transform, None

    def forward(self, moving, fixed):
        self.seen = moving
        return self.transform


def test_two_step_feeds_the_warped_image_and_composes():
    shape = (10, 9)
    dtype = torch.float64
    image = torch.rand(1, 1, *shape, dtype=dtype, generator=torch.Generator().manual_seed(9))
    phi = _displacement_of(Affine(torch.eye(2, dtype=dtype) * 0.9, torch.tensor([0.05, 0.02], dtype=dtype)), shape, 1, dtype)
    psi = _displacement_of(Affine(_rotation(2, 0.1, dtype), torch.tensor([0.03, -0.04], dtype=dtype)), shape, 1, dtype)
    a, b = _Fixed(phi), _Fixed(psi)
    out = fi.TwoStep(a, b)(image, image)
    assert a.seen is image
    torch.testing.assert_close(b.seen, warp(image, phi))
    x = identity_map(shape, batch=1, dtype=dtype)
    torch.testing.assert_close(out(x), phi(psi(x)))
    # nesting: k steps -> k cumulative maps, the last one the model's map
    nets = [_Fixed(phi), _Fixed(psi), _Fixed(phi)]
    model = fi.multistep(nets)
    maps = fi.step_transforms(model, image, image)
    assert len(maps) == 3
    torch.testing.assert_close(maps[-1](x), phi(psi(phi(x))))
    torch.testing.assert_close(model(image, image)(x), maps[-1](x))
    torch.testing.assert_close(nets[2].seen, warp(image, Compose(phi, psi)))


@pytest.mark.parametrize("make", [
    lambda: fi.multistep([fi.MLP((9, 10), hidden=(50, 50)) for _ in range(3)]),
    lambda: fi.multistep([fi.UNet(2, features=(4, 8)) for _ in range(2)]),
], ids=["mlp-3-steps", "unet-2-steps"])
def test_networks_start_at_identity_and_gradients_flow(make):
    torch.manual_seed(0)
    model = make()
    gen = torch.Generator().manual_seed(10)
    a, b = torch.rand(4, 1, 9, 10, generator=gen), torch.rand(4, 1, 9, 10, generator=gen)
    out = fi.registration_loss(model, a, b, lam=0.05)
    # zero-initialised last layers: the identity map, the loss is the SSD before registration
    torch.testing.assert_close(out["map"], identity_map((9, 10), batch=4), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["loss"], losses.ssd(a, b))
    out["loss"].backward()
    params = list(model.parameters())
    assert all(p.grad is not None for p in params)
    # every step's output layer gets a gradient (hidden layers only once the output layer is not zero)
    steps = [m for m in model.modules() if isinstance(m, fi.DisplacementNet)]
    assert len(steps) >= 2
    for net in steps:
        last = net.net[-1] if isinstance(net, fi.MLP) else net.out
        assert float(last.weight.grad.abs().sum()) > 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    fi.registration_loss(model, a, b)["loss"].backward()
    assert all(float(p.grad.abs().sum()) > 0 for p in params)


def test_3d_networks_and_inverse_consistency_loss():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(11)
    a, b = torch.rand(2, 1, 6, 7, 5, generator=gen), torch.rand(2, 1, 6, 7, 5, generator=gen)
    for make in (lambda: fi.MLP((6, 7, 5)), lambda: fi.UNet(3, features=(4, 4))):
        model = fi.multistep([make(), make()])
        out = fi.registration_loss(model, a, b, regulariser="inverse_consistency", lam=1.0, similarity_name="lncc")
        assert out["map"].shape == (2, 3, 6, 7, 5)
        assert out["regulariser"].item() == pytest.approx(0.0, abs=1e-10)  # identity ∘ identity
        out["loss"].backward()
        assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_train_draws_distinct_pairs_within_one_group():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.zeros(()))
            self.pairs = []

        def forward(self, moving, fixed):
            self.pairs.append((moving.clone(), fixed.clone()))
            return DisplacementField(self.scale * torch.ones(moving.shape[0], 2, *moving.shape[2:]))

    gen = torch.Generator().manual_seed(13)
    # every image is a distinct constant: group 0 in [0, 1), group 1 in [10, 11)
    group0 = torch.rand(5, generator=gen).view(5, 1, 1, 1).expand(5, 1, 4, 4).clone()
    group1 = group0 + 10
    model = Recorder()
    history = fi.train(model, [group0, group1], iterations=12, batch_size=7, log_every=5)
    assert [h["iteration"] for h in history] == [0, 5, 10, 11]
    seen_groups = set()
    for moving, fixed in model.pairs:
        m, f = moving[:, 0, 0, 0], fixed[:, 0, 0, 0]
        assert torch.all(m != f)  # never an image with itself
        assert torch.all((m >= 10) == (f >= 10)) and torch.all((m >= 10) == (m[0] >= 10))  # one group a batch
        seen_groups.add(bool(m[0] >= 10))
    assert seen_groups == {False, True}


def _set_last_bias(net, value):
    with torch.no_grad():
        net.net[-1].bias.fill_(value)


def test_shared_steps_are_one_network_and_independent_steps_are_not():
    torch.manual_seed(0)
    k, shape = 4, (9, 10)
    shared = digits.build_model(shape=shape, composed_steps=k, hidden=(8,), shared=True)
    independent = digits.build_model(shape=shape, composed_steps=k, hidden=(8,), shared=False)
    nets_s, nets_i = fi.step_networks(shared), fi.step_networks(independent)
    assert len(nets_s) == len(nets_i) == k
    assert all(n is nets_s[0] for n in nets_s)  # the same module object at every step
    assert len({id(n) for n in nets_i}) == k
    assert len({id(p) for n in nets_s for p in n.parameters()}) == len(list(nets_s[0].parameters()))
    one = sum(p.numel() for p in nets_s[0].parameters())
    assert sum(p.numel() for p in shared.parameters()) == one  # parameters are counted (and trained) once
    assert sum(p.numel() for p in independent.parameters()) == k * one
    # Changing the first step's network changes every step. With a zero last weight and a last bias
    # b (the same for both coordinates) each application is the translation x -> x + b: k
    # applications of the shared network translate by k·b, the independent ones by b only.
    b = 0.01
    _set_last_bias(nets_s[0], b)
    _set_last_bias(nets_i[0], b)
    image = torch.rand(2, 1, *shape, generator=torch.Generator().manual_seed(3))
    x = identity_map(shape, batch=2)
    torch.testing.assert_close(shared(image, image)(x), x + k * b, atol=1e-6, rtol=0)
    torch.testing.assert_close(independent(image, image)(x), x + b, atol=1e-6, rtol=0)
    maps = fi.step_transforms(shared, image, image)
    assert len(maps) == k
    for j, m in enumerate(maps):  # every application moved by the one change
        torch.testing.assert_close(m(x), x + (j + 1) * b, atol=1e-6, rtol=0)
    for m in fi.step_transforms(independent, image, image):  # only the first network was changed
        torch.testing.assert_close(m(x), x + b, atol=1e-6, rtol=0)
    # one gradient per parameter tensor, accumulated over the k applications
    out = fi.registration_loss(shared, image, image.flip(-1), lam=0.0)
    out["loss"].backward()
    assert all(p.grad is not None for p in shared.parameters())


def test_no_function_shadows_its_module():
    """fastlddmm.image.<name> is the submodule <name> for every submodule (the package rule): the
    builder fastlddmm.image.multistep is a function, so its module is fastlddmm.image.steps."""
    import importlib
    import pkgutil

    names = [info.name for info in pkgutil.iter_modules(fi.__path__)]
    assert "steps" in names and "multistep" not in names
    for name in names:
        module = importlib.import_module(f"fastlddmm.image.{name}")
        assert getattr(fi, name) is module, f"fastlddmm.image.{name} is {getattr(fi, name)!r}, not the module"
    assert callable(fi.multistep) and fi.multistep.__module__ == "fastlddmm.image.steps"


def test_shared_gradient_is_the_sum_over_applications():
    """One set of parameters: its gradient is the sum of the gradients that K independent copies of
    the same weights get, one per application (float64; sums in another order: ~1e-15 relative)."""
    import copy

    torch.manual_seed(1)
    k, shape, dtype = 3, (7, 8), torch.float64
    net = fi.MLP(shape, hidden=(6,)).to(dtype)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a non-zero last layer: every parameter gets a gradient
    shared = fi.multistep(net, steps=k)
    copies = [copy.deepcopy(net) for _ in range(k)]
    independent = fi.multistep(copies)
    gen = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 4, 1, *shape, generator=gen, dtype=dtype)
    out_s, out_i = (fi.registration_loss(m, a, b, lam=0.01) for m in (shared, independent))
    torch.testing.assert_close(out_s["loss"], out_i["loss"], rtol=1e-12, atol=0)  # same weights, same maps
    out_s["loss"].backward()
    out_i["loss"].backward()
    for name, p in net.named_parameters():
        total = sum(dict(c.named_parameters())[name].grad for c in copies)
        torch.testing.assert_close(p.grad, total, rtol=1e-10, atol=1e-14, msg=name)
        # and no single application's gradient is the whole of it
        assert not torch.allclose(p.grad, dict(copies[0].named_parameters())[name].grad, rtol=1e-3, atol=0)


def test_multistep_arguments():
    net = fi.MLP((4, 4))
    assert fi.multistep(net) is net and fi.multistep(net, steps=1) is net
    assert fi.step_networks(fi.multistep(net, steps=3)) == [net, net, net]
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        fi.multistep(net, steps=0)
    with pytest.raises(ValueError, match="steps=3 but 2 networks"):
        fi.multistep([net, fi.MLP((4, 4))], steps=3)
    with pytest.raises(ValueError, match="at least one"):
        fi.multistep([])
    with pytest.raises(TypeError, match="nn.Module"):
        fi.multistep(["not a network"])


def test_train_limits_and_cosine_schedule():
    torch.manual_seed(0)
    images = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(4))
    model = fi.MLP((5, 5), hidden=(4,))
    history = fi.train(model, images, iterations=9, batch_size=3, lr=1e-2, schedule="cosine", log_every=2)
    assert [h["iteration"] for h in history] == [0, 2, 4, 6, 8]
    for h in history:
        assert h["lr"] == pytest.approx(0.5 * 1e-2 * (1 + math.cos(math.pi * h["iteration"] / 9)), rel=1e-12)
    assert history[0]["lr"] == 1e-2 and all(h["lr"] > 0 for h in history)
    # a time budget alone: it stops by itself, runs at least one iteration, the rate only falls
    history = fi.train(model, images, iterations=None, seconds=0.3, batch_size=3, schedule="cosine", log_every=1)
    assert len(history) >= 1
    assert all(a["lr"] >= b["lr"] for a, b in zip(history, history[1:]))
    # with both limits the first one reached ends the run
    assert fi.train(model, images, iterations=3, seconds=1e6, batch_size=3)[-1]["iteration"] == 2
    with pytest.raises(ValueError, match="iterations or seconds"):
        fi.train(model, images, iterations=None)
    with pytest.raises(ValueError, match="seconds must be"):
        fi.train(model, images, seconds=-1.0)
    with pytest.raises(ValueError, match="schedule"):
        fi.train(model, images, iterations=1, schedule="linear")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="regulariser"):
        fi.registration_loss(fi.MLP((4, 4)), torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4), regulariser="bending")
    with pytest.raises(ValueError, match="MLP built for"):
        fi.MLP((4, 4))(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5))
    with pytest.raises(ValueError, match="moving and fixed"):
        fi.UNet(2)(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 6))
    with pytest.raises(ValueError, match="batch_size"):
        fi.train(fi.MLP((4, 4)), torch.zeros(3, 1, 4, 4), batch_size=0)
    with pytest.raises(ValueError, match="steps"):
        digits.run([5], [5], "unused", steps=-1)
    with pytest.raises(ValueError, match="digits"):
        digits.run([12], [5], "unused")
    with pytest.raises(ValueError, match="seconds"):
        digits.run([5], [5], "unused", seconds=0)
    with pytest.raises(ValueError, match="seconds"):
        digits.run([5], [5], "unused", seconds=float("nan"))
    with pytest.raises(ValueError, match="composed_steps"):
        digits.run([5], [5], "unused", composed_steps=0)
    with pytest.raises(ValueError, match="schedule"):
        digits.run([5], [5], "unused", schedule="step")
    with pytest.raises(ValueError, match="threads"):
        digits.run([5], [5], "unused", threads=0)


# ---------------------------------------------------------------- digits

def test_load_digits_layout():
    fives = digits.load_digits(5)
    assert fives.shape[1:] == (1, 28, 28) and 150 < fives.shape[0] < 200
    assert float(fives.min()) >= 0 and float(fives.max()) <= 1
    assert float(fives[..., :4, :].abs().max()) == 0  # MNIST-like empty margin
    train, held = digits.split(fives, seed=0)
    assert train.shape[0] + held.shape[0] == fives.shape[0]


@pytest.fixture
def one_thread():
    """Tiny (32, 1, 28, 28) ops gain nothing from intra-op threads, and on a busy CI machine the
    thread barriers of hundreds of small ops cost more than the work: run single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shared", [True, False], ids=["one-network", "independent"])
def test_short_training_lowers_ssd_on_held_out_fives(tmp_path, one_thread, shared):
    k = 3
    metrics = digits.run([5], [5, 7], tmp_path, seed=0, progress=False, steps=60, composed_steps=k, shared=shared,
                         hidden=(50, 50), batch_size=32, lr=3e-3, eval_pairs_per_digit=24, figure_rows=2)
    assert set(metrics) == {"5", "7"}
    for m in metrics.values():
        assert set(m) == {"ssd_before", "ssd_after", "folds_fraction"}
        assert 0.0 <= m["folds_fraction"] <= 1.0
    assert metrics["5"]["ssd_after"] < 0.8 * metrics["5"]["ssd_before"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    for d in (5, 7):
        assert (tmp_path / f"digits_{d}.png").stat().st_size > 1000
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["shared"] is shared and log["composed_steps"] == k and log["iterations_run"] == 60
    assert log["distinct_step_networks"] == (1 if shared else k)
    assert log["icon_lmbda_equivalent"] == pytest.approx(digits.ICON_LMBDA)
    assert 0.9 < log["classifier"]["held_out_accuracy"] <= 1.0  # a useful judge of what a warped image shows
    per_step = json.loads((tmp_path / "per_step.json").read_text())
    for d in ("5", "7"):
        st = per_step[d]
        assert len(st["ssd_to_fixed"]) == k + 1
        assert st["ssd_to_fixed"][0] == pytest.approx(metrics[d]["ssd_before"], rel=1e-5)
        assert st["ssd_to_fixed"][-1] == pytest.approx(metrics[d]["ssd_after"], rel=1e-5)
        # ten digits, one fraction per application (k = 0..K), the ten summing to 1 each time
        assert set(st["classified_as"]) == {str(c) for c in range(10)}
        for fractions in st["classified_as"].values():
            assert len(fractions) == k + 1 and all(0.0 <= f <= 1.0 for f in fractions)
        for j in range(k + 1):
            assert sum(st["classified_as"][str(c)][j] for c in range(10)) == pytest.approx(1.0, abs=1e-12)
    # unwarped held-out images: the classifier mostly names their own digit
    assert per_step["5"]["classified_as"]["5"][0] > 0.8 and per_step["7"]["classified_as"]["7"][0] > 0.8


class _ScriptedClassifier(torch.nn.Module):
    """Calls the first c images of its c-th call "5" and the others "7" (c = 0, 1, ...)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, images):
        n = images.shape[0]
        labels = torch.where(torch.arange(n) < self.calls, 5, 7)
        self.calls += 1
        return torch.nn.functional.one_hot(labels, 10).to(images.dtype)


def test_per_step_reports_every_application_and_fractions_that_sum_to_one():
    shape, k, batch = (9, 10), 4, 8
    torch.manual_seed(0)
    model = digits.build_model(shape=shape, composed_steps=k, hidden=(4,), shared=True)
    _set_last_bias(fi.step_networks(model)[0], 0.02)  # each application: the same small translation
    gen = torch.Generator().manual_seed(6)
    moving = torch.zeros(batch, 1, *shape)
    moving[:, :, 3:6, 3:6] = 1.0
    fixed = torch.rand(batch, 1, *shape, generator=gen)
    templates = {5: fixed[:1], 7: moving[:1]}
    clf = _ScriptedClassifier()
    st = digits.per_step(model, moving, fixed, templates, clf)
    assert clf.calls == k + 1  # the unwarped images, then once after each application
    assert set(st["classified_as"]) == {str(c) for c in range(10)}
    for j in range(k + 1):
        assert st["classified_as"]["5"][j] == j / batch and st["classified_as"]["7"][j] == 1 - j / batch
        assert all(st["classified_as"][str(c)][j] == 0.0 for c in range(10) if c not in (5, 7))
        assert sum(v[j] for v in st["classified_as"].values()) == pytest.approx(1.0, abs=1e-12)
    # the SSDs follow the applications too: k = 0 is the unwarped image, then the image moves away
    assert len(st["ssd_to_fixed"]) == len(st["ssd_to_mean"]["7"]) == k + 1
    assert st["ssd_to_mean"]["7"][0] == 0.0
    assert all(a < b for a, b in zip(st["ssd_to_mean"]["7"], st["ssd_to_mean"]["7"][1:]))
    assert st["ssd_to_fixed"][0] == pytest.approx(float(losses.ssd(moving, fixed)), rel=1e-6)
    assert "classified_as" not in digits.per_step(model, moving, fixed, templates)


def test_idle_threads_never_exceeds_the_limit(monkeypatch):
    monkeypatch.setattr(digits.os, "cpu_count", lambda: 2)
    # one thread only once the load says every core is taken by others (>= cores + 1)
    for load, limit, expected in ((0.1, 2, 2), (0.1, 1, 1), (2.7, 2, 2), (2.99, 2, 2), (3.0, 2, 1), (7.5, 2, 1),
                                  (0.0, 4, 2), (7.5, 1, 1)):
        monkeypatch.setattr(digits.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert digits.idle_threads(limit) == expected, (load, limit)
    # no limit: torch's thread count (capped at the cores)
    monkeypatch.setattr(digits.os, "getloadavg", lambda: (0.5, 9.0, 9.0))  # only the 1-minute figure counts
    monkeypatch.setattr(digits.torch, "get_num_threads", lambda: 1)
    assert digits.idle_threads() == 1
    monkeypatch.setattr(digits.torch, "get_num_threads", lambda: 8)
    assert digits.idle_threads() == 2
    monkeypatch.setattr(digits.os, "cpu_count", lambda: 16)
    assert digits.idle_threads() == 8

    def no_load_average():
        raise OSError("no load average here")

    monkeypatch.setattr(digits.os, "getloadavg", no_load_average)
    assert digits.idle_threads(3) == 3  # nothing known about the load: the limit


@pytest.mark.parametrize("threads,load,expected", [(None, 0.2, 2), (None, 5.0, 1), (1, 0.2, 1), (2, 5.0, 2)])
def test_run_trains_with_the_chosen_threads_and_restores_them(monkeypatch, tmp_path, threads, load, expected):
    monkeypatch.setattr(digits.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(digits.os, "getloadavg", lambda: (load, load, load))
    seen = []
    monkeypatch.setattr(digits, "_run", lambda *args, **kwargs: seen.append(torch.get_num_threads()) or {})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        digits.run([5], [7], tmp_path, threads=threads)
        assert seen == [expected]  # --threads wins over the load average
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_train_classifier_is_deterministic_and_leaves_the_global_seed_alone():
    gen = torch.Generator().manual_seed(5)
    images, labels = torch.rand(20, 1, 6, 6, generator=gen), torch.arange(20) % 10
    torch.manual_seed(1)
    a = digits.train_classifier(images, labels, iterations=5, seed=3)
    after = torch.rand(1)
    torch.manual_seed(1)
    b = digits.train_classifier(images, labels, iterations=5, seed=3)
    assert torch.equal(after, torch.rand(1))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert digits.classify(a, images).shape == (20,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a GPU machine: pytest -m gpu)")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    model = fi.multistep([fi.MLP((9, 10)) for _ in range(2)])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    gen = torch.Generator().manual_seed(12)
    a, b = torch.rand(3, 1, 9, 10, generator=gen), torch.rand(3, 1, 9, 10, generator=gen)
    cpu = fi.registration_loss(model, a, b)["loss"]
    gpu = fi.registration_loss(model.cuda(), a.cuda(), b.cuda())["loss"]
    # float32: GPU and CPU sum in different orders (matmul, grid_sample backward): ~1e-6 relative, 100x margin
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-6)
