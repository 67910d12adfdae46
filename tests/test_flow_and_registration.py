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


# -- the schedule -------------------------------------------------------------------------------------

from fastlddmm.registration import PRESETS, QUALITIES, Stage, plan  # noqa: E402


def test_plan_fills_stages_from_the_arguments_and_presets():
    fast = plan("fast", data_term="chamfer")
    assert sum(st.steps for st in fast) == PRESETS["fast"].steps
    assert fast[-1].sigma == PRESETS["fast"].sigma and fast[-1].data_term == "chamfer"
    for quality in QUALITIES:  # every preset ends at the sigma and blur asked for, on every point
        stages = plan(quality, data_term="sinkhorn", sigma=0.07, blur=0.03, steps=40)
        main = [st for st in stages if st.optimizer == "adam"]
        assert sum(st.steps for st in main) == 40
        assert stages[-1].sigma == pytest.approx(0.07) and stages[-1].blur == pytest.approx(0.03)
        assert stages[-1].points is None
        assert [st.sigma for st in main] == sorted([st.sigma for st in main], reverse=True)  # coarse to fine
        assert PRESETS[quality].refine == sum(st.steps for st in stages if st.optimizer == "lbfgs")
    mine = plan("best", data_term="chamfer", sigma=0.2, lr=0.01,
                schedule=[{"steps": 3, "sigma": 0.5, "points": 10}, Stage(2, optimizer="lbfgs")])
    assert mine == [Stage(3, "chamfer", 0.5, 0.02, "adam", 0.01, 10), Stage(2, "chamfer", 0.2, 0.02, "lbfgs", 1.0)]


@pytest.mark.parametrize("schedule, match", [
    ([], "schedule is empty"),
    ([{"steps": 3, "sigmaa": 1}], "unknown field"),
    ([Stage(0)], r"schedule\[0\]\.steps"),
    ([Stage(2), Stage(2, optimizer="newton")], r"schedule\[1\]\.optimizer"),
    ([Stage(2, points=0)], r"schedule\[0\]\.points"),
    (Stage(2), "list of Stage"),
])
def test_plan_bad_schedules(schedule, match):
    with pytest.raises((ValueError, TypeError), match=match):
        plan("fast", schedule=schedule)
    with pytest.raises(ValueError, match="steps=5 but the schedule"):
        plan("fast", steps=5, schedule=[Stage(2)])


def test_register_runs_the_stages_in_order():
    src, tgt = circle_pair(30)
    seen = []
    schedule = [Stage(3, sigma=0.4, points=12), Stage(2, data_term="chamfer"), Stage(2, optimizer="lbfgs")]
    r = fl.register(src, tgt, data_term="l2", width=8, layers=3, progress=False, schedule=schedule,
                    callback=lambda step, record: seen.append((step, record["stage"])))
    assert seen == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 2), (6, 2)]
    assert r.history["stage"] == [0, 0, 0, 1, 1, 2, 2]
    assert [st["data_term"] for st in r.config["schedule"]] == ["l2", "chamfer", "l2"]
    assert r.config["steps"] == 7 and r.config["sigma"] == 0.1  # the last stage's


def test_a_subset_as_large_as_the_cloud_is_the_whole_cloud():
    src, tgt = circle_pair(20)
    kw = dict(data_term="chamfer", width=8, layers=3, progress=False, dtype=torch.float64)
    whole = fl.register(src, tgt, schedule=[Stage(4)], **kw)
    same = fl.register(src, tgt, schedule=[Stage(4, points=20)], **kw)
    fewer = fl.register(src, tgt, schedule=[Stage(4, points=7)], **kw)
    assert same.history == whole.history
    assert fewer.history["data"] != whole.history["data"]  # the test above could fail
    # the subset's data term is the Chamfer distance between subsets: its first value (at the identity) is
    # that of 7 source and 7 target points drawn from the seed, not of the whole clouds
    assert fewer.history["data"][0] != pytest.approx(whole.history["data"][0], rel=1e-6)


