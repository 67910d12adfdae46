"""benchmarks/articulated.py: the figure it builds, the kernel-LDDMM baseline it measures against, one tiny run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "articulated.py"


@pytest.fixture(scope="module")
def art():
    spec = importlib.util.spec_from_file_location("articulated_benchmark", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_figure_is_a_closed_outward_mesh_posed_rigidly(art):
    shape = art.figure(3000)
    src, tgt, faces = shape["source"], shape["target"], shape["faces"]
    assert src.shape == tgt.shape and abs(src.shape[0] - 3000) < 300
    assert faces.min() == 0 and faces.max() == src.shape[0] - 1
    # closed surfaces: every edge is shared by exactly two triangles
    edges = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()
    # outward: the signed volume (divergence theorem) is positive, in the source and in the posed target
    for pts in (src, tgt):
        v = pts[faces]
        assert np.einsum("fi,fi->f", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() > 0
    # the pose moves parts rigidly: every edge keeps its length, and the limbs do move
    length = lambda p: np.linalg.norm(p[edges[:, 0]] - p[edges[:, 1]], axis=1)  # noqa: E731
    np.testing.assert_allclose(length(tgt), length(src), rtol=1e-9)
    assert np.abs(tgt - src).max() > 0.5


def test_shooting_follows_hamiltons_equations(art):
    gen = torch.Generator().manual_seed(0)
    q = torch.rand(7, 3, generator=gen, dtype=torch.float64)
    p = torch.randn(7, 3, generator=gen, dtype=torch.float64) * 0.1
    s, steps = 0.4, 5
    qs, ps = art.shoot(q, p, s, steps=steps)
    assert len(qs) == steps + 1
    # one Euler step by autograd on H(q, p) = ½ Σ_ij <p_i, p_j> K(q_i, q_j)
    qa, pa = q.clone().requires_grad_(), p.clone().requires_grad_()
    h = 0.5 * ((pa @ pa.T) * art._gauss(qa, qa, s)).sum()
    dh_dq, dh_dp = torch.autograd.grad(h, (qa, pa))
    assert_close(qs[1], q + dh_dp / steps, rtol=1e-12, atol=1e-12, name="q_1")
    assert_close(ps[1], p - dh_dq / steps, rtol=1e-12, atol=1e-12, name="p_1")


def test_carried_jacobian_is_that_of_the_discrete_map(art):
    gen = torch.Generator().manual_seed(1)
    q = torch.rand(6, 3, generator=gen, dtype=torch.float64)
    p = torch.randn(6, 3, generator=gen, dtype=torch.float64) * 0.3
    qs, ps = art.shoot(q, p, 0.3, steps=4)
    x = torch.rand(5, 3, generator=gen, dtype=torch.float64)
    moved, jac = art.carry(x, qs, ps, 0.3, jacobian=True)
    assert_close(moved, art.carry(x, qs, ps, 0.3), rtol=1e-12, atol=1e-12, name="moved")
    for k in range(x.shape[0]):
        expected = torch.autograd.functional.jacobian(lambda y: art.carry(y[None], qs, ps, 0.3)[0], x[k])
        assert_close(jac[k], expected, rtol=1e-10, atol=1e-12, name=f"jacobian[{k}]")


def test_a_tiny_run_writes_the_table(art, tmp_path):
    assert art.main(["--shapes", "figure", "--vertices", "400", "--presets", "fast", "--kernel-sigmas", "0.2",
                     "--kernel-data-sigmas", "0.1", "--kernel-points", "100", "--output-dir", str(tmp_path),
                     "--tag", "t", "--no-pictures"]) == 0
    table = json.loads((tmp_path / "articulated_t.json").read_text())["tables"]["figure"]
    assert [row["method"].split(" σ")[0] for row in table] == ["fastlddmm quality=fast", "kernel LDDMM"]
    for row in table:
        assert 0 < row["chamfer_ratio"] < 1 and row["triangles"] > 0 and np.isfinite(row["min_det"])
    assert "| fastlddmm quality=fast |" in (tmp_path / "articulated_t.md").read_text()
