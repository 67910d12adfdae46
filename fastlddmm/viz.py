"""Pictures of a registration: the flow as an animated GIF, the loss curves, a before/after figure.

    from fastlddmm import viz
    viz.animate_flow(r.trajectory(source), source, target, "flow.gif", edges=edges)
    viz.plot_losses(r.history, "losses.png")
    viz.plot_registration(r, "registration.png", edges=edges)

matplotlib (and pillow for GIFs) are optional: ``pip install 'fastlddmm[viz]'``. Figures are drawn on
matplotlib's Agg canvas without pyplot, so nothing here changes the caller's matplotlib backend or
opens a window.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ._atomic import atomic_write

__all__ = ["animate_flow", "plot_losses", "plot_registration"]

# Colours: the moving shape is the strong one; where it starts and where it should go are faint.
MOVING = "#1f5fbf"
TARGET = "#d62728"
SOURCE = "#7f7f7f"
GRID = "#9aa5b1"


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
    if hasattr(edges, "detach"):
        edges = edges.detach().cpu().numpy()
    edges = np.asarray(edges)
    if edges.ndim != 2 or edges.shape[1] != 2 or edges.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array of shape (E, 2), got {edges.dtype} {edges.shape}")
    if edges.size and (edges.min() < 0 or edges.max() >= n):
        raise ValueError(f"{name} refers to point {int(edges.max())}, but there are only {n} points")
    return edges.astype(np.int64)


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


def _style3d(ax, lo, hi, view):
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_zlim(lo[2], hi[2])
    ax.set_box_aspect((1, 1, 1))
    ax.view_init(elev=view[0], azim=view[1])
    ax.set_xticklabels([])
    ax.set_yticklabels([])
    ax.set_zticklabels([])
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.pane.set_alpha(0.04)


def _legend3d(ax, entries) -> None:
    """A legend with opaque, readable markers (3-D scatters are faint and tiny by design)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", markersize=5, color=color, label=label) for label, color in entries]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.04), ncol=len(handles), fontsize=8,
              frameon=False)


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
    polyline: bool = False,  # no edges given: the points are one ordered curve
    closed: bool = False,  # ... and it is a closed loop
    inbetween: int = 2,
    hold: int = 6,
    fps: int = 12,
    title: str | None = None,
    size: float = 5.0,
    dpi: int = 90,
    view: tuple[float, float] = (18.0, -60.0),
    max_points: int | None = MAX_POINTS,
) -> Path:
    """Writes an animated GIF of the flow: the moving shape going from the source (faint grey) to the
    target (faint red), with the time t = l/L in a corner.

    2-D shapes are drawn as lines when ``edges`` (or ``polyline`` / ``closed``) says how the points
    connect, else as dots; 3-D shapes as dots seen from a fixed ``view`` (elevation, azimuth) in degrees.

    Args:
        inbetween: frames interpolated between consecutive Euler steps (along the step itself).
        hold: extra copies of the last frame, so the result stays on screen before the loop restarts
            (GIF writers merge identical frames: the last frame shows ``hold + 1`` times longer).
        fps: frames per second.
        max_points: clouds with more points are drawn as a fixed random subset of that many, without
            their edges, and the title says so (None: draw everything).

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
    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"path must end in .gif, got {str(path)!r}")
    keep = _subsample(n, max_points)
    note = None
    if keep is not None:
        note = _shown(None, len(keep), n)
        traj, src, seg, n = traj[:, keep], src[keep], None, len(keep)
    keep_target = None if tgt is None else _subsample(tgt.shape[0], max_points)
    if keep_target is not None:
        tgt, tseg = tgt[keep_target], None

    lo, hi = _limits([traj] + ([tgt] if tgt is not None else []))
    # a fixed layout: constrained layout would lay out (draw) every frame twice
    fig = Figure(figsize=(size, size), dpi=dpi)
    fig.subplots_adjust(left=0.03, right=0.97, top=0.87 if note else 0.90 if title else 0.93, bottom=0.08)
    frames = _frames(traj, inbetween)
    layers = traj.shape[0] - 1
    if dim == 2:
        ax = fig.add_subplot()
        _style2d(ax, lo, hi)
        if tgt is not None:
            _draw2d(ax, tgt, tseg, color=TARGET, alpha=0.35, lw=2.2, size=7, label="target", zorder=1)
        _draw2d(ax, src, seg, color=SOURCE, alpha=0.45, lw=1.0, ls="--", size=4, label="source", zorder=1)
        moving = _draw2d(ax, traj[0], seg, color=MOVING, lw=1.8, size=8, label="moving", zorder=3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=3, fontsize=8, frameon=False)
    else:
        ax = fig.add_subplot(projection="3d")
        _style3d(ax, lo, hi, view)
        small = max(1.0, 12.0 / math.sqrt(max(n, 1) / 100.0))  # fewer pixels per point for bigger clouds
        if tgt is not None:
            ax.scatter(*tgt.T, s=small, color=TARGET, alpha=0.2, lw=0, depthshade=False)
        ax.scatter(*src.T, s=small * 0.6, color=SOURCE, alpha=0.12, lw=0, depthshade=False)
        moving = ax.scatter(*traj[0].T, s=small, c=src[:, 2], cmap="viridis", lw=0, depthshade=True)
        _legend3d(ax, [("target", TARGET)] * (tgt is not None) + [("source", SOURCE), ("moving", "#21918c")])
    # title on the left, time on the right of the same line: neither hides the other
    clock = fig.text(0.97, 0.975, "", ha="right", va="top", fontsize=10, family="monospace")
    if title:
        fig.text(0.03, 0.975, title, ha="left", va="top", fontsize=10)
    if note:  # under the title line, which the clock shares
        fig.text(0.03, 0.93, note, ha="left", va="top", fontsize=8, color="#555555")

    with atomic_write(path) as tmp:
        writer = PillowWriter(fps=fps)
        with writer.saving(fig, str(tmp), dpi=dpi):
            for t, pts in frames + [frames[-1]] * hold:
                if dim == 2:
                    _update2d(moving, pts, seg)
                else:
                    moving._offsets3d = (pts[:, 0], pts[:, 1], pts[:, 2])
                clock.set_text(f"t = {t:4.2f}   (step {math.floor(t * layers + 1e-9)}/{layers})")
                writer.grab_frame()
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
    grid: int = 21,
    jacobian: bool = True,
    view: tuple[float, float] = (18.0, -60.0),
    title: str | None = None,
    dpi: int = 110,
    max_points: int | None = MAX_POINTS,
) -> Path:
    """Writes a static before / after PNG: source and target, then the warped source on the target.

    In 2-D the right panel also shows a regular grid carried by the transform (``grid`` lines each way),
    which makes the deformation, and any fold, visible. With ``jacobian``, the smallest Jacobian
    determinant over the source points goes in the title (≤ 0 means the map folds there). Clouds with
    more than ``max_points`` points are drawn (and their determinant taken) on a fixed random subset of
    that many, without edges, and the title says so (None: everything).
    """
    Figure = _matplotlib()
    if not all(hasattr(registration, a) for a in ("source", "target", "transform")):
        raise TypeError(f"registration must be a fastlddmm.Registration, got {type(registration).__name__}")
    like = registration.source
    src = _check_cloud(registration.source, "registration.source")
    tgt = _check_cloud(registration.target, "registration.target", src.shape[1])
    keep, keep_target = _subsample(src.shape[0], max_points), _subsample(tgt.shape[0], max_points)
    if keep is not None:
        title = _shown(title or "fastlddmm registration", len(keep), src.shape[0])
        src, edges = src[keep], None
        like = like[keep] if hasattr(like, "detach") else src
    if keep_target is not None:
        tgt, target_edges = tgt[keep_target], None
    warped = _check_cloud(_transform(registration, src, like), "warped source", src.shape[1])
    dim, n = src.shape[1], src.shape[0]
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

    lo, hi = _limits([src, tgt, warped], margin=0.12)
    fig = Figure(figsize=(10.0, 5.0), dpi=dpi, layout="constrained")
    if dim == 2:
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
    else:
        before = fig.add_subplot(1, 2, 1, projection="3d")
        after = fig.add_subplot(1, 2, 2, projection="3d")
        small = max(1.0, 12.0 / math.sqrt(max(n, 1) / 100.0))
        for ax in (before, after):
            _style3d(ax, lo, hi, view)
        before.scatter(*tgt.T, s=small, color=TARGET, alpha=0.35, lw=0, depthshade=False)
        before.scatter(*src.T, s=small, color=MOVING, alpha=0.6, lw=0, depthshade=False)
        after.scatter(*tgt.T, s=small, color=TARGET, alpha=0.25, lw=0, depthshade=False)
        after.scatter(*warped.T, s=small, color=MOVING, alpha=0.7, lw=0, depthshade=False)
    before.set_title("before: source and target", fontsize=10)
    after.set_title("after: warped source on target" + ("" if dim == 3 else ", with the deformed grid"),
                    fontsize=10)
    if dim == 2:
        for ax in (before, after):
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    else:
        _legend3d(before, [("target", TARGET), ("source", MOVING)])
        _legend3d(after, [("target", TARGET), ("warped source", MOVING)])
    heading = title or "fastlddmm registration"
    if min_det is not None:
        heading += f"   (min det Dφ = {min_det:.3g}{', folds!' if min_det <= 0 else ''})"
    fig.suptitle(heading, fontsize=11)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".").lower() or "png")
    return path
