"""fl.shape_distances: symmetric registration losses, equal to fl.register run pair by pair."""

from __future__ import annotations

import pytest
import torch

import fastlddmm as fl
from fastlddmm.pairwise import shape_distances
from conftest import assert_close


def _shapes():
    t = torch.linspace(0, 2 * torch.pi, 9, dtype=torch.float64)[:-1]
    circle = torch.stack([t.cos(), t.sin()], 1)
    ellipse = circle * torch.tensor([1.5, 0.7], dtype=torch.float64)
    shifted = circle[:7] + torch.tensor([0.3, -0.2], dtype=torch.float64)  # another size on purpose
    return [circle, ellipse, shifted]


KW = dict(steps=4, width=8, layers=3, sigma=0.2, data_term="chamfer")


def test_shape_distances_is_the_symmetrised_registration_loss():
    shapes = _shapes()
    d, directed = shape_distances(shapes, workers=1, return_directed=True, **KW)
    assert d.shape == (3, 3) and d.dtype == torch.float64
    assert torch.equal(d, d.T) and torch.all(d.diagonal() == 0) and torch.all(d[~torch.eye(3, dtype=bool)] > 0)
    for i, j in [(0, 1), (2, 0)]:
        r = fl.register(shapes[i], shapes[j], progress=False, blur=0.05, seed=0, backend="auto", lr=None, **KW)
        assert directed["loss"][i, j].item() == pytest.approx(r.history["loss"][-1], rel=1e-12)
        assert directed["energy"][i, j].item() == pytest.approx(r.history["energy"][-1], rel=1e-12)
    assert_close(d, 0.5 * (directed["loss"] + directed["loss"].T), rtol=0, atol=0)


def test_shape_distances_process_pool_matches_in_process():
    shapes = _shapes()[:2]
    assert_close(shape_distances(shapes, workers=2, **KW), shape_distances(shapes, workers=1, **KW), rtol=1e-12, atol=1e-14)


def test_shape_distances_bad_input():
    with pytest.raises(ValueError, match="at least two"):
        shape_distances([torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="same dimension"):
        shape_distances([torch.zeros(3, 2), torch.zeros(3, 3)])
    with pytest.raises(ValueError, match="workers"):
        shape_distances(_shapes(), workers=0)