# stopped inside stage 0, at the 0 -> 1 boundary, at the 1 -> 2 boundary, inside the L-BFGS stage
@pytest.mark.parametrize("stop_after, stage", [(4, 0), (6, 0), (8, 1), (10, 2)])
def test_checkpoint_resume_across_stages_equals_uninterrupted(tmp_path, stop_after, stage):
    """Interrupted (KeyboardInterrupt from the callback) after ``stop_after`` steps with a checkpoint every 2
    steps, then resumed: the same history and flow as one uninterrupted run, whichever stage it stopped in."""
    src, tgt = circle_pair(24)
    schedule = [Stage(6, sigma=0.3, points=15), Stage(2), Stage(3, optimizer="lbfgs")]
    kw = dict(data_term="chamfer", width=8, layers=3, progress=False, dtype=torch.float64, schedule=schedule)
    full = fl.register(src, tgt, **kw)
    ckpt = tmp_path / "ckpt.pt"

    def stop(step, record):
        if step + 1 == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fl.register(src, tgt, checkpoint=ckpt, checkpoint_every=2, callback=stop, **kw)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == stop_after and saved["stage"] == stage  # the stage of the optimiser state it holds
    resumed = fl.register(src, tgt, checkpoint=ckpt, checkpoint_every=2, resume=True, **kw)
    assert resumed.history == full.history
    for name, value in full.flow.state_dict().items():
        torch.testing.assert_close(resumed.flow.state_dict()[name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings.*schedule"):
        fl.register(src, tgt, checkpoint=ckpt, resume=True,
                    **{**kw, "schedule": [Stage(6, sigma=0.5, points=15), Stage(5)]})


def test_quality_presets_are_checked_and_recorded():
    src, tgt = circle_pair(12)
    with pytest.raises(ValueError, match="quality"):
        fl.register(src, tgt, quality="ultra", progress=False)
    r = fl.register(src, tgt, data_term="l2", quality="fast", steps=3, width=6, layers=2, progress=False)
    assert r.config["quality"] == "fast" and r.config["width"] == 6 and r.config["steps"] == 3


# -- meshes: fold report and barrier ---------------------------------------------------------------------

def _disk_mesh(rings=4, around=12):
    """A triangulated disk in 2-D (centre, then rings), faces counter-clockwise (positive signed areas)."""
    pts = [[0.0, 0.0]]
    for r in range(1, rings + 1):
        t = 2 * math.pi * np.arange(around) / around
        pts += np.stack([r * np.cos(t), r * np.sin(t)], 1).tolist()
    faces = []
    for j in range(around):
        faces.append([0, 1 + j, 1 + (j + 1) % around])
    for r in range(1, rings):
        a, b = 1 + (r - 1) * around, 1 + r * around
        for j in range(around):
            jn = (j + 1) % around
            faces += [[a + j, b + j, b + jn], [a + j, b + jn, a + jn]]
    return torch.tensor(pts, dtype=torch.float64) / rings, torch.tensor(faces)


def test_register_reports_flipped_triangles_and_warns():
    """A disk registered (l2, known correspondences) onto its mirror image cannot be reached without folding:
    the report must see flipped triangles, warn, and agree with fastlddmm.mesh.flipped computed by hand."""
    from fastlddmm import mesh

    src, faces = _disk_mesh()
    tgt = src * torch.tensor([-1.0, 1.0]) + torch.tensor([0.3, 0.0])
    with pytest.warns(mesh.FoldWarning, match="triangles"):
        r = fl.register(src, tgt, data_term="l2", sigma=0.02, width=32, layers=4, steps=150, lr=2e-2,
                        faces=faces, progress=False)
    report = r.fold_report()
    assert report["triangles"] == faces.shape[0] and report["flipped_triangles"] > 0
    by_hand = mesh.flipped(src, r.transform(src), r.jacobian(mesh.centroids(src, faces)), faces)
    assert int(by_hand.sum()) == report["flipped_triangles"]
    assert report["flipped_fraction"] == pytest.approx(report["flipped_triangles"] / faces.shape[0])
    assert torch.equal(r.flipped_triangles(), by_hand)


def test_fold_penalty_enters_the_loss_and_needs_faces():
    src, faces = _disk_mesh(rings=2, around=8)
    tgt = src * torch.tensor([-1.0, 1.0])
    kw = dict(data_term="l2", sigma=0.05, width=16, layers=3, steps=40, lr=2e-2, progress=False, faces=faces)
    with pytest.raises(ValueError, match="fold_penalty needs"):
        fl.register(src, tgt, data_term="l2", fold_penalty=1.0, progress=False)
    with pytest.raises(ValueError, match="fold_penalty must be"):
        fl.register(src, tgt, fold_penalty=-1.0, **{k: v for k, v in kw.items() if k != "steps"})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = fl.register(src, tgt, fold_penalty=0.0, **kw)
        barred = fl.register(src, tgt, fold_penalty=10.0, **kw)
    weight = 1 / (2 * 0.05**2)
    for r, penalised in ((plain, False), (barred, True)):
        h = r.history
        extra = [loss - (weight * d + e) for loss, d, e in zip(h["loss"], h["data"], h["energy"])]
        assert min(extra) >= -1e-12 * max(h["loss"])
        assert (max(extra) > 0) == penalised  # mirroring turns triangles over: the barrier sees it
    assert barred.config["fold_penalty"] == 10.0
