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
