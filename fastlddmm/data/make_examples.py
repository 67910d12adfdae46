"""Generates the built-in example shapes stored beside this file (deterministic: no random numbers).

    python -m fastlddmm.data.make_examples          # rewrites the .npy files in fastlddmm/data/

face    2-D, a smiling face (source) and the same face neutral (target): outline, eyebrows, eyes,
        nose and mouth as ordered curves, with the segment list that draws them as lines. Both
        shapes have the same curves with the same number of points, so point i of the source
        corresponds to point i of the target (the "l2" data term can use that).
blob    3-D, a three-lobed column (source, a triangle mesh) and a bent, twisted version of it sampled at
        other points (target), so only distribution-matching data terms ("sinkhorn", "chamfer") fit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


# -- 2-D face ----------------------------------------------------------------------------------------

def _ellipse(cx, cy, rx, ry, n, start=np.pi / 2):
    """n points on an ellipse, counter-clockwise from angle ``start`` (a closed curve: no repeated end)."""
    t = start + 2 * np.pi * np.arange(n) / n
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _arc(x0, x1, n, height):
    """n points on y = height(x) from x0 to x1 (an open curve)."""
    x = np.linspace(x0, x1, n)
    return np.stack([x, height(x)], axis=1)


def _nose(n: int = 14) -> np.ndarray:
    """A vertical stroke bending right at the bottom, like a drawn nose."""
    s = np.linspace(0.0, 1.0, n)
    x = 0.02 + 0.10 * s ** 3
    y = 0.20 - 0.45 * s
    return np.stack([x, y], axis=1)


def _face_curves(smile: bool) -> list[tuple[np.ndarray, bool]]:
    """(points, closed) for each curve of the face, in drawing order."""
    curves = []
    curves.append((_ellipse(0.0, 0.0, 1.0, 1.25, 120), True))  # outline
    brow_lift = 0.06 if smile else 0.0
    for side in (-1, 1):  # eyebrows: gentle arcs, a little higher when smiling
        curves.append((_arc(side * 0.62, side * 0.18, 16,
                            lambda x, s=side: 0.62 + brow_lift - 0.9 * (x - s * 0.40) ** 2), False))
    eye_height = 0.07 if smile else 0.12  # a smile narrows the eyes
    for side in (-1, 1):
        curves.append((_ellipse(side * 0.40, 0.35, 0.17, eye_height, 28), True))
    curves.append((_nose(), False))
    if smile:  # mouth corners up: a parabola, with a slightly lower centre
        mouth = _arc(-0.55, 0.55, 40, lambda x: -0.78 + 0.95 * x ** 2)
    else:  # neutral: flat
        mouth = _arc(-0.45, 0.45, 40, lambda x: -0.62 + 0.0 * x)
    curves.append((mouth, False))
    return curves


def face(smile: bool) -> tuple[np.ndarray, np.ndarray]:
    """(points (N, 2) float64, edges (E, 2) int64) of the face; same N and edges for both expressions."""
    curves = _face_curves(smile)
    points, edges, offset = [], [], 0
    for pts, closed in curves:
        n = len(pts)
        idx = offset + np.arange(n)
        edges.append(np.stack([idx[:-1], idx[1:]], axis=1))
        if closed:
            edges.append(np.array([[idx[-1], idx[0]]]))
        points.append(pts)
        offset += n
    return np.concatenate(points).astype(np.float64), np.concatenate(edges).astype(np.int64)


# -- 3-D blob ----------------------------------------------------------------------------------------

def _fibonacci_sphere(n: int, offset: float = 0.5) -> np.ndarray:
    """n nearly uniform unit vectors on the sphere (golden-angle spiral); ``offset`` shifts the sampling."""
    i = np.arange(n) + offset
    z = 1.0 - 2.0 * i / n
    r = np.sqrt(np.clip(1.0 - z ** 2, 0.0, None))
    theta = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)


def _bumps(u: np.ndarray) -> np.ndarray:
    """Radius of the blob in direction u (unit vectors (N, 3)): a sphere with a few smooth lobes."""
    x, y, z = u.T
    return 1.0 + 0.22 * np.cos(3.0 * np.arctan2(y, x)) * (1 - z ** 2) + 0.10 * z ** 3


def _elongate(p: np.ndarray) -> np.ndarray:
    """Stretches along z: a three-lobed column, whose twist and bend are easy to see."""
    return p * np.array([1.0, 1.0, 1.6])


def _bend_twist(p: np.ndarray) -> np.ndarray:
    """Twists about z (angle grows with z) and bends the column towards +x: a smooth, large deformation."""
    x, y, z = p.T
    angle = 0.6 * z
    xr = np.cos(angle) * x - np.sin(angle) * y
    yr = np.sin(angle) * x + np.cos(angle) * y
    xr = xr + 0.30 * z ** 2  # bend
    return np.stack([xr, yr, z], axis=1)


def _hull_triangles(unit: np.ndarray) -> np.ndarray:
    """Triangles of the convex hull of points on the unit sphere: a watertight triangulation of them."""
    from scipy.spatial import ConvexHull  # only needed to regenerate the files

    tri = ConvexHull(unit).simplices.astype(np.int64)
    # orient every face outwards (normal · centroid > 0)
    a, b, c = unit[tri[:, 0]], unit[tri[:, 1]], unit[tri[:, 2]]
    flip = (np.cross(b - a, c - a) * (a + b + c)).sum(1) < 0
    tri[flip] = tri[flip][:, [0, 2, 1]]
    return tri[np.lexsort(tri.T[::-1])]


def blob(n_source: int = 1500, n_target: int = 1400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source (N, 3), source triangles (F, 3), target (M, 3)): bumpy sphere and its bent, twisted version."""
    u = _fibonacci_sphere(n_source)
    source = _elongate(u * _bumps(u)[:, None])
    faces = _hull_triangles(u)
    v = _fibonacci_sphere(n_target, offset=0.25)  # other sample points: no correspondence
    target = _bend_twist(_elongate(v * _bumps(v)[:, None]))
    return source, faces, target


def write_all(folder: Path = HERE) -> list[Path]:
    smile, edges = face(smile=True)
    neutral, edges_neutral = face(smile=False)
    assert np.array_equal(edges, edges_neutral)
    source, faces, target = blob()
    arrays = {
        "face_source.npy": smile, "face_target.npy": neutral, "face_edges.npy": edges,
        "blob_source.npy": source, "blob_faces.npy": faces, "blob_target.npy": target,
    }
    written = []
    for name, arr in arrays.items():
        np.save(folder / name, np.ascontiguousarray(arr), allow_pickle=False)
        written.append(folder / name)
    return written


if __name__ == "__main__":
    for path in write_all():
        print(path, np.load(path).shape)
