"""Pictures of a registration: the flow as an animated GIF and as a filmstrip, the loss curves, a
before/after figure.

    from fastlddmm import viz
    viz.animate_flow(r.trajectory(source), source, target, "flow.gif", edges=edges)   # 2-D curves
    viz.plot_filmstrip(r.trajectory(source), "filmstrip.png", target=target, faces=faces, up="y")
    viz.plot_losses(r.history, "losses.png")
    viz.plot_registration(r, "registration.png", edges=edges)

3-D shapes are drawn through an orthographic camera on flat 2-D axes: ``up`` is drawn upwards ("y" for
most OBJ / PLY scans, "z", "-y", ..., a 3-vector, or "auto": the shape's principal axis), the shape is
seen from the front and turned by ``view`` = (elevation, azimuth) in degrees, with equal aspect and
bounds fitted to the shapes. Meshes (``faces``) are shaded surfaces, depth-sorted, with flipped triangles
(fastlddmm.mesh.flipped) in red; clouds without faces are dots shaded by depth.

matplotlib (and pillow for GIFs) are optional: ``pip install 'fastlddmm[viz]'``. Figures are drawn on
matplotlib's Agg canvas without pyplot, so nothing here changes the caller's matplotlib backend or
opens a window.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ._atomic import atomic_write

__all__ = ["UPS", "animate_flow", "plot_filmstrip", "plot_losses", "plot_registration"]

# Colours: the moving shape is the strong one; where it starts and where it should go are faint.
MOVING = "#1f5fbf"
TARGET = "#d62728"
SOURCE = "#7f7f7f"
GRID = "#9aa5b1"
# Shaded surfaces: the moving / warped shape blue, the target warm, flipped triangles bright red.
SURFACE_SOURCE = "#a7adb5"
SURFACE_MOVING = "#4f86d6"
SURFACE_TARGET = "#e0a36a"
FLIPPED = "#ff1a1a"
UPS = ("auto", "x", "y", "z", "-x", "-y", "-z")
DEFAULT_VIEW = (12.0, 25.0)  # (elevation, azimuth) in degrees, from the front
# Meshes with more triangles are drawn as dots (a subset, see MAX_POINTS): depth-sorting and drawing
# millions of polygons takes minutes in matplotlib and shows nothing more at this size.
MAX_FACES = 200_000


def _matplotlib():
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("pictures need matplotlib: pip install 'fastlddmm[viz]' (matplotlib and pillow)") from None
    return Figure


def _np(a, name: str) -> np.ndarray:
    """A tensor or array as a float64 numpy array."""
    if a is None:
        return None
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    return a


def _check_cloud(a, name: str, dim: int | None = None) -> np.ndarray:
    a = _np(a, name)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] not in (2, 3):
        raise ValueError(f"{name} must have shape (N, 2) or (N, 3) with N >= 1, got {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} has {a.shape[1]} coordinates per point, expected {dim} like the trajectory")
    return a


def _edges(edges, n: int, name: str, *, polyline: bool = False, closed: bool = False) -> np.ndarray | None:
    """Segments (E, 2) to draw: given ones, or consecutive points for an ordered curve; None = scatter."""
    if edges is None:
        if not (polyline or closed):
            return None
        idx = np.arange(n)
        seg = np.stack([idx[:-1], idx[1:]], axis=1)
        return np.concatenate([seg, [[n - 1, 0]]]) if closed and n > 2 else seg
    return _indices(edges, n, name, "E", 2)


def _indices(a, n: int, name: str, rows: str, width: int) -> np.ndarray:  # -> (rows, width) int64
    """An integer array of point indices (segments, triangles), checked against n points."""
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[1] != width or a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array of shape ({rows}, {width}), got {a.dtype} {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= n):
        raise ValueError(f"{name} refers to point {int(a.max())}, but there are only {n} points")
    return a.astype(np.int64)


def _limits(clouds, margin: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """Equal-scale bounds (lo, hi) per axis enclosing every cloud, with a margin."""
    pts = np.concatenate([c.reshape(-1, c.shape[-1]) for c in clouds])
    lo, hi = pts.min(0), pts.max(0)
    center, half = (lo + hi) / 2, (hi - lo).max() / 2 * (1 + margin) + 1e-12
    return center - half, center + half


def _draw2d(ax, pts, edges, *, color, lw=1.6, alpha=1.0, ls="-", size=6, label=None, zorder=2):
    """A 2-D shape as lines (with edges) or dots; returns the artist so frames can update it."""
    from matplotlib.collections import LineCollection

    if edges is not None:
        lc = LineCollection(pts[edges], colors=color, linewidths=lw, alpha=alpha, linestyles=ls, label=label,
                            zorder=zorder, capstyle="round", joinstyle="round")
        ax.add_collection(lc)
        return lc
    return ax.scatter(pts[:, 0], pts[:, 1], s=size, color=color, alpha=alpha, label=label, lw=0, zorder=zorder)


def _update2d(artist, pts, edges):
    if edges is not None:
        artist.set_segments(pts[edges])
    else:
        artist.set_offsets(pts)


def _style2d(ax, lo, hi):
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_color("#d0d0d0")


# -- 3-D through an orthographic camera, on 2-D axes ---------------------------------------------------

def _rotate(vectors: np.ndarray, axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues' rotation of row vectors about a unit axis."""
    a = math.radians(degrees)
    k = axis / np.linalg.norm(axis)
    return (vectors * math.cos(a) + np.cross(k, vectors) * math.sin(a)
            + np.outer(vectors @ k, k) * (1 - math.cos(a)))


