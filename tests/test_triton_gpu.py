"""The Triton kernels at launcher level (kernels/euler_flow.py, softmin.py, nearest.py) against the PyTorch
twins (fastlddmm.ops.*.reference): the fast paths (D = 1, 2, 3: per-coordinate tiles, packed operands) and
the generic path (D > 3), values and gradients, float32 and float64.

Where it runs:
* without a GPU, in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
  imported): tiny sizes and forced small tiles, so that every tile loop, hidden-unit chunk loop, padded
  row / column / hidden unit and the multi-program backward are exercised. The interpreter computes in
  numpy: exact division, exp2, log2 (inline PTX is replaced by them, see kernels/euler_flow.py).
* with a GPU, the same tests compiled, and the @pytest.mark.gpu ones at real sizes (the paper's H = 500,
  L = 10; 10^4-point clouds) with the launchers' own tiles, plus N·D beyond 2^31 (int64 offsets) where the
  GPU has the memory, and the device guard where there are two GPUs.

Tolerances (relative to the largest entry of the reference, which is computed in float64 on the
float32-rounded inputs, so only the kernels' arithmetic is measured):
* interpreter, float32: 16-40 ulps (values 1e-6, gradients 5e-6 for the streaming kernels; the flow
  1e-5: L = 2-3 layers of H-long sums); float64: 1e-12.
* GPU, float32 (GPU_F32): the kernels use ex2.approx / lg2.approx / rcp.approx / rsqrt.approx (relative
  error ~2^-22, 4x a correctly rounded float32 operation), FMAs contract, and in-thread sums run in
  another order and length than the interpreter's: 4-8x the interpreter tolerances, and for the flow at
  H = 500, L = 10 (sums 25x longer, compounded over 10 layers) 1e-4. float64 (libdevice exp / log,
  correctly rounded to ~1 ulp; only FMA contraction and order change): 1e-11.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close

pytest.importorskip("triton", reason="the triton package is missing: pip install 'fastlddmm[triton]'")

from fastlddmm.kernels import euler_flow as K  # noqa: E402
from fastlddmm.kernels import nearest as NK  # noqa: E402
from fastlddmm.kernels import softmin as SK  # noqa: E402
from fastlddmm.ops.flow import reference as flow_ref  # noqa: E402
from fastlddmm.ops.nearest.reference import squared_distances  # noqa: E402
from fastlddmm.ops.softmin.reference import cost_matrix  # noqa: E402

GPU = torch.cuda.is_available()
if not GPU and K.cpu_unavailable_reason() is not None:
    pytest.skip(f"no CUDA GPU, and the Triton interpreter is unusable: {K.cpu_unavailable_reason()}",
                allow_module_level=True)
DEV = torch.device("cuda" if GPU else "cpu")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU: run `pytest -m gpu` on a machine with one")

# (dtype, value tolerance, gradient tolerance), relative to the reference's largest entry (docstring).
STREAM = [(torch.float32, 1e-6, 5e-6), (torch.float64, 1e-12, 1e-12)]
FLOW = [(torch.float32, 1e-5, 1e-5), (torch.float64, 1e-12, 1e-12)]
GPU_F32 = {"stream": (5e-6, 4e-5), "flow": (1e-4, 1e-4)}
ACTS = ("relu", "tanh", "softplus")


def close(actual, expected, tol, name):
    """|actual - expected| <= tol · (|expected| + max |expected|), in float64."""
    expected = expected.detach().double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * max(scale, 1e-300), name=name)


def rnd(*shape, gen, scale=1.0, offset=0.0, dtype=torch.float64):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(device=DEV, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Euler flow
# ------------------------------------------------------------------------------------------------


def flow_problem(n, width, dim, layers, dtype, seed=0, w1_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = rnd(n, dim, gen=g, dtype=dtype)
    params = (rnd(layers, width, dim, gen=g, scale=w1_scale, dtype=dtype), rnd(layers, width, gen=g, scale=0.5, dtype=dtype),
              rnd(layers, dim, width, gen=g, scale=1 / math.sqrt(width), dtype=dtype),
              rnd(layers, dim, gen=g, scale=0.5, dtype=dtype))
    return x, params, rnd(n, dim, gen=g, dtype=dtype), rnd(gen=g, dtype=dtype)


def check_flow(n, width, dim, layers, dtype, vtol, gtol, act, dt=0.37, seed=0, w1_scale=1.0, **tiling):
    x, params, gx, g_s = flow_problem(n, width, dim, layers, dtype, seed, w1_scale)
    leaves = [t.double().requires_grad_() for t in (x, *params)]
    traj = flow_ref.trajectory(*leaves, dt, act)  # (L + 1, N, D)
    kinetic = sum(flow_ref.velocity(traj[l], *(p[l] for p in leaves[1:]), act).pow(2).sum() for l in range(layers))
    want = torch.autograd.grad((traj[-1] * gx.double()).sum() + kinetic * g_s.double(), leaves)

    fwd_tiles = {k: v for k, v in tiling.items() if k in ("block_n", "block_h")}
    x_final, states, s = K.forward(x, *params, dt, act, **fwd_tiles)
    close(x_final, traj[-1], vtol, "x_final")
    close(states, traj[:-1], vtol, "states")
    close(s, kinetic, vtol, "kinetic_sum")
    got = K.backward(gx, g_s, states, *params, dt, act, **tiling)
    for name, a, b in zip(("grad_x", "grad_w1", "grad_b1", "grad_w2", "grad_b2"), got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
        close(a, b, gtol, name)


@pytest.mark.parametrize("dtype,vtol,gtol", FLOW)
@pytest.mark.parametrize("act", ACTS)
def test_flow_fast_path_tiles_chunks_programs(act, dtype, vtol, gtol):
    # N = 37 over tiles of 16 (a padded tile), H = 17 over chunks of 8 (padded hidden units), 2 programs
    # walking 3 tiles (the grid-stride loop and the sum over the partial slots).
    check_flow(37, 17, 3, 2, dtype, vtol, gtol, act, block_n=16, block_h=8, num_programs=2)


@pytest.mark.parametrize("dim,act", [(1, "tanh"), (2, "softplus"), (2, "relu")])
def test_flow_fast_path_other_dimensions(dim, act):
    check_flow(7, 33, dim, 3, torch.float64, 1e-12, 1e-12, act, block_n=4, block_h=8)


def test_flow_generic_path():
    # D = 5 > 3: the (BLOCK_N, BLOCK_H, BLOCK_D) kernels.
    check_flow(9, 5, 5, 2, torch.float64, 1e-12, 1e-12, "tanh")


@pytest.mark.parametrize("dtype,vtol,gtol", FLOW)
@pytest.mark.parametrize("act", ["softplus", "tanh"])
def test_flow_activation_extremes(act, dtype, vtol, gtol):
    # |z| up to ~60: softplus on both sides of torch's threshold z = 20 (h = z, gradient 1 above), tanh
    # saturated (2^z' overflows to inf: h = ±1 exactly, no NaN).
    check_flow(13, 9, 3, 2, dtype, vtol, gtol, act, dt=0.05, w1_scale=25.0, block_n=8, block_h=8)


def test_flow_states_not_saved_and_zero_layers():
    x, params, _, _ = flow_problem(5, 4, 3, 2, torch.float64)
    x_final, states, s = K.forward(x, *params, 0.5, "relu", save_states=False)
    assert states.shape == (0, 5, 3)
    want, _, _ = K.forward(x, *params, 0.5, "relu")
    assert torch.equal(x_final, want)
    empty = [p[:0] for p in params]
    x0, st0, s0 = K.forward(x, *empty, 0.5, "relu")
    assert torch.equal(x0, x) and st0.shape == (0, 5, 3) and float(s0) == 0.0


# ------------------------------------------------------------------------------------------------
# Soft-min, weighted sum
# ------------------------------------------------------------------------------------------------


def clouds(batch, n, m, dim, dtype, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = rnd(batch, n, dim, gen=g, offset=offset, dtype=dtype)
    y = rnd(batch, m, dim, gen=g, scale=0.8, offset=0.3 + offset, dtype=dtype)
    return x, y, rnd(batch, m, gen=g, scale=2.0, dtype=dtype), g


def check_softmin(batch, n, m, dim, p, dtype, vtol, gtol, eps=0.3, seed=0, h_mask=None, **tiles):
    x, y, h, g = clouds(batch, n, m, dim, dtype, seed)
    if h_mask is not None:
        h = h.masked_fill(h_mask.to(DEV), float("-inf"))
    go = rnd(batch, n, gen=g, dtype=dtype)
    xd, yd, hd = (t.double().requires_grad_() for t in (x, y, h))
    lse_ref = (hd[:, None, :] - cost_matrix(xd, yd, p) / eps).logsumexp(-1)
    want = torch.autograd.grad((-eps * lse_ref * go.double()).sum(), (xd, yd, hd))
    lse = SK.forward(x, y, h, eps, p, **tiles)
    close(lse, lse_ref, vtol, "lse")
    close(SK.backward_x(x, y, h, lse, go, eps, p, **tiles), want[0], gtol, "grad x")
    gy, gh = SK.backward_y(x, y, h, lse, go, eps, p, **tiles)
    close(gy, want[1], gtol, "grad y")
    close(gh, want[2], gtol, "grad h")


@pytest.mark.parametrize("dtype,vtol,gtol", STREAM)
@pytest.mark.parametrize("p", [2, 1])
@pytest.mark.parametrize("n,m,dim,block_n,block_m", [(13, 29, 3, 4, 8), (7, 5, 2, 2, 2), (1, 17, 1, 2, 4)])
def test_softmin_fast_path(n, m, dim, block_n, block_m, p, dtype, vtol, gtol):
    check_softmin(2, n, m, dim, p, dtype, vtol, gtol, block_n=block_n, block_m=block_m)


def test_softmin_generic_path():
    check_softmin(2, 9, 11, 5, 2, torch.float64, 1e-12, 1e-12, block_n=4, block_m=4)


def test_softmin_zero_weight_tiles():
    # h = -inf over the whole first y tile (zero weights): the running max stays -inf there and must not
    # turn the sum into NaN; later tiles carry the mass.
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, :4] = True
    check_softmin(1, 5, 12, 3, 2, torch.float64, 1e-12, 1e-12, h_mask=mask, block_n=4, block_m=4)


def test_softmin_offset_clouds_float32():
    # Clouds 1e3 from the origin: the difference form keeps the float32 reference's accuracy (the
    # |x|² + |y|² - 2 x·y expansion would lose every digit of these O(1) distances).
    x, y, h, _ = clouds(1, 11, 13, 3, torch.float32, 3, offset=1e3)
    eps = 0.5
    want = (h.double()[:, None, :] - cost_matrix(x.double(), y.double(), 2) / eps).logsumexp(-1)
    close(SK.forward(x, y, h, eps, 2, block_n=4, block_m=4), want, 1e-6, "lse offset")


@pytest.mark.parametrize("dtype,vtol,gtol", STREAM)
@pytest.mark.parametrize("p,dim", [(2, 3), (1, 3), (2, 2), (2, 5)])
def test_weighted_sum(p, dim, dtype, vtol, gtol):
    x, y, h, g = clouds(2, 13, 29, dim, dtype, 17)
    v = rnd(2, 29, dim, gen=g, dtype=dtype)
    eps, tiles = 0.2, dict(block_n=4, block_m=8)
    xd, hd, vd = (t.double().requires_grad_() for t in (x, h, v))
    ref = (hd[:, None, :] - cost_matrix(xd, y.double(), p) / eps).softmax(-1) @ vd
    lse = SK.forward(x, y, h, eps, p, **tiles)
    out = SK.weighted_sum(x, y, h, v, lse, eps, p, **tiles)
    close(out, ref, vtol, "weighted sum")
    go = rnd(2, 13, dim, gen=g, dtype=dtype)
    want = torch.autograd.grad((ref * go.double()).sum(), (xd, hd, vd))
    gx, gv, gh = SK.weighted_sum_backward(x, y, h, v, lse, out, go, eps, p, **tiles)
    close(gx, want[0], gtol, "grad x")
    close(gh, want[1], gtol, "grad h")
    close(gv, want[2], gtol, "grad v")


# ------------------------------------------------------------------------------------------------
# Nearest
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_nearest(dim, dtype):
    x, y, _, _ = clouds(2, 19, 37, dim, dtype, 5)
    want = squared_distances(x.double(), y.double()).argmin(-1)
    got = NK.nearest_index(x, y, block_n=4, block_m=8)
    if not torch.equal(got, want):  # a float32 near-tie may pick the other one: compare distances there
        d2 = squared_distances(x.double(), y.double())
        close(d2.gather(-1, got[..., None]), d2.gather(-1, want[..., None]), 1e-6, "nearest distance")


def test_nearest_ties_nan_and_padding():
    x = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64, device=DEV)
    # y_1 and y_2 tie for x_0 across two tiles of 2: the first wins; y_3 (index 3) is NaN.
    y = torch.tensor([[5.0, 0, 0], [1.0, 0, 0], [-1.0, 0, 0], [float("nan"), 0, 0], [2.0, 0, 0]],
                     dtype=torch.float64, device=DEV)
    assert NK.nearest_index(x, y, block_n=2, block_m=2).tolist() == [1, 4]
    assert NK.nearest_index(x[:1], y[3:4], block_n=2, block_m=2).tolist() == [0]  # an all-NaN row: index 0


# ------------------------------------------------------------------------------------------------
# GPU: real sizes with the launchers' own tiles, int64 offsets, the device guard
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ACTS)
def test_gpu_flow_paper_sizes(act, dtype):
    vtol, gtol = GPU_F32["flow"] if dtype == torch.float32 else (1e-11, 1e-11)
    check_flow(1013, 500, 3, 10, dtype, vtol, gtol, act, dt=0.1)


@pytest.mark.gpu
@needs_gpu
def test_gpu_flow_many_tiles_per_program_and_d2():
    check_flow(100_003, 64, 2, 3, torch.float32, *GPU_F32["flow"], "softplus", num_programs=7)


@pytest.mark.gpu
@needs_gpu
def test_gpu_flow_backward_is_deterministic():
    x, params, gx, g_s = flow_problem(20_011, 500, 3, 4, torch.float32, seed=3)
    _, states, _ = K.forward(x, *params, 0.25, "tanh")
    first = K.backward(gx, g_s, states, *params, 0.25, "tanh")
    second = K.backward(gx, g_s, states, *params, 0.25, "tanh")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p,dim", [(2, 3), (1, 3), (2, 2)])
def test_gpu_softmin_sizes(p, dim, dtype):
    vtol, gtol = GPU_F32["stream"] if dtype == torch.float32 else (1e-11, 1e-11)
    check_softmin(2, 3001, 2503, dim, p, dtype, vtol, gtol, eps=0.05)


@pytest.mark.gpu
@needs_gpu
def test_gpu_nearest_sizes():
    x, y, _, _ = clouds(2, 5003, 4001, 3, torch.float64, 9)
    assert torch.equal(NK.nearest_index(x, y), squared_distances(x, y).argmin(-1))


def _free_gpu_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if GPU else 0


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
@pytest.mark.skipif(_free_gpu_bytes() < 48 * 2**30, reason="needs ~40 GiB of free GPU memory")
def test_gpu_offsets_past_2_31():
    # N·D > 2^31 (float32: 8.6 GB per (N, 3) array). Only the last rows carry weight (go = 0 elsewhere),
    # so the reference is computed on them alone: the rows whose offsets overflow int32.
    n, m, dim, eps = (2**31) // 3 + 4099, 64, 3, 0.5
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, n, dim, device="cuda", generator=g)
    y = torch.randn(1, m, dim, device="cuda", generator=g)
    h = torch.zeros(1, m, device="cuda")
    tail = slice(n - 4099, n)
    lse = SK.forward(x, y, h, eps, 2)
    want = (h.double()[:, None, :] - cost_matrix(x[:, tail].double(), y.double(), 2) / eps).logsumexp(-1)
    close(lse[:, tail], want, GPU_F32["stream"][0], "lse tail")
    go = torch.zeros(1, n, device="cuda")
    go[:, tail] = 1.0
    gy, gh = SK.backward_y(x, y, h, lse, go, eps, 2)
    yd, hd = y.double().requires_grad_(), h.double().requires_grad_()
    f = -eps * (hd[:, None, :] - cost_matrix(x[:, tail].double(), yd, 2) / eps).logsumexp(-1)
    want_gy, want_gh = torch.autograd.grad(f.sum(), (yd, hd))
    close(gy, want_gy, GPU_F32["stream"][1], "grad y tail")
    close(gh, want_gh, GPU_F32["stream"][1], "grad h tail")
    idx = NK.nearest_index(x, y)[:, tail]
    assert torch.equal(idx, squared_distances(x[:, tail].double(), y.double()).argmin(-1))
    del x, go, lse
    # The flow's states (L, N, D) with L·N·D > 2^31: the last layer's rows.
    n_f, layers = 2**31 // (3 * 4) + 1001, 4
    xf = torch.randn(n_f, 3, device="cuda", generator=g)
    params = [t.float().cuda() for t in flow_problem(1, 16, 3, layers, torch.float64)[1]]
    _, states, _ = K.forward(xf, *params, 0.25, "relu")
    want_states = flow_ref.trajectory(xf[-1001:].double(), *(p.double() for p in params), 0.25, "relu")[:-1]
    close(states[:, -1001:], want_states, GPU_F32["flow"][0], "states tail")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (tensors on cuda:1, cuda:0 current)")
def test_gpu_device_guard():
    with torch.cuda.device(0):
        dev = torch.device("cuda:1")
        x = torch.randn(1, 300, 3, device=dev, dtype=torch.float64)
        y = torch.randn(1, 200, 3, device=dev, dtype=torch.float64)
        h = torch.zeros(1, 200, device=dev, dtype=torch.float64)
        want = (h[:, None, :] - cost_matrix(x, y, 2) / 0.3).logsumexp(-1)
        close(SK.forward(x, y, h, 0.3, 2), want, 1e-11, "lse on cuda:1")
        assert torch.equal(NK.nearest_index(x, y), squared_distances(x, y).argmin(-1))
        xf, params, gx, g_s = flow_problem(100, 32, 3, 2, torch.float64)
        xf, params = xf.to(dev), [p.to(dev) for p in params]
        out, states, _ = K.forward(xf, *params, 0.5, "tanh")
        want_x = flow_ref.trajectory(xf, *params, 0.5, "tanh")[-1]
        close(out, want_x, 1e-11, "x_final on cuda:1")
        grads = K.backward(gx.to(dev), g_s.to(dev), states, *params, 0.5, "tanh")
        assert all(t.device == dev for t in grads)
