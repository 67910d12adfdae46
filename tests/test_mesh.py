"""fastlddmm.mesh: which triangles flip under a map (against cof(Dφ)·n), adjacency, the fold barrier."""

import math

import numpy as np
import pytest
import torch

from fastlddmm import mesh


def _octahedron(dtype=torch.float64):
    """A closed mesh with outward faces: 6 vertices, 8 triangles."""
    v = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=dtype)
    f = torch.tensor([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    return v, f


def _rotation(axis, degrees):
    axis = torch.tensor(axis, dtype=torch.float64)
    axis = axis / axis.norm()
    k = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = math.radians(degrees)
    return torch.eye(3, dtype=torch.float64) + math.sin(a) * k + (1 - math.cos(a)) * k @ k


def _affine(points, faces, matrix):
    """moved points and the (constant) Jacobian at each triangle for x -> A x."""
    return points @ matrix.T, matrix.expand(faces.shape[0], 3, 3)


def test_octahedron_faces_point_outwards():  # the fixture itself: every later test relies on it
    v, f = _octahedron()
    assert bool(((mesh.normals(v, f) * mesh.centroids(v, f)).sum(-1) > 0).all())


@pytest.mark.parametrize("matrix, expected", [
    (torch.eye(3, dtype=torch.float64), 0),
    (_rotation([1, 1, 0], 150.0), 0),  # a limb turned by 150°: normals turn against the source's, no flip
    (torch.diag(torch.tensor([3.0, 0.2, 1.0], dtype=torch.float64)), 0),  # stretched, squashed
    (torch.diag(torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)), 8),  # a mirror: space folds (det < 0)
])
def test_affine_maps_flip_only_when_they_reflect(matrix, expected):
    v, f = _octahedron()
    moved, jac = _affine(v, f, matrix)
    assert int(mesh.flipped(v, moved, jac, f).sum()) == expected


def test_a_vertex_pushed_through_the_surface_flips_its_triangles():
    v, f = _octahedron()
    moved = v.clone()
    moved[4] = torch.tensor([0.0, 0.0, -0.5])  # the top vertex pushed down through the middle
    jac = torch.eye(3, dtype=torch.float64).expand(f.shape[0], 3, 3)  # the map is smooth elsewhere
    flips = mesh.flipped(v, moved, jac, f)
    assert flips.tolist() == [True] * 4 + [False] * 4  # the 4 triangles around vertex 4, no other


def test_2d_flip_is_the_signed_area_and_degenerate_triangles_never_count():
    v = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2], [1, 3, 2], [0, 3, 4]])  # the last one has zero area
    jac = torch.eye(2, dtype=torch.float64).expand(3, 2, 2)
    moved = v.clone()
    moved[3] = torch.tensor([0.2, 0.2])  # vertex 3 across the edge 1-2: triangle 1 turns over
    assert mesh.flipped(v, moved, jac, f).tolist() == [False, True, False]
    assert mesh.normals(v, f).tolist() == [1.0, 1.0, 0.0]


def test_face_pairs_of_closed_and_open_meshes():
    v, f = _octahedron()
    pairs = mesh.face_pairs(f)
    assert pairs.shape == (12, 2)  # one per edge of the octahedron
    shared = [len(set(f[a].tolist()) & set(f[b].tolist())) for a, b in pairs.tolist()]
    assert shared == [2] * 12
    strip = torch.tensor([[0, 1, 2], [1, 3, 2], [2, 3, 4]])
    assert sorted(map(sorted, mesh.face_pairs(strip).tolist())) == [[0, 1], [1, 2]]  # boundary edges left out


def _tube(around=12, rings=7):
    """An open cylinder of radius 1 around z, outward faces: neighbours meet at 30° (roughly parallel)."""
    t = torch.linspace(0, 2 * math.pi, around + 1, dtype=torch.float64)[:-1]
    z = torch.linspace(-1, 1, rings, dtype=torch.float64)
    pts = torch.stack([torch.stack([torch.cos(t), torch.sin(t), torch.full_like(t, zz)], 1) for zz in z])
    faces = []
    for i in range(rings - 1):
        for j in range(around):
            a, b = i * around + j, i * around + (j + 1) % around
            c, d = a + around, b + around
            faces += [[a, b, d], [a, d, c]]
    return pts.reshape(-1, 3), torch.tensor(faces)


def test_fold_barrier_is_zero_for_rigid_and_smooth_maps_and_sees_a_flip():
    pts, faces = _tube()
    assert bool(((mesh.normals(pts, faces) * mesh.centroids(pts, faces) * torch.tensor([1.0, 1.0, 0.0],
                 dtype=torch.float64)).sum(-1) > 0).all())
    barrier = mesh.FoldBarrier(pts, faces)
    assert barrier.pairs.shape[0] == 72 + 72 + 5 * 12  # interior edges: diagonals, verticals, inner rings
    assert float(barrier(pts)) == 0.0
    assert float(barrier(pts @ _rotation([0, 1, 1], 120.0).T * 2.0)) == 0.0  # rigid + scale
    assert float(barrier(pts * torch.tensor([1.0, 0.3, 2.0], dtype=torch.float64))) == 0.0  # squashed
    moved = pts.clone().requires_grad_(True)
    factor = torch.ones_like(pts)
    factor[3 * 12 + 5, :2] = -0.2  # one vertex pushed through the axis: its triangles turn over
    value = barrier(moved * factor)
    assert float(value.detach()) > 0
    (grad,) = torch.autograd.grad(value, moved)
    assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0


def test_fold_barrier_2d():
    v = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2], [1, 3, 2]])
    barrier = mesh.FoldBarrier(v, f)
    assert float(barrier(v)) == 0.0 and float(barrier(v * 0.6)) == 0.0  # 36% of the area is kept (> 1/4): no penalty
    moved = v.clone()
    moved[3] = torch.tensor([0.2, 0.2])
    # triangle 1's signed area goes from 1 to -0.6: relu(0.25 + 0.6)², averaged over the 2 triangles
    assert float(barrier(moved)) == pytest.approx(0.85**2 / 2)


def test_check_faces():
    assert mesh.check_faces(np.array([[0, 1, 2]]), 3).dtype == torch.int64
    with pytest.raises(ValueError, match=r"shape \(F, 3\)"):
        mesh.check_faces(torch.tensor([[0, 1]]), 3)
    with pytest.raises(ValueError, match="refers to vertex 5"):
        mesh.check_faces(torch.tensor([[0, 1, 5]]), 3)
    with pytest.raises(TypeError, match="integer"):
        mesh.check_faces(torch.tensor([[0.0, 1.0, 2.0]]), 3)