def _signed(v: np.ndarray) -> np.ndarray:
    """v with the sign that makes its largest component positive (principal axes have no sign)."""
    return v if v[np.argmax(np.abs(v))] > 0 else -v


def _up_vector(points: np.ndarray, up) -> tuple[np.ndarray, np.ndarray | None]:
    """(unit up, the front it implies or None) for up in UPS or a 3-vector."""
    if isinstance(up, str):
        if up not in UPS:
            raise ValueError(f"up must be one of {', '.join(UPS)} or a 3-vector, got {up!r}")
        if up == "auto":
            centred = points - points.mean(0)
            _, vecs = np.linalg.eigh(centred.T @ centred)  # ascending variances
            return _signed(vecs[:, 2]), None
        axis = np.eye(3)["xyz".index(up[-1])] * (-1.0 if up.startswith("-") else 1.0)
        # the usual front for each up: y-up scans face +z; z-up shapes are seen from -y (as matplotlib does)
        front = {"x": np.array([0.0, 0.0, 1.0]), "y": np.array([0.0, 0.0, 1.0]), "z": np.array([0.0, -1.0, 0.0])}
        return axis, front[up[-1]]
    vec = np.asarray(up, dtype=np.float64).reshape(-1)
    if vec.shape != (3,) or not np.isfinite(vec).all() or not np.linalg.norm(vec) > 0:
        raise ValueError(f"up must be one of {', '.join(UPS)} or a non-zero 3-vector, got {up!r}")
    return vec / np.linalg.norm(vec), None


class _Camera:
    """Orthographic: points (..., 3) -> screen (..., 2) (right, up) and depth (...) (larger: nearer)."""

    def __init__(self, points: np.ndarray, up, view: tuple[float, float]):
        u, front = _up_vector(points, up)
        if front is None:  # seen across its smallest spread perpendicular to up: the broadest view
            centred = points - points.mean(0)
            flat = centred - np.outer(centred @ u, u)
            _, vecs = np.linalg.eigh(flat.T @ flat)
            front = _signed(vecs[:, 1]) if abs(vecs[:, 0] @ u) > 0.9 else _signed(vecs[:, 0])
        f = front - (front @ u) * u
        if np.linalg.norm(f) < 1e-9:  # front along up: any perpendicular will do
            f = np.cross(u, np.eye(3)[np.argmin(np.abs(u))])
        f = f / np.linalg.norm(f)
        elev, azim = view
        f = _rotate(f[None], u, azim)[0]
        r = np.cross(u, f)
        f, u = _rotate(np.stack([f, u]), r, -elev)  # the camera rises: it looks down on the shape
        self.basis = np.stack([np.cross(u, f), u, f])  # rows: right, up, towards the camera

    def __call__(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cam = pts @ self.basis.T
        return cam[..., :2], cam[..., 2]

    def normals(self, pts: np.ndarray, faces: np.ndarray) -> np.ndarray:  # -> (F, 3) in camera axes, unit
        cam = pts @ self.basis.T
        n = np.cross(cam[faces[:, 1]] - cam[faces[:, 0]], cam[faces[:, 2]] - cam[faces[:, 0]])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)


_LIGHT = np.array([-0.35, 0.55, 1.0]) / np.linalg.norm([-0.35, 0.55, 1.0])  # from the upper left, in front


def _rgb(color: str) -> np.ndarray:
    from matplotlib.colors import to_rgb

    return np.array(to_rgb(color))


