"""Triangle meshes carried by a registration: which triangles flip, and a barrier that discourages it.

A map can keep det Dφ > 0 at every vertex and still turn some triangles inside out: the vertices of a
triangle land in an order that the map's own tangent map says they should not. This module tells which:

    A triangle (v0, v1, v2) with edges e1 = v1 - v0, e2 = v2 - v0 is carried to (v0', v1', v2'). To first
    order, φ maps the oriented normal n = e1 × e2 to m = (A e1) × (A e2) = cof(A) n, A = Dφ at the
    triangle's centroid. The triangle FLIPS when its warped normal n' = e1' × e2' points against m, or when
    det A ≤ 0 (space itself folds there):  sign(det A) · <n', m> ≤ 0.
    In 2-D the "normal" is the signed area (e1 × e2 = e1x e2y - e1y e2x) and the test is sign(area') ≠
    sign(area) or det A ≤ 0.

Comparing n' with the source's own normal n would be wrong for articulated motion: a forearm rotated by
120° turns its normals against the source's without anything folding. Triangles of zero area in the source
have no orientation and are never counted.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Above this fraction of flipped triangles, register() and the command line warn.
FLIP_WARNING = 1e-3


class FoldWarning(UserWarning):
    """A registered mesh has more than FLIP_WARNING of its triangles flipped."""


def check_faces(faces, points: int, name: str = "faces") -> Tensor:  # -> (F, 3) int64
    """``faces`` as an (F, 3) int64 tensor of vertex indices in [0, points)."""
    if isinstance(faces, np.ndarray):
        faces = torch.from_numpy(faces)
    if not isinstance(faces, Tensor):
        raise TypeError(f"{name} must be a tensor or numpy array of shape (F, 3), got {type(faces).__name__}")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"{name} must have shape (F, 3) (triangles), got {tuple(faces.shape)}")
    if faces.dtype.is_floating_point or faces.dtype.is_complex or faces.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer vertex indices, got {faces.dtype}")
    faces = faces.to(torch.int64)
    if faces.numel() and (int(faces.min()) < 0 or int(faces.max()) >= points):
        raise ValueError(f"{name} refers to vertex {int(faces.max()) if int(faces.max()) >= points else int(faces.min())}, "
                         f"but there are {points} points")
    return faces


def _cross(a: Tensor, b: Tensor) -> Tensor:  # (..., D), (..., D) -> (..., 3) for D = 3, (...) for D = 2
    if a.shape[-1] == 2:
        return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]
    return torch.linalg.cross(a, b, dim=-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return a * b if a.dim() == 1 else (a * b).sum(-1)


def edges_of(points: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:  # (N, D), (F, 3) -> (F, D), (F, D)
    v0 = points[faces[:, 0]]
    return points[faces[:, 1]] - v0, points[faces[:, 2]] - v0


def normals(points: Tensor, faces: Tensor) -> Tensor:  # (N, D), (F, 3) -> (F, 3) for D = 3, (F,) for D = 2
    """e1 × e2 per triangle: the normal times twice the area (3-D), or twice the signed area (2-D)."""
    return _cross(*edges_of(points, faces))


def centroids(points: Tensor, faces: Tensor) -> Tensor:  # (N, D), (F, 3) -> (F, D)
    return points[faces].mean(1)


def flipped(points: Tensor,  # (N, D) the source vertices, D = 2 or 3
            moved: Tensor,  # (N, D) φ(points)
            jacobian: Tensor,  # (F, D, D) Dφ at the triangles' centroids
            faces: Tensor,  # (F, 3) int64
            ) -> Tensor:  # (F,) bool
    """Which triangles flip under φ (see the module's docstring): sign(det A) · <n', cof(A) n> ≤ 0."""
    if points.shape[-1] not in (2, 3):
        raise ValueError(f"triangles need 2-D or 3-D points, got {points.shape[-1]}-D")
    e1, e2 = edges_of(points, faces)
    carried = _cross(torch.einsum("fij,fj->fi", jacobian, e1), torch.einsum("fij,fj->fi", jacobian, e2))
    warped = normals(moved, faces)
    sign = torch.sign(torch.linalg.det(jacobian))
    has_area = _dot(_cross(e1, e2), _cross(e1, e2)) > 0
    return has_area & (sign * _dot(warped, carried) <= 0)


def face_pairs(faces: Tensor) -> Tensor:  # (F, 3) -> (E, 2) int64
    """Pairs of triangles that share an edge (each interior edge of a manifold mesh once)."""
    edges = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]).sort(dim=1).values  # (3F, 2)
    owner = torch.arange(faces.shape[0], device=faces.device).repeat(3)
    _, inverse, counts = torch.unique(edges, dim=0, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)  # the copies of each edge next to each other
    starts = torch.cumsum(counts, 0) - counts
    two = counts == 2  # edges with exactly two triangles (boundary and non-manifold edges are left out)
    first = order[starts[two]]
    second = order[starts[two] + 1]
    return torch.stack([owner[first], owner[second]], dim=1)


class FoldBarrier:
    """A penalty against flipped triangles, cheap enough to add at every optimisation step (it needs the
    moved vertices only, no Jacobian):

        3-D: mean over pairs of adjacent triangles that are roughly parallel in the source (cos > 1/2) of
             relu(-cos θ')², θ' the angle between their warped normals. A triangle turned over among its
             neighbours makes θ' ≈ 180° on all its edges; a bend (an elbow) keeps neighbours within 90°.
        2-D: mean over triangles of relu(1/4 - a'/a)², a, a' the signed areas before and after: zero until
             a triangle keeps less than a quarter of its area, then growing as it turns over.

    Built once per mesh: FoldBarrier(source (N, D), faces (F, 3)); called as barrier(moved (N, D)) -> ().
    """

    def __init__(self, source: Tensor, faces: Tensor):  # (N, D), (F, 3)
        self.faces = faces
        self.dim = source.shape[-1]
        if self.dim == 3:
            pairs = face_pairs(faces)
            unit = torch.nn.functional.normalize(normals(source, faces), dim=-1)
            keep = (unit[pairs[:, 0]] * unit[pairs[:, 1]]).sum(-1) > 0.5
            self.pairs = pairs[keep]
        elif self.dim == 2:
            area = normals(source, faces)
            self.keep = area != 0
            self.area = area[self.keep]
        else:
            raise ValueError(f"a fold barrier needs 2-D or 3-D points, got {self.dim}-D")

    def __call__(self, moved: Tensor) -> Tensor:  # (N, D) -> ()
        if self.dim == 3:
            if self.pairs.shape[0] == 0:
                return moved.sum() * 0
            # a small floor keeps the normalisation differentiable for triangles shrunk to a point
            n = normals(moved, self.faces)
            unit = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            cos = (unit[self.pairs[:, 0]] * unit[self.pairs[:, 1]]).sum(-1)
            return torch.relu(-cos).pow(2).mean()
        if self.area.shape[0] == 0:
            return moved.sum() * 0
        ratio = normals(moved, self.faces)[self.keep] / self.area
        return torch.relu(0.25 - ratio).pow(2).mean()
