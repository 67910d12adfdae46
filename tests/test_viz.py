"""fastlddmm.viz: the GIF has the frames it promises, the PNGs are real pictures, bad input is named."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="pictures need matplotlib: pip install 'fastlddmm[viz]'")
Image = pytest.importorskip("PIL.Image", reason="GIFs need pillow: pip install 'fastlddmm[viz]'")

from fastlddmm import viz  # noqa: E402


def _circle_trajectory(layers=4, n=31, dim=2):
    """A closed curve (circle) growing into an ellipse over ``layers`` Euler steps: (L + 1, N, D)."""
    t = 2 * np.pi * np.arange(n) / n
    base = np.stack([np.cos(t), np.sin(t)] + [np.sin(2 * t)] * (dim - 2), axis=1)
    scale = np.array([2.0, 1.0, 1.5][:dim])
    return np.stack([base * (1 + (scale - 1) * l / layers) for l in range(layers + 1)])


class _StubRegistration:
    """What plot_registration needs from a Registration: source, target, transform, jacobian_determinant."""

    def __init__(self, source, target, matrix):
        self.source, self.target, self.matrix = source, target, matrix

    def transform(self, points):
        return np.asarray(points) @ self.matrix.T

    def jacobian_determinant(self, points):
        return np.full(len(points), np.linalg.det(self.matrix))


def _frames(path):
    im = Image.open(path)
    frames, durations = [], []
    for k in range(im.n_frames):
        im.seek(k)
        frames.append(np.asarray(im.convert("RGB"), dtype=np.int16))
        durations.append(im.info.get("duration"))
    return frames, durations


@pytest.mark.parametrize("inbetween", [0, 2])
def test_gif_2d_lines_has_the_promised_frames(tmp_path, inbetween):
    traj = _circle_trajectory(layers=4)
    path = viz.animate_flow(traj, traj[0], traj[-1] + 0.1, tmp_path / "flow.gif", closed=True,
                            inbetween=inbetween, hold=3, size=2.0, dpi=40)
    frames, durations = _frames(path)
    # L · (inbetween + 1) + 1 distinct frames; the 3 held copies of the last frame merge into it
    assert len(frames) == 4 * (inbetween + 1) + 1
    # hold = 3 → the last frame is shown 4 times as long (GIF stores durations in 10 ms units: ± 10 ms)
    assert durations[-1] == pytest.approx(4 * 1000 / 12, abs=10)
    assert durations[0] == pytest.approx(1000 / 12, abs=10)
    assert np.abs(frames[0] - frames[-1]).max() > 0  # the shape moved
    assert all(f.std() > 0 for f in frames)  # no blank frame


def test_gif_3d_scatter(tmp_path):
    traj = _circle_trajectory(layers=3, n=40, dim=3)
    target = traj[-1][::2] + 0.05
    path = viz.animate_flow(traj, None, target, tmp_path / "flow3d.gif", inbetween=1, hold=0, size=2.0, dpi=40,
                            title="3-D")
    frames, _ = _frames(path)
    assert len(frames) == 3 * 2 + 1
    assert np.abs(frames[0] - frames[-1]).max() > 0


def test_gif_edges_and_tensor_input(tmp_path):
    torch = pytest.importorskip("torch")
    traj = torch.tensor(_circle_trajectory(layers=2, n=9))
    edges = torch.tensor([[0, 1], [1, 2], [5, 6]])
    viz.animate_flow(traj, traj[0], None, tmp_path / "e.gif", edges=edges, hold=0, inbetween=0, size=2.0, dpi=40)
    assert len(_frames(tmp_path / "e.gif")[0]) == 3


def test_gif_bad_inputs_are_named(tmp_path):
    traj = _circle_trajectory(layers=2, n=9)
    with pytest.raises(ValueError, match="trajectory must have shape"):
        viz.animate_flow(traj[0], None, None, tmp_path / "a.gif")
    with pytest.raises(ValueError, match="edges refers to point 9"):
        viz.animate_flow(traj, None, None, tmp_path / "a.gif", edges=np.array([[0, 9]]))
    with pytest.raises(ValueError, match="source has 8 points"):
        viz.animate_flow(traj, traj[0][:8], None, tmp_path / "a.gif")
    with pytest.raises(ValueError, match="target has 3 coordinates"):
        viz.animate_flow(traj, None, np.zeros((4, 3)), tmp_path / "a.gif")
    with pytest.raises(ValueError, match=r"\.gif"):
        viz.animate_flow(traj, None, None, tmp_path / "a.png")
    bad = traj.copy()
    bad[1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        viz.animate_flow(bad, None, None, tmp_path / "a.gif")
    assert not any(tmp_path.iterdir())


def test_plot_losses(tmp_path):
    steps = np.arange(1, 41)
    history = {"loss": list(5.0 / steps + 0.1), "data": list(0.05 / steps), "energy": [0.0] + list(0.01 * steps[1:])}
    path = viz.plot_losses(history, tmp_path / "losses.png", sigma=0.1)
    im = Image.open(path)
    assert im.format == "PNG" and im.size[0] > 300
    assert np.asarray(im.convert("L")).std() > 0
    with pytest.raises(ValueError, match="history"):
        viz.plot_losses({"loss": []}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="history must be a dict"):
        viz.plot_losses([1, 2], tmp_path / "x.png")


@pytest.mark.parametrize("dim", [2, 3])
def test_plot_registration(tmp_path, dim):
    traj = _circle_trajectory(layers=1, n=25, dim=dim)
    matrix = np.diag([2.0, 1.0, 1.5][:dim])
    reg = _StubRegistration(traj[0], traj[-1], matrix)
    path = viz.plot_registration(reg, tmp_path / "reg.png", grid=7)
    im = Image.open(path)
    assert im.format == "PNG"
    assert np.asarray(im.convert("L")).std() > 0


def test_deformed_grid_is_the_transform_of_the_grid():
    reg = _StubRegistration(np.zeros((3, 2)), np.zeros((3, 2)), np.array([[1.0, 0.5], [0.0, 2.0]]))
    lines, moved = viz._deformed_grid(reg, np.array([-1.0, -1.0]), np.array([1.0, 1.0]), 5, reg.source, samples=11)
    assert lines.shape == moved.shape == (10, 11, 2)
    np.testing.assert_allclose(moved, lines @ reg.matrix.T)


def test_plot_registration_needs_a_registration(tmp_path):
    with pytest.raises(TypeError, match="Registration"):
        viz.plot_registration(object(), tmp_path / "r.png")


def test_subsample_is_a_fixed_sorted_subset_and_only_beyond_the_limit():
    assert viz._subsample(100, 100) is None and viz._subsample(100, None) is None
    keep = viz._subsample(1000, 37)
    assert len(keep) == 37 and len(set(keep.tolist())) == 37 and (np.diff(keep) > 0).all() and keep.max() < 1000
    np.testing.assert_array_equal(keep, viz._subsample(1000, 37))  # the same picture on every run
    with pytest.raises(ValueError, match="max_points"):
        viz._subsample(1000, 0)


class _RecordingRegistration(_StubRegistration):
    def __init__(self, *args):
        super().__init__(*args)
        self.det_points = self.transformed = 0

    def transform(self, points):
        self.transformed += len(points)
        return super().transform(points)

    def jacobian_determinant(self, points):
        self.det_points += len(points)
        return super().jacobian_determinant(points)


def test_big_clouds_are_drawn_as_a_subset(tmp_path):
    """3-D clouds of 3000 points with max_points=200: only 200 are transformed and checked for folds, the
    title says so, and the GIF is made from the subset too."""
    rng = np.random.default_rng(0)
    src, tgt = rng.normal(size=(3000, 3)), rng.normal(size=(2500, 3))
    reg = _RecordingRegistration(src, tgt, np.diag([1.2, 1.0, 0.9]))
    viz.plot_registration(reg, tmp_path / "reg.png", max_points=200, dpi=40)
    assert reg.transformed == 200 and reg.det_points == 200
    full = _RecordingRegistration(src, tgt, np.diag([1.2, 1.0, 0.9]))
    viz.plot_registration(full, tmp_path / "full.png", max_points=None, dpi=40)
    assert full.transformed == 3000 and full.det_points == 3000
    traj = np.stack([src * (1 + 0.1 * l) for l in range(3)])
    path = viz.animate_flow(traj, src, tgt, tmp_path / "flow.gif", inbetween=0, hold=0, size=2.0, dpi=40,
                            max_points=200)
    frames, _ = _frames(path)
    assert len(frames) == 3


# -- 3-D: the camera, shaded meshes, flipped triangles, the filmstrip --------------------------------------

def _tube(around=16, rings=9, length=3.0):
    """A closed-ish tube along y (a capped-off cylinder is not needed: an open tube is a mesh too)."""
    t = 2 * np.pi * np.arange(around) / around
    y = np.linspace(0, length, rings)
    pts = np.stack([np.stack([np.cos(t), np.full(around, yy), np.sin(t)], 1) for yy in y]).reshape(-1, 3)
    faces = []
    for i in range(rings - 1):
        for j in range(around):
            a, b = i * around + j, i * around + (j + 1) % around
            faces += [[a, a + around, b + around], [a, b + around, b]]
    return pts, np.array(faces)


@pytest.mark.parametrize("up, axis", [("y", 1), ("z", 2), ("-y", 1), ("x", 0)])
def test_camera_draws_up_upwards(up, axis):
    cam = viz._Camera(np.random.default_rng(0).normal(size=(50, 3)), up, (0.0, 0.0))
    direction = np.eye(3)[axis] * (-1 if up.startswith("-") else 1)
    xy, depth = cam(np.stack([np.zeros(3), direction]))
    np.testing.assert_allclose(xy[1] - xy[0], [0.0, 1.0], atol=1e-12)  # straight up on the screen
    assert np.allclose(cam.basis @ cam.basis.T, np.eye(3))  # a rotation: lengths and angles kept
    assert np.linalg.det(cam.basis) == pytest.approx(1.0)  # not a mirror image


def test_camera_auto_up_is_the_principal_axis_and_elevation_looks_down():
    rng = np.random.default_rng(1)
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    pts = rng.normal(size=(400, 3)) * 0.1 + np.outer(rng.normal(size=400) * 3, axis)
    cam = viz._Camera(pts, "auto", (0.0, 0.0))
    assert abs(cam.basis[1] @ axis) > 0.99
    flat = viz._Camera(pts, "y", (0.0, 0.0))
    raised = viz._Camera(pts, "y", (30.0, 0.0))
    # raised: the camera is above the shape, so its direction towards the camera has a +y component
    assert flat.basis[2] @ [0, 1, 0] == pytest.approx(0.0, abs=1e-12)
    assert raised.basis[2] @ [0, 1, 0] == pytest.approx(np.sin(np.radians(30)))
    with pytest.raises(ValueError, match="up must be"):
        viz._Camera(pts, "w", (0.0, 0.0))


class _MeshRegistration(_StubRegistration):
    def __init__(self, source, target, matrix, faces, flipped):
        super().__init__(source, target, matrix)
        self.faces, self._flipped = faces, flipped

    def flipped_triangles(self, faces=None):
        return self._flipped


def _red_pixels(path) -> int:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)).sum())


def test_mesh_registration_picture_shows_flipped_triangles_in_red(tmp_path):
    pts, faces = _tube()
    none = np.zeros(len(faces), dtype=bool)
    some = none.copy()
    some[100:140] = True
    clean = viz.plot_registration(_MeshRegistration(pts, pts * 1.1, np.eye(3), faces, none), tmp_path / "a.png",
                                  up="y", dpi=60)
    red = viz.plot_registration(_MeshRegistration(pts, pts * 1.1, np.eye(3), faces, some), tmp_path / "b.png",
                                up="y", dpi=60)
    assert _red_pixels(clean) == 0 and _red_pixels(red) > 20
    # upright and tight: a tube standing along y gives panels taller than wide
    width, height = Image.open(clean).size
    assert width < 3 * height


def test_filmstrip_has_one_panel_per_time_and_the_target(tmp_path):
    pts, faces = _tube(rings=5)
    traj = np.stack([pts + [0.5 * l, 0, 0] for l in range(5)])
    path = viz.plot_filmstrip(traj, tmp_path / "f.png", target=traj[-1] + 0.1, faces=faces, target_faces=faces,
                              up="y", height=2.0, dpi=50)
    im = Image.open(path)
    assert im.format == "PNG" and im.size[0] > 2.5 * im.size[1]  # six panels side by side
    a = viz.plot_filmstrip(traj, tmp_path / "g.png", times=(0.0, 1.0), up="y", height=2.0, dpi=50)  # dots
    assert Image.open(a).size[0] < im.size[0]
    np.testing.assert_allclose(viz._at_time(traj, 0.5), traj[2])
    np.testing.assert_allclose(viz._at_time(traj, 0.375), 0.5 * (traj[1] + traj[2]))
    with pytest.raises(ValueError, match="times"):
        viz.plot_filmstrip(traj, tmp_path / "h.png", times=(0.0, 1.5))
    face = _circle_trajectory(layers=2, n=20)
    viz.plot_filmstrip(face, tmp_path / "2d.png", target=face[-1], height=2.0, dpi=50)  # 2-D curves work too


def test_gif_of_a_mesh(tmp_path):
    pts, faces = _tube(rings=4)
    traj = np.stack([pts * (1 + 0.2 * l) for l in range(3)])
    flipped = np.zeros(len(faces), dtype=bool)
    flipped[:10] = True
    path = viz.animate_flow(traj, pts, traj[-1], tmp_path / "m.gif", faces=faces, target_faces=faces,
                            flipped=flipped, up="y", inbetween=0, hold=0, size=2.0, dpi=40)
    frames, _ = _frames(path)
    assert len(frames) == 3
    red = [int(((f[..., 0] > 200) & (f[..., 1] < 60) & (f[..., 2] < 60)).sum()) for f in frames]
    assert red[0] == 0 and red[-1] > 0  # flipped triangles are red at t = 1 only
    with pytest.raises(ValueError, match="faces refers to point"):
        viz.animate_flow(traj, None, None, tmp_path / "x.gif", faces=np.array([[0, 1, 999]]))