def _shaded(normals: np.ndarray, color: str, flipped: np.ndarray | None = None) -> np.ndarray:  # -> (F, 4)
    """Lambert shading with two-sided light: faces turned away from the camera (seen through an opening, or
    flipped) get a darker tint; flipped triangles are drawn in FLIPPED whatever their side."""
    lam = normals @ _LIGHT
    facing = normals[:, 2] >= 0
    light = np.where(facing, 0.32 + 0.68 * np.clip(lam, 0, 1), 0.22 + 0.35 * np.clip(-lam, 0, 1))
    rgb = _rgb(color)[None] * light[:, None]
    if flipped is not None and flipped.any():
        rgb[flipped] = _rgb(FLIPPED) * (0.75 + 0.25 * np.abs(lam[flipped]))[:, None]
    return np.concatenate([np.clip(rgb, 0, 1), np.ones((len(rgb), 1))], axis=1)


def _surface(camera: _Camera, pts: np.ndarray, faces: np.ndarray, color: str, flipped=None):
    """(polygons (F, 3, 2) far to near, their RGBA colours) of a shaded mesh."""
    xy, depth = camera(pts)
    order = np.argsort(depth[faces].mean(1), kind="stable")  # painter's algorithm: far ones first
    colors = _shaded(camera.normals(pts, faces), color, flipped)
    return xy[faces[order]], colors[order]


def _dots(camera: _Camera, pts: np.ndarray, color: str):
    """(positions (N, 2) far to near, RGBA colours: nearer is brighter) of a cloud."""
    xy, depth = camera(pts)
    order = np.argsort(depth, kind="stable")
    span = float(np.ptp(depth)) or 1.0
    light = 0.45 + 0.55 * (depth[order] - depth.min()) / span
    rgb = _rgb(color)[None] * light[:, None]
    return xy[order], np.concatenate([rgb, np.ones((len(rgb), 1))], axis=1)


def _dot_size(n: int, panel_inches: float) -> float:
    """Marker area (points²) so that n dots cover a panel without becoming a blob."""
    return float(np.clip(2500.0 * panel_inches**2 / max(n, 1), 0.4, 30.0))


def _bounds(xys, margin: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """Screen bounds (lo, hi) enclosing every projected shape, with a margin (equal aspect is kept by the
    axes; the figure is sized to the bounds' aspect)."""
    pts = np.concatenate([a.reshape(-1, 2) for a in xys])
    lo, hi = pts.min(0), pts.max(0)
    pad = (hi - lo).max() * margin + 1e-12
    return lo - pad, hi + pad


def _panel(ax, lo, hi, title: str | None = None) -> None:
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)


def _draw_shape(ax, camera: _Camera, pts: np.ndarray, faces, color: str, *, flipped=None, size: float = 4.0,
                alpha: float = 1.0, zorder: int = 2):
    """A mesh as a shaded surface, or a cloud as depth-shaded dots; returns the artist."""
    if faces is not None:
        from matplotlib.collections import PolyCollection

        polys, colors = _surface(camera, pts, faces, color, flipped)
        colors[:, 3] = alpha
        # edges in the face colour, thin: no hairline gaps between neighbouring triangles
        pc = PolyCollection(polys, facecolors=colors, edgecolors=colors, linewidths=0.15, zorder=zorder)
        ax.add_collection(pc)
        return pc
    xy, colors = _dots(camera, pts, color)
    colors[:, 3] = alpha
    return ax.scatter(xy[:, 0], xy[:, 1], s=size, c=colors, lw=0, zorder=zorder)


def _update_shape(artist, camera: _Camera, pts: np.ndarray, faces, color: str, flipped=None) -> None:
    if faces is not None:
        polys, colors = _surface(camera, pts, faces, color, flipped)
        artist.set_verts(polys)
        artist.set_facecolor(colors)
        artist.set_edgecolor(colors)
    else:
        xy, colors = _dots(camera, pts, color)
        artist.set_offsets(xy)
        artist.set_facecolor(colors)


def _faces(faces, n: int, name: str) -> np.ndarray | None:
    """Triangles (F, 3) int64 to draw, or None (draw dots)."""
    return None if faces is None else _indices(faces, n, name, "F", 3)


def _flip_mask(flipped, faces: np.ndarray | None) -> np.ndarray | None:
    if flipped is None or faces is None:
        return None
    if hasattr(flipped, "detach"):
        flipped = flipped.detach().cpu().numpy()
    flipped = np.asarray(flipped, dtype=bool).reshape(-1)
    if flipped.shape[0] != faces.shape[0]:
        raise ValueError(f"flipped must have one entry per triangle ({faces.shape[0]}), got {flipped.shape[0]}")
    return flipped


def _at_time(traj: np.ndarray, t: float) -> np.ndarray:
    """The flow's points at time t in [0, 1]: between two Euler steps, along the step (see _frames)."""
    layers = traj.shape[0] - 1
    s = min(max(t, 0.0), 1.0) * layers
    k = min(int(math.floor(s)), layers - 1)
    frac = s - k
    return (1 - frac) * traj[k] + frac * traj[k + 1]


