"""The reference flow against a hand-written Euler loop, the energy law, and float64 gradcheck."""

import pytest
import torch

import fastlddmm as fl
from fastlddmm.reference import flow as ref


def random_params(layers, width, dim, dtype=torch.float64, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(layers, width, dim, generator=g, dtype=dtype) * scale
    b1 = torch.randn(layers, width, generator=g, dtype=dtype) * scale
    w2 = torch.randn(layers, dim, width, generator=g, dtype=dtype) * scale / width**0.5
    b2 = torch.randn(layers, dim, generator=g, dtype=dtype) * scale
    return w1, b1, w2, b2


def hand_written_flow(x, w1, b1, w2, b2, act):
    """Point by point, neuron by neuron: no broadcasting tricks, nothing shared with the reference."""
    import math

    rho = {"relu": lambda z: max(z, 0.0), "tanh": math.tanh, "softplus": lambda z: math.log1p(math.exp(z))}[act]
    layers, width, dim = w1.shape
    dt = 1.0 / layers
    pts = [list(map(float, p)) for p in x]
    energy = 0.0
    for layer in range(layers):
        new_pts = []
        for p in pts:
            hidden = [rho(sum(float(w1[layer, k, d]) * p[d] for d in range(dim)) + float(b1[layer, k])) for k in range(width)]
            v = [sum(float(w2[layer, d, k]) * hidden[k] for k in range(width)) + float(b2[layer, d]) for d in range(dim)]
            energy += 0.5 * dt * sum(c * c for c in v) / len(pts)
            new_pts.append([p[d] + dt * v[d] for d in range(dim)])
        pts = new_pts
    return torch.tensor(pts, dtype=torch.float64), energy


@pytest.mark.parametrize("act", ["relu", "tanh", "softplus"])
@pytest.mark.parametrize("layers,width,dim,n", [(1, 1, 2, 1), (3, 5, 2, 7), (4, 9, 3, 6)])
def test_reference_matches_hand_written_euler_loop(act, layers, width, dim, n):
    params = random_params(layers, width, dim)
    x = torch.randn(n, dim, dtype=torch.float64)
    out, energy = ref.euler_flow(x, *params, 1.0 / layers, act)
    want, want_energy = hand_written_flow(x, *params, act)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert abs(float(energy) - want_energy) <= 1e-12 * max(1.0, want_energy)


def test_energy_law_from_trajectory():
    """E = ½ Σ Δ mean|v|², with v read back from the trajectory as (x^{l+1} - x^l) / Δ."""
    layers = 6
    params = random_params(layers, 11, 3)
    x = torch.randn(13, 3, dtype=torch.float64)
    traj = ref.trajectory(x, *params, 1.0 / layers, "tanh")
    assert traj.shape == (layers + 1, 13, 3)
    v = (traj[1:] - traj[:-1]) * layers
    energy_from_traj = 0.5 * (1.0 / layers) * v.pow(2).sum(-1).mean(-1).sum()
    _, energy = ref.euler_flow(x, *params, 1.0 / layers, "tanh")
    torch.testing.assert_close(energy, energy_from_traj, rtol=1e-12, atol=0)
    torch.testing.assert_close(traj[-1], ref.euler_flow(x, *params, 1.0 / layers, "tanh")[0])


def test_batched_leading_dims_equal_flattened():
    params = random_params(3, 8, 2)
    x = torch.randn(4, 5, 2, dtype=torch.float64)
    out_b, e_b = ref.euler_flow(x, *params, 1 / 3, "relu")
    out_f, e_f = ref.euler_flow(x.reshape(-1, 2), *params, 1 / 3, "relu")
    torch.testing.assert_close(out_b.reshape(-1, 2), out_f)
    torch.testing.assert_close(e_b, e_f)


@pytest.mark.parametrize("act", ["relu", "tanh", "softplus"])
def test_reference_flow_gradcheck_float64(act):
    params = [p.requires_grad_() for p in random_params(2, 4, 2)]
    x = (torch.randn(5, 2, dtype=torch.float64) + 0.1).requires_grad_()

    def f(x, *p):
        out, energy = ref.euler_flow(x, *p, 0.5, act)
        return out, energy

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7)


def test_reference_distances_gradcheck_float64():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fl.reference.chamfer(a, b), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: fl.reference.nearest(a, b)[0], (x, y))
    z = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fl.reference.l2(a, b), (x, z))


def test_reference_nearest_and_chamfer_brute_force():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 2, generator=g, dtype=torch.float64)
    y = torch.randn(4, 2, generator=g, dtype=torch.float64)
    d, idx = fl.reference.nearest(x, y)
    for i in range(7):
        dists = [float(((x[i] - y[j]) ** 2).sum()) for j in range(4)]
        assert int(idx[i]) == min(range(4), key=dists.__getitem__)
        assert abs(float(d[i]) - min(dists)) < 1e-14
    want = sum(min(float(((x[i] - y[j]) ** 2).sum()) for j in range(4)) for i in range(7)) / 7
    want += sum(min(float(((x[i] - y[j]) ** 2).sum()) for i in range(7)) for j in range(4)) / 4
    assert abs(float(fl.reference.chamfer(x, y)) - want) < 1e-13


def test_reference_chamfer_lengths_equal_sliced():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 9, 3, generator=g, dtype=torch.float64)
    y = torch.randn(3, 6, 3, generator=g, dtype=torch.float64)
    xl, yl = torch.tensor([9, 4, 1]), torch.tensor([2, 6, 5])
    got = fl.reference.chamfer(x, y, xl, yl)
    for b in range(3):
        want = fl.reference.chamfer(x[b, : xl[b]], y[b, : yl[b]])
        torch.testing.assert_close(got[b], want)
    d, idx = fl.reference.nearest(x, y, yl)
    assert bool((idx < yl[:, None]).all())
