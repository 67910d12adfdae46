"""ResNetFlow and fl.register on the reference path: small 2D pairs, inverse, folds, save/load, errors."""

import math

import numpy as np
import pytest
import torch

import fastlddmm as fl


def circle_pair(n=60):
    t = torch.linspace(0, 2 * math.pi, n + 1, dtype=torch.float64)[:-1]
    src = torch.stack([torch.cos(t), torch.sin(t)], -1) * 10 + 5
    tgt = torch.stack([1.5 * torch.cos(t), 0.7 * torch.sin(t) + 0.3 * torch.cos(2 * t)], -1) * 10 + 5
    return src.float(), tgt.float()


def test_flow_shapes_and_identity_start():
    flow = fl.ResNetFlow(dim=3, width=7, layers=4)
    x = torch.randn(11, 3)
    torch.testing.assert_close(flow(x), x)  # W2 = 0 at start: the identity map
    assert flow.energy(x).item() == 0.0
    assert flow.trajectory(x).shape == (5, 11, 3)
    assert flow(torch.randn(2, 5, 3)).shape == (2, 5, 3)


def test_flow_inverse_and_jacobian():
    torch.manual_seed(0)
    flow = fl.ResNetFlow(dim=2, width=16, layers=5, activation="tanh").double()
    with torch.no_grad():
        flow.weight2.normal_(std=0.3)
        flow.bias2.normal_(std=0.3)
    x = torch.randn(40, 2, dtype=torch.float64)
    torch.testing.assert_close(flow.inverse(flow(x)), x, rtol=0, atol=1e-9)
    det = flow.jacobian_determinant(x)
    # finite differences of the map agree with the autograd Jacobian determinant
    eps = 1e-6
    cols = [(flow(x + eps * e) - flow(x - eps * e)) / (2 * eps) for e in torch.eye(2, dtype=torch.float64)]
    fd = torch.linalg.det(torch.stack(cols, -1))
    torch.testing.assert_close(det, fd, rtol=1e-6, atol=1e-8)
    # in chunks (7 does not divide 40), and with batch dimensions: the same numbers up to rounding (matrix
    # products of other sizes), in the input's shape
    torch.testing.assert_close(flow.jacobian_determinant(x, chunk=7), det, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(flow.jacobian_determinant(x.reshape(4, 10, 2), chunk=3), det.reshape(4, 10), rtol=1e-14, atol=1e-14)
    assert flow.jacobian_determinant(x[:0]).shape == (0,)
    # trajectory and inverse in chunks too (both keep the input's batch shape)
    traj = flow.trajectory(x)
    torch.testing.assert_close(flow.trajectory(x.reshape(4, 10, 2), chunk=7), traj.reshape(6, 4, 10, 2),
                               rtol=1e-14, atol=1e-14)
    y = flow(x)
    torch.testing.assert_close(flow.inverse(y.reshape(5, 8, 2), chunk=3), flow.inverse(y).reshape(5, 8, 2),
                               rtol=0, atol=1e-11)
    assert flow.trajectory(x[:0]).shape == (6, 0, 2)
    with pytest.raises(ValueError, match="chunk"):
        flow.jacobian_determinant(x, chunk=0)


def test_flow_bad_inputs():
    flow = fl.ResNetFlow(dim=3, width=4, layers=2)
    with pytest.raises(ValueError, match="points must have shape"):
        flow(torch.randn(5, 2))
    with pytest.raises(TypeError, match="float64"):
        flow(torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation"):
        fl.ResNetFlow(activation="sigmoid")
    with pytest.raises(ValueError, match="layers"):
        fl.ResNetFlow(layers=0)
    with pytest.raises(ValueError, match="backend"):
        fl.ResNetFlow(backend="fortran")


@pytest.fixture(scope="module")
def l2_registration():
    src, tgt = circle_pair()
    return fl.register(src, tgt, data_term="l2", width=32, layers=6, steps=150, lr=1e-2, progress=False), src, tgt


def test_registration_l2_lowers_data_term_without_folds(l2_registration):
    r, src, tgt = l2_registration
    h = r.history
    assert len(h["loss"]) == len(h["data"]) == len(h["energy"]) == 150
    assert h["data"][-1] < 0.1 * h["data"][0]
    moved = r.transform(src)
    assert float(((moved - tgt) ** 2).sum(-1).mean()) < 0.1 * float(((src - tgt) ** 2).sum(-1).mean())
    grid = torch.stack(torch.meshgrid(torch.linspace(-8, 18, 15), torch.linspace(-8, 18, 15), indexing="ij"), -1).reshape(-1, 2)
    assert float(r.jacobian_determinant(grid).min()) > 0
    assert float(r.jacobian_determinant(src).min()) > 0


def test_registration_inverse_and_trajectory(l2_registration):
    r, src, tgt = l2_registration
    moved = r.transform(src)
    back = r.inverse(moved)
    assert float((back - src).abs().max()) < 1e-3 * float(src.abs().max())
    traj = r.trajectory(src)
    assert traj.shape == (7, src.shape[0], 2)
    torch.testing.assert_close(traj[0], src, rtol=0, atol=1e-5)
    torch.testing.assert_close(traj[-1], moved, rtol=0, atol=1e-5)
    np_moved = r.transform(src.numpy())  # numpy in, numpy out
    assert isinstance(np_moved, np.ndarray)
    np.testing.assert_allclose(np_moved, moved.numpy(), atol=1e-6)


def test_registration_save_load_round_trip(l2_registration, tmp_path):
    r, src, _ = l2_registration
    path = tmp_path / "reg.pt"
    r.save(path)
    r2 = fl.Registration.load(path)
    torch.testing.assert_close(r2.transform(src), r.transform(src))
    assert r2.history == r.history and r2.config["width"] == 32
    (tmp_path / "bad.pt").write_bytes(b"not a registration")
    with pytest.raises(ValueError, match="cannot read registration file"):
        fl.Registration.load(tmp_path / "bad.pt")


def test_registration_lbfgs_and_chamfer():
    src, tgt = circle_pair(40)
    tgt = tgt[torch.randperm(40)]
    r = fl.register(src, tgt, data_term="chamfer", optimizer="lbfgs", width=16, layers=4, steps=8, progress=False)
    # history holds one value per outer L-BFGS step (after its inner iterations): compare with the start
    assert float(fl.chamfer(r.transform(src), tgt)) < 0.1 * float(fl.chamfer(src, tgt))


def test_registration_checkpoint_resume_equals_uninterrupted(tmp_path):
    src, tgt = circle_pair(30)
    kw = dict(data_term="l2", width=8, layers=3, lr=1e-2, progress=False, dtype=torch.float64)
    full = fl.register(src, tgt, steps=20, **kw)
    ckpt = tmp_path / "ckpt.pt"
    fl.register(src, tgt, steps=10, checkpoint=ckpt, checkpoint_every=5, **kw)  # "interrupted" after 10
    resumed = fl.register(src, tgt, steps=20, checkpoint=ckpt, checkpoint_every=5, resume=True, **kw)
    assert len(resumed.history["loss"]) == 20
    assert resumed.history["loss"][-1] == pytest.approx(full.history["loss"][-1], rel=1e-9)
    torch.testing.assert_close(resumed.transform(src), full.transform(src))
    with pytest.raises(ValueError, match="other settings"):
        fl.register(src, tgt, steps=20, checkpoint=ckpt, resume=True, **{**kw, "width": 9})


def test_registration_divergence_keeps_last_finite_state(tmp_path):
    """An absurd learning rate overflows float32 after the first update: the run must stop there, naming
    the step, and hand back (and save) the last finite state instead of NaN output."""
    src, tgt = circle_pair(20)
    with pytest.raises(fl.RegistrationDiverged, match="diverged at step") as err:
        fl.register(src, tgt, data_term="l2", width=5, layers=2, steps=10, lr=1e30, progress=False,
                    checkpoint=tmp_path / "c.pt")
    partial = err.value.partial
    assert 1 <= err.value.step < 10
    assert len(partial.history["loss"]) == err.value.step
    assert all(math.isfinite(v) for v in partial.history["loss"])
    assert bool(torch.isfinite(partial.transform(src)).all())
    saved = fl.Registration.load(tmp_path / "c.partial.pt")
    torch.testing.assert_close(saved.transform(src), partial.transform(src))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(data_term="hausdorff"), ValueError, "data_term"),
        (dict(sigma=0), ValueError, "sigma"),
        (dict(steps=-1), ValueError, "steps"),
        (dict(optimizer="sgd"), ValueError, "optimizer"),
        (dict(sigma=float("nan")), ValueError, "sigma"),
    ],
)
def test_register_bad_arguments(kwargs, exc, match):
    src, tgt = circle_pair(10)
    with pytest.raises(exc, match=match):
        fl.register(src, tgt, progress=False, **kwargs)