def _fraction(t: float) -> str:
    from fractions import Fraction

    f = Fraction(t).limit_denominator(16)
    return str(f) if abs(float(f) - t) < 1e-9 else f"{t:.2f}"


# Points drawn at most per cloud: beyond, a fixed random subset is drawn (matplotlib takes seconds per
# frame with millions of points, and a picture shows no more at this size).
MAX_POINTS = 20_000


def _subsample(n: int, max_points: int | None) -> np.ndarray | None:
    """Sorted indices of a fixed random subset of max_points of n points, or None to draw them all."""
    if max_points is None or n <= max_points:
        return None
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
        raise ValueError(f"max_points must be a positive integer or None, got {max_points!r}")
    return np.sort(np.random.default_rng(0).choice(n, size=max_points, replace=False))


def _shown(title: str | None, kept: int, n: int) -> str:
    note = f"{kept:,} of {n:,} points shown"
    return f"{title} ({note})" if title else note


def _frames(traj: np.ndarray, inbetween: int) -> list[tuple[float, np.ndarray]]:
    """(t, points) for each frame: the L+1 states and ``inbetween`` linear steps between consecutive ones.

    A straight line between x^l and x^{l+1} is exactly the Euler step x^l + s Δ v_l(x^l), s in [0, 1],
    so the in-between frames show the discrete flow itself, not an approximation of it.
    """
    layers = traj.shape[0] - 1
    out = []
    for layer in range(layers):
        for k in range(inbetween + 1):
            s = k / (inbetween + 1)
            out.append(((layer + s) / layers, (1 - s) * traj[layer] + s * traj[layer + 1]))
    out.append((1.0, traj[-1]))
    return out


