"""The torch.library custom ops behind fl.ops.euler_flow: torch.ops callers, opcheck, torch.compile."""

from __future__ import annotations

import pytest
import torch

from fastlddmm.ops.euler_flow import euler_flow
from fastlddmm.reference.flow import euler_flow as reference_euler_flow

from conftest import assert_close, flow_params, random_points, require_backend

# float64 throughout: the paths differ only in summation order (~1e-15 relative); 1e-10 / 1e-9 is a
# wide margin that any formula error would still break.
RTOL, ATOL = 1e-10, 1e-9


@pytest.fixture(autouse=True)
def _needs_cpu_path():
    require_backend("cpu")


def _inputs(n=7, dim=3, width=16, layers=4, seed=0):
    x = random_points(n, dim, requires_grad=True, seed=seed + 1)
    return x, flow_params(layers, width, dim, requires_grad=True, seed=seed)


def test_torch_ops_entry_point_values_and_gradients():
    x, params = _inputs()
    x_final, energy, states = torch.ops.fastlddmm.euler_flow(x, *params, 0.25, "tanh", "cpu", True)
    want_out, want_energy = reference_euler_flow(x, *params, 0.25, "tanh")
    assert states.shape == (4, 7, 3)
    assert_close(states[0], x.detach(), rtol=0, atol=0, name="states[0] = x")
    assert_close(x_final, want_out, rtol=RTOL, atol=ATOL, name="x_final")
    assert_close(energy, want_energy, rtol=RTOL, atol=ATOL, name="energy")
    assert not states.requires_grad  # marked non-differentiable
    got = torch.autograd.grad(x_final.square().sum() + 2.0 * energy, [x, *params])
    want = torch.autograd.grad(want_out.square().sum() + 2.0 * want_energy, [x, *params])
    for name, g, w in zip(("x", "weight1", "bias1", "weight2", "bias2"), got, want):
        assert_close(g, w, rtol=RTOL, atol=ATOL, name=f"grad {name}")


def test_states_not_saved_cannot_backward():
    x, params = _inputs()
    x_final, energy, states = torch.ops.fastlddmm.euler_flow(x, *params, 0.25, "relu", "cpu", False)
    assert states.shape == (0, 7, 3)
    with pytest.raises(RuntimeError, match="save_states=False"):
        torch.autograd.grad(x_final.sum(), [x])


def test_op_checks_shapes_for_direct_callers():
    """The kernels read raw buffers: a direct torch.ops call with inconsistent shapes must raise, not crash."""
    x, (w1, b1, w2, b2) = _inputs()
    with pytest.raises(ValueError, match="bias2"):
        torch.ops.fastlddmm.euler_flow(x, w1, b1, w2, b2[:, :2], 0.25, "relu", "cpu", True)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        torch.ops.fastlddmm.euler_flow(x[None], w1, b1, w2, b2, 0.25, "relu", "cpu", True)
    with pytest.raises(ValueError, match="states"):
        torch.ops.fastlddmm.euler_flow_backward(x, x.new_ones(()), x.new_zeros(3, 7, 3), w1, b1, w2, b2, 0.25,
                                                "relu", "cpu")


def test_opcheck():
    """torch.library.opcheck: schema, fake tensors, autograd registration and AOT dispatch agree."""
    x, params = _inputs(n=5, dim=2, width=3, layers=2)
    torch.library.opcheck(torch.ops.fastlddmm.euler_flow.default, (x, *params, 0.5, "softplus", "cpu", True))
    with torch.no_grad():
        _, _, states = torch.ops.fastlddmm.euler_flow(x, *params, 0.5, "softplus", "cpu", True)
    grad_out = random_points(5, 2, seed=9)
    torch.library.opcheck(torch.ops.fastlddmm.euler_flow_backward.default,
                          (grad_out, x.new_tensor(0.7), states, *[p.detach() for p in params], 0.5, "softplus",
                           "cpu"))


def test_torch_compile_fullgraph_cpu():
    """A compiled training step: one graph (fullgraph=True), same values and gradients as eager, and
    a second point count does not break it."""

    def loss_fn(x, w1, b1, w2, b2):
        out, energy = euler_flow(x, w1, b1, w2, b2, 0.25, "tanh", backend="auto")
        return (out - 1.0).square().mean() + 0.1 * energy

    compiled = torch.compile(loss_fn, fullgraph=True)
    for n in (1013, 7):
        x, params = _inputs(n=n)
        got = compiled(x, *params)
        want = loss_fn(x, *params)
        assert_close(got, want, rtol=RTOL, atol=ATOL, name=f"compiled loss (N={n})")
        g_got = torch.autograd.grad(got, [x, *params])
        g_want = torch.autograd.grad(want, [x, *params])
        for name, g, w in zip(("x", "weight1", "bias1", "weight2", "bias2"), g_got, g_want):
            assert_close(g, w, rtol=RTOL, atol=ATOL, name=f"compiled grad {name} (N={n})")
    # and the compiled fused path agrees with the reference, not only with its own eager run
    x, params = _inputs()
    out, energy = reference_euler_flow(x, *params, 0.25, "tanh")
    assert_close(compiled(x, *params), (out - 1.0).square().mean() + 0.1 * energy, rtol=RTOL, atol=ATOL,
                 name="compiled vs reference")


def test_torch_compile_no_grad_inference():
    x, params = _inputs()
    compiled = torch.compile(lambda x, *p: euler_flow(x, *p, 0.25, "relu", backend="cpu"), fullgraph=True)
    with torch.no_grad():
        out, energy = compiled(x, *params)
    want_out, want_energy = reference_euler_flow(x, *params, 0.25, "relu")
    assert_close(out, want_out.detach(), rtol=RTOL, atol=ATOL, name="x_final")
    assert_close(energy, want_energy.detach(), rtol=RTOL, atol=ATOL, name="energy")
