"""Property-based tests (hypothesis) of the distances and the flow, on random shapes and sizes."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlddmm as fl

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cloud_pairs(draw, max_points=12):
    n = draw(st.integers(1, max_points))
    m = draw(st.integers(1, max_points))
    dim = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    offset = draw(st.sampled_from([0.0, 10.0, -1000.0]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) + offset
    y = torch.randn(m, dim, generator=g, dtype=torch.float64) + offset
    return x, y


@SETTINGS
@given(cloud_pairs())
def test_chamfer_properties(pair):
    x, y = pair
    c = fl.chamfer(x, y)
    assert float(c) >= 0
    torch.testing.assert_close(c, fl.chamfer(y, x))  # symmetric
    assert float(fl.chamfer(x, x)) == 0.0  # zero for identical clouds
    perm = torch.randperm(x.shape[0])
    torch.testing.assert_close(fl.chamfer(x[perm], y), c)  # invariant to point order


@SETTINGS
@given(cloud_pairs())
def test_nearest_distance_is_distance_at_index(pair):
    x, y = pair
    d, idx = fl.nearest(x, y)
    assert idx.dtype == torch.int64
    torch.testing.assert_close(d, ((x - y[idx]) ** 2).sum(-1))
    brute = torch.cdist(x, y).pow(2).min(-1).values
    torch.testing.assert_close(d, brute, rtol=1e-9, atol=1e-9 * (1 + float(x.abs().max()) ** 2))


@SETTINGS
@given(cloud_pairs(max_points=8), st.sampled_from([0.1, 0.5, 1.0]))
def test_sinkhorn_debiased_properties(pair, blur):
    x, y = pair
    x, y = x - x.mean(0), y - x.mean(0)  # Sinkhorn is translation-invariant; keep the numbers well scaled
    s = fl.sinkhorn(x, y, blur=blur)
    assert float(s) >= -1e-9
    torch.testing.assert_close(s, fl.sinkhorn(y, x, blur=blur), rtol=1e-6, atol=1e-9)
    assert abs(float(fl.sinkhorn(x, x, blur=blur))) < 1e-9


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 9), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_flow_is_invertible_for_small_weights(layers, width, n, seed):
    torch.manual_seed(seed)
    flow = fl.ResNetFlow(dim=2, width=width, layers=layers, activation="tanh").double()
    with torch.no_grad():
        flow.weight2.normal_(std=0.2 / width**0.5)
        flow.bias2.normal_(std=0.2)
    x = torch.randn(n, 2, dtype=torch.float64)
    torch.testing.assert_close(flow.inverse(flow(x)), x, rtol=0, atol=1e-9)
    assert bool((flow.jacobian_determinant(x) > 0).all())


def _fast_flow_backends():
    return [b for b in ("cpu",) if fl.backends()[b].available]


@pytest.mark.parametrize("backend", _fast_flow_backends() or [pytest.param("cpu", marks=pytest.mark.skip(
    reason="fastlddmm._C is not built: pip install -e . with a C++ compiler builds it"))])
@SETTINGS
@given(st.integers(1, 3), st.integers(1, 17), st.integers(1, 40), st.integers(1, 3), st.integers(0, 2**31 - 1),
       st.sampled_from(["contiguous", "transposed", "strided", "expanded"]))
def test_fast_flow_equals_reference_on_random_shapes_and_strides(backend, layers, width, n, dim, seed, layout):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(*s, generator=g, dtype=torch.float64) * 0.5
              for s in ((layers, width, dim), (layers, width), (layers, dim, width), (layers, dim))]
    base = torch.randn(2 * n, dim, generator=g, dtype=torch.float64)
    if layout == "transposed":
        x = base[:n].T.contiguous().T  # same values, column-major strides
    elif layout == "strided":
        x = base[::2]
    elif layout == "expanded":
        x = base[:1].expand(n, dim)  # stride 0 along the points
    else:
        x = base[:n]
    got, e_got = fl.ops.euler_flow(x, *params, 1.0 / layers, "tanh", backend=backend)
    want, e_want = fl.reference.euler_flow(x, *params, 1.0 / layers, "tanh")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(e_got, e_want, rtol=1e-10, atol=1e-12)