def animate_flow(
    trajectory,  # (L + 1, N, D), D = 2 or 3: r.trajectory(source)
    source=None,  # (N, D); default trajectory[0]
    target=None,  # (M, D) or None
    path="flow.gif",
    *,
    edges=None,  # (E, 2) int: segments between points of the moving shape (draws curves as lines)
    target_edges=None,  # (E', 2) int: segments of the target; default: edges when M == N
    faces=None,  # (F, 3) int: triangles of the moving shape (3-D: drawn as a shaded surface)
    target_faces=None,  # (F', 3) int: triangles of the target
    flipped=None,  # (F,) bool: triangles that flip by t = 1, drawn in red at the end
    polyline: bool = False,  # no edges given: the points are one ordered curve
    closed: bool = False,  # ... and it is a closed loop
    inbetween: int = 2,
    hold: int = 6,
    fps: int = 12,
    title: str | None = None,
    size: float = 5.0,
    dpi: int = 90,
    view: tuple[float, float] = DEFAULT_VIEW,
    up="auto",
    max_points: int | None = MAX_POINTS,
) -> Path:
    """Writes an animated GIF of the flow: the moving shape going from the source (faint grey) to the
    target (faint red), with the time t = l/L in a corner.

    2-D shapes are drawn as lines when ``edges`` (or ``polyline`` / ``closed``) says how the points
    connect, else as dots. 3-D shapes are seen through the camera described in the module's docstring
    (``up``, ``view``): the moving mesh as a shaded surface beside the target when ``faces`` are given,
    else as dots over the faint target.

    Args:
        inbetween: frames interpolated between consecutive Euler steps (along the step itself).
        hold: extra copies of the last frame, so the result stays on screen before the loop restarts
            (GIF writers merge identical frames: the last frame shows ``hold + 1`` times longer).
        fps: frames per second.
        size: the picture's longer side, in inches.
        max_points: clouds with more points are drawn as a fixed random subset of that many, without
            their edges or faces, and the title says so (None: draw everything).

    Returns: the path written. The GIF has L · (inbetween + 1) + 1 distinct frames.
    """
    Figure = _matplotlib()
    from matplotlib.animation import PillowWriter

    traj = _np(trajectory, "trajectory")
    if traj.ndim != 3 or traj.shape[0] < 2 or traj.shape[1] == 0 or traj.shape[2] not in (2, 3):
        raise ValueError(f"trajectory must have shape (L + 1, N, D) with L >= 1, N >= 1 and D = 2 or 3, "
                         f"got {traj.shape}")
    dim, n = traj.shape[2], traj.shape[1]
    src = traj[0] if source is None else _check_cloud(source, "source", dim)
    if src.shape[0] != n:
        raise ValueError(f"source has {src.shape[0]} points but the trajectory moves {n}")
    tgt = None if target is None else _check_cloud(target, "target", dim)
    for name, value in (("inbetween", inbetween), ("hold", hold)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    seg = _edges(edges, n, "edges", polyline=polyline, closed=closed)
    tseg = None
    if tgt is not None:
        if target_edges is None and seg is not None and tgt.shape[0] == n:
            tseg = seg
        else:
            tseg = _edges(target_edges, tgt.shape[0], "target_edges", polyline=polyline, closed=closed)
    tri = _faces(faces, n, "faces") if dim == 3 else None
    ttri = _faces(target_faces, tgt.shape[0], "target_faces") if dim == 3 and tgt is not None else None
    flips = _flip_mask(flipped, tri)
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"path must end in .gif, got {str(path)!r}")
    keep = _subsample(n, max_points)
    note = None
    if keep is not None:
        note = _shown(None, len(keep), n)
        traj, src, seg, tri, flips, n = traj[:, keep], src[keep], None, None, None, len(keep)
    keep_target = None if tgt is None else _subsample(tgt.shape[0], max_points)
    if keep_target is not None:
        tgt, tseg, ttri = tgt[keep_target], None, None
    if tri is not None and len(tri) > MAX_FACES:
        tri = flips = None
        note = f"{n:,} points shown as dots (more than {MAX_FACES:,} triangles)"

    frames = _frames(traj, inbetween)
    layers = traj.shape[0] - 1
    top = 0.87 if note else 0.90 if title else 0.93
    if dim == 2:
        lo, hi = _limits([traj] + ([tgt] if tgt is not None else []))
        # a fixed layout: constrained layout would lay out (draw) every frame twice
        fig = Figure(figsize=(size, size), dpi=dpi)
        fig.subplots_adjust(left=0.03, right=0.97, top=top, bottom=0.08)
        ax = fig.add_subplot()
        _style2d(ax, lo, hi)
        if tgt is not None:
            _draw2d(ax, tgt, tseg, color=TARGET, alpha=0.35, lw=2.2, size=7, label="target", zorder=1)
        _draw2d(ax, src, seg, color=SOURCE, alpha=0.45, lw=1.0, ls="--", size=4, label="source", zorder=1)
        moving = _draw2d(ax, traj[0], seg, color=MOVING, lw=1.8, size=8, label="moving", zorder=3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)

        def draw(t, pts):
            _update2d(moving, pts, seg)
    else:
        camera = _Camera(src, up, view)
        moving_xy = camera(traj.reshape(-1, 3))[0]
        target_xy = camera(tgt)[0] if tgt is not None else None
        side = tri is not None and tgt is not None  # surfaces: the target in its own panel, else behind
        lo, hi = _bounds([moving_xy] + ([target_xy] if target_xy is not None else []))
        panels, top, bottom = (2 if side else 1), (0.88 if note else 0.91 if title else 0.94), 0.07
        panel_aspect = (hi[0] - lo[0]) / (hi[1] - lo[1])
        if panels * panel_aspect >= 1:  # wide: the width is `size`
            width = size
            height = size * 0.98 / panels / panel_aspect
        else:  # tall: the panels' height is `size`
            height = size * (top - bottom)
            width = height * panel_aspect * panels / 0.98
        fig = Figure(figsize=(max(width, 2.0), height / (top - bottom)), dpi=dpi)
        fig.subplots_adjust(left=0.01, right=0.99, top=top, bottom=bottom, wspace=0.02)
        ax = fig.add_subplot(1, panels, 1)
        _panel(ax, lo, hi, "moving" if side else None)
        dot = _dot_size(n, height)
        if side:
            tax = fig.add_subplot(1, 2, 2)
            _panel(tax, lo, hi, "target")
            _draw_shape(tax, camera, tgt, ttri, SURFACE_TARGET, size=dot)
        elif tgt is not None:
            _draw_shape(ax, camera, tgt, ttri, TARGET, size=dot, alpha=0.25, zorder=1)
        moving = _draw_shape(ax, camera, traj[0], tri, SURFACE_MOVING if tri is not None else MOVING, size=dot)

        def draw(t, pts):
            _update_shape(moving, camera, pts, tri, SURFACE_MOVING if tri is not None else MOVING,
                          flips if t >= 1.0 else None)
    # title on the left, time on the right of the same line (3-D: under the pictures): neither hides the other
    clock = fig.text(0.97, 0.975, "", ha="right", va="top", fontsize=10, family="monospace") if dim == 2 else \
        fig.text(0.97, 0.015, "", ha="right", va="bottom", fontsize=9, family="monospace")
    if title:
        fig.text(0.03, 0.975, title, ha="left", va="top", fontsize=10)
    if note:  # under the title line, which the clock shares
        fig.text(0.03, 0.93, note, ha="left", va="top", fontsize=8, color="#555555")

    with atomic_write(path) as tmp:
        writer = PillowWriter(fps=fps)
        with writer.saving(fig, str(tmp), dpi=dpi):
            for t, pts in frames + [frames[-1]] * hold:
                draw(t, pts)
                clock.set_text(f"t = {t:4.2f}   (step {math.floor(t * layers + 1e-9)}/{layers})")
                writer.grab_frame()
    return path