def test_register_bad_clouds():
    src, tgt = circle_pair(10)
    with pytest.raises(ValueError, match="same point dimension"):
        fl.register(src, torch.randn(10, 3), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        fl.register(src.clone().fill_(float("nan")), tgt, progress=False)
    with pytest.raises(ValueError, match="empty"):
        fl.register(src[:0], tgt, progress=False)
    with pytest.raises(ValueError, match="one target point per source point"):
        fl.register(src, tgt[:5], data_term="l2", progress=False)
    with pytest.raises(TypeError, match="float32 or float64"):
        fl.register(src.long(), tgt, progress=False)


@pytest.mark.parametrize("data_term", ["l2", "chamfer", "sinkhorn"])
def test_registration_is_bitwise_deterministic_on_cpu(data_term):
    src, tgt = circle_pair(25)
    kw = dict(data_term=data_term, width=12, layers=3, steps=6, lr=1e-2, progress=False, seed=7, deterministic=True)
    a = fl.register(src, tgt, **kw)
    b = fl.register(src, tgt, **kw)
    assert a.history == b.history  # exact float equality, step by step
    for name, value in a.flow.state_dict().items():
        assert torch.equal(value, b.flow.state_dict()[name]), name
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
    c = fl.register(src, tgt, **{**kw, "seed": 8})
    assert c.history != a.history  # the seed matters: the test above could fail