def plot_filmstrip(
    trajectory,  # (L + 1, N, D), D = 2 or 3: r.trajectory(source)
    path="filmstrip.png",
    *,
    target=None,  # (M, D) or None: drawn last
    faces=None,  # (F, 3) int: triangles of the moving shape
    target_faces=None,  # (F', 3) int: triangles of the target
    edges=None,  # (E, 2) int, 2-D: segments of the moving shape
    target_edges=None,  # (E', 2) int, 2-D: segments of the target; default: edges when M == N
    flipped=None,  # (F,) bool: triangles that flip by t = 1, red in the last panel
    times=(0.0, 0.25, 0.5, 0.75, 1.0),
    title: str | None = None,
    up="auto",
    view: tuple[float, float] = DEFAULT_VIEW,
    height: float = 3.4,
    dpi: int = 110,
    max_points: int | None = MAX_POINTS,
) -> Path:
    """Writes a PNG of the flow as a row of pictures: the moving shape at each of ``times`` (0 is the
    source, 1 the warped source; between Euler steps, along the step), then the target.

    Every panel has the same bounds and scale, so sizes compare across the row. 3-D shapes are seen through
    the camera of the module's docstring (``up``, ``view``); meshes are shaded surfaces (flipped triangles
    red at t = 1), clouds dots. ``height``: of the row, in inches.
    """
    Figure = _matplotlib()
    traj = _np(trajectory, "trajectory")
    if traj.ndim != 3 or traj.shape[0] < 2 or traj.shape[1] == 0 or traj.shape[2] not in (2, 3):
        raise ValueError(f"trajectory must have shape (L + 1, N, D) with L >= 1, N >= 1 and D = 2 or 3, "
                         f"got {traj.shape}")
    dim, n = traj.shape[2], traj.shape[1]
    times = [float(t) for t in times]
    if not times or any(not (0.0 <= t <= 1.0) for t in times):
        raise ValueError(f"times must be numbers in [0, 1], got {times!r}")
    tgt = None if target is None else _check_cloud(target, "target", dim)
    seg = _edges(edges, n, "edges") if dim == 2 else None
    tseg = None
    if tgt is not None and dim == 2:
        tseg = seg if target_edges is None and seg is not None and tgt.shape[0] == n else \
            _edges(target_edges, tgt.shape[0], "target_edges")
    tri = _faces(faces, n, "faces") if dim == 3 else None
    ttri = _faces(target_faces, tgt.shape[0], "target_faces") if dim == 3 and tgt is not None else None
    flips = _flip_mask(flipped, tri)
    keep = _subsample(n, max_points)
    if keep is not None:
        title = _shown(title, len(keep), n)
        traj, seg, tri, flips, n = traj[:, keep], None, None, None, len(keep)
    if tgt is not None:
        keep_target = _subsample(tgt.shape[0], max_points)
        if keep_target is not None:
            tgt, tseg, ttri = tgt[keep_target], None, None
    if tri is not None and len(tri) > MAX_FACES:
        tri = flips = None
    shapes = [_at_time(traj, t) for t in times]
    labels = [("t = 0 (source)" if t == 0 else "t = 1 (warped)" if t == 1 else f"t = {_fraction(t)}") for t in times]
    if tgt is not None:
        shapes.append(tgt)
        labels.append("target")
    if dim == 3:
        camera = _Camera(traj[0], up, view)
        lo, hi = _bounds([camera(s)[0] for s in shapes])
    else:
        lo, hi = _limits(shapes, margin=0.06)
    aspect = (hi[0] - lo[0]) / (hi[1] - lo[1])
    panels = len(shapes)
    fig = Figure(figsize=(panels * height * aspect * 1.02 + 0.2, height + (0.55 if title else 0.3)), dpi=dpi,
                 layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.0)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for k, (ax, pts, label) in enumerate(zip(axes, shapes, labels)):
        is_target = tgt is not None and k == panels - 1
        _panel(ax, lo, hi, label)
        if dim == 2:
            _draw2d(ax, pts, tseg if is_target else seg, color=TARGET if is_target else MOVING, size=6)
        else:
            # a mesh's row keeps the surface colours (red is for flipped triangles), a cloud's the usual ones
            color = (SURFACE_TARGET if is_target else SURFACE_MOVING) if tri is not None \
                else (TARGET if is_target else MOVING)
            _draw_shape(ax, camera, pts, ttri if is_target else tri, color, size=_dot_size(len(pts), height),
                        flipped=flips if (not is_target and times[k] == 1.0) else None)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
    return path


def plot_losses(history: dict, path="losses.png", *, sigma: float | None = None, title: str | None = None,
                dpi: int = 110) -> Path:
    """Writes a PNG of the optimisation: total loss, data term and energy per step, log scale.

    ``history`` is Registration.history: lists "loss", "data", "energy" (one value per step). With
    ``sigma``, the data term is also drawn as it enters the loss, data / (2σ²).
    """
    Figure = _matplotlib()
    if not isinstance(history, dict) or not any(k in history for k in ("loss", "data", "energy")):
        raise ValueError("history must be a dict with lists 'loss', 'data' and 'energy' (Registration.history)")
    fig = Figure(figsize=(6.4, 4.0), dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    styles = {"loss": ("total loss", "black", 2.0), "data": ("data term D", TARGET, 1.4),
              "energy": ("kinetic energy", MOVING, 1.4)}
    drawn = 0
    for key, (label, color, lw) in styles.items():
        values = np.asarray(history.get(key, []), dtype=np.float64)
        if values.size == 0:
            continue
        steps = np.arange(1, values.size + 1)
        shown = np.where(values > 0, values, np.nan)  # log scale: zero energy at the identity is not drawn
        ax.plot(steps, shown, color=color, lw=lw, label=label)
        if key == "data" and sigma:
            ax.plot(steps, shown / (2 * sigma ** 2), color=color, lw=1.0, ls="--", label="D / (2σ²)")
        drawn += 1
    if drawn == 0:
        raise ValueError("history has no values to plot")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("value (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", alpha=0.1)
    final = history.get("loss") or []
    ax.set_title(title or (f"optimisation: final loss {final[-1]:.4g} after {len(final)} steps" if final
                           else "optimisation"), fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
    return path


def _transform(registration, points: np.ndarray, like) -> np.ndarray:
    """registration.transform on a numpy array, whatever type the registration prefers."""
    if hasattr(like, "detach"):
        import torch

        out = registration.transform(torch.as_tensor(points, dtype=like.dtype, device=like.device))
    else:
        out = registration.transform(points)
    return _np(out, "transformed points")


def _deformed_grid(registration, lo, hi, lines: int, like, samples: int = 120):
    """Polylines of a regular grid over [lo, hi]² and their images by the registration's transform."""
    xs = np.linspace(lo[0], hi[0], lines)
    ys = np.linspace(lo[1], hi[1], lines)
    tx = np.linspace(lo[0], hi[0], samples)
    ty = np.linspace(lo[1], hi[1], samples)
    polys = [np.stack([np.full(samples, x), ty], 1) for x in xs] + [np.stack([tx, np.full(samples, y)], 1) for y in ys]
    flat = np.concatenate(polys)
    moved = _transform(registration, flat, like)
    return np.stack(polys), moved.reshape(len(polys), samples, 2)


def plot_registration(
    registration,  # a fastlddmm.Registration (anything with .source, .target, .transform)
    path="registration.png",
    *,
    edges=None,  # (E, 2) int: segments of the source (curves drawn as lines)
    target_edges=None,  # (E', 2) int: segments of the target; default: edges when M == N
    faces=None,  # (F, 3) int: triangles of the source (3-D: shaded surfaces); default registration.faces
    target_faces=None,  # (F', 3) int: triangles of the target
    flipped=None,  # (F,) bool: flipped triangles (red); default registration.flipped_triangles(faces)
    grid: int = 21,
    jacobian: bool = True,
    view: tuple[float, float] = DEFAULT_VIEW,
    up="auto",
    title: str | None = None,
    dpi: int = 110,
    max_points: int | None = MAX_POINTS,
) -> Path:
    """Writes a static before / after PNG.

    2-D: source and target, then the warped source on the target with a regular grid carried by the
    transform (``grid`` lines each way), which makes the deformation, and any fold, visible.
    3-D meshes (``faces``): source, target and warped source side by side as shaded surfaces seen through
    the camera of the module's docstring (``up``, ``view``), flipped triangles in red. 3-D clouds: source
    with target, then warped source with target, as dots.
    With ``jacobian``, the smallest Jacobian determinant over the source points goes in the title (≤ 0
    means the map folds there), and for meshes the share of flipped triangles. Clouds with more than
    ``max_points`` points are drawn (and their determinant taken) on a fixed random subset of that many,
    without edges or faces, and the title says so (None: everything).
    """
    Figure = _matplotlib()
    if not all(hasattr(registration, a) for a in ("source", "target", "transform")):
        raise TypeError(f"registration must be a fastlddmm.Registration, got {type(registration).__name__}")
    like = registration.source
    src = _check_cloud(registration.source, "registration.source")
    tgt = _check_cloud(registration.target, "registration.target", src.shape[1])
    dim, n_all = src.shape[1], src.shape[0]
    if faces is None and dim == 3:
        faces = getattr(registration, "faces", None)
    tri = _faces(faces, n_all, "faces") if dim == 3 else None
    ttri = _faces(target_faces, tgt.shape[0], "target_faces") if dim == 3 else None
    if tri is not None and len(tri) > MAX_FACES:
        tri = None
    keep, keep_target = _subsample(src.shape[0], max_points), _subsample(tgt.shape[0], max_points)
    if keep is not None:
        title = _shown(title or "fastlddmm registration", len(keep), src.shape[0])
        src, edges, tri = src[keep], None, None
        like = like[keep] if hasattr(like, "detach") else src
    if keep_target is not None:
        tgt, target_edges, ttri = tgt[keep_target], None, None
    warped = _check_cloud(_transform(registration, src, like), "warped source", src.shape[1])
    n = src.shape[0]
    seg = _edges(edges, n, "edges")
    tseg = seg if target_edges is None and seg is not None and tgt.shape[0] == n else _edges(target_edges, tgt.shape[0], "target_edges")
    if keep_target is not None:  # a subset of the target has no edges (even if it happens to have n points)
        tseg = None
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    min_det = None
    if jacobian and hasattr(registration, "jacobian_determinant"):
        det = registration.jacobian_determinant(like)
        det = _np(det, "jacobian determinant")
        min_det = float(det.min())
    flips = None
    if tri is not None:
        if flipped is None and jacobian and hasattr(registration, "flipped_triangles"):
            flipped = registration.flipped_triangles(tri)
        flips = _flip_mask(flipped, tri)

    heading = title or "fastlddmm registration"
    if min_det is not None:
        heading += f"   (min det Dφ = {min_det:.3g}{', folds!' if min_det <= 0 else ''}"
        if flips is not None:
            heading += f"; flipped triangles {int(flips.sum())} of {len(flips)} = {100 * flips.mean():.2f}%"
        heading += ")"
    path = Path(path)
    if dim == 2:
        lo, hi = _limits([src, tgt, warped], margin=0.12)
        fig = Figure(figsize=(10.0, 5.0), dpi=dpi, layout="constrained")
        before, after = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for ax in (before, after):
            _style2d(ax, lo, hi)
        grid_lines, moved_lines = _deformed_grid(registration, lo, hi, grid, like)
        from matplotlib.collections import LineCollection

        before.add_collection(LineCollection(grid_lines, colors=GRID, linewidths=0.5, alpha=0.5, zorder=0))
        after.add_collection(LineCollection(moved_lines, colors=GRID, linewidths=0.6, alpha=0.8, zorder=0))
        _draw2d(before, tgt, tseg, color=TARGET, alpha=0.8, size=7, label="target")
        _draw2d(before, src, seg, color=MOVING, size=7, label="source")
        _draw2d(after, tgt, tseg, color=TARGET, alpha=0.45, lw=2.4, size=9, label="target")
        _draw2d(after, warped, seg, color=MOVING, size=7, label="warped source", zorder=3)
        before.set_title("before: source and target", fontsize=10)
        after.set_title("after: warped source on target, with the deformed grid", fontsize=10)
        for ax in (before, after):
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    else:
        camera = _Camera(src, up, view)
        lo, hi = _bounds([camera(p)[0] for p in (src, tgt, warped)])
        aspect = (hi[0] - lo[0]) / (hi[1] - lo[1])
        height = 4.6
        if tri is not None:  # surfaces do not overlay: three panels
            panels = [("source", src, tri, SURFACE_SOURCE, None), ("target", tgt, ttri, SURFACE_TARGET, None),
                      ("warped source" + (" (flipped triangles red)" if flips is not None and flips.any() else ""),
                       warped, tri, SURFACE_MOVING, flips)]
        else:
            panels = [("before: source and target", src, None, MOVING, None),
                      ("after: warped source on target", warped, None, MOVING, None)]
        fig = Figure(figsize=(max(len(panels) * height * aspect + 0.3, 7.0), height + 0.7), dpi=dpi,
                     layout="constrained")
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        dot = _dot_size(max(n, tgt.shape[0]), height)
        for ax, (label, pts, f, color, red) in zip(axes, panels):
            _panel(ax, lo, hi, label)
            if f is None and tri is None:  # dots: the target faint behind the moving shape
                _draw_shape(ax, camera, tgt, None, TARGET, size=dot, alpha=0.35, zorder=1)
            _draw_shape(ax, camera, pts, f, color, flipped=red, size=dot)
        if tri is None:
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], ls="", marker="o", markersize=5, color=c, label=t)
                       for t, c in (("target", TARGET), ("source / warped source", MOVING))]
            fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(heading, fontsize=10 if dim == 3 else 11)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
    return path
