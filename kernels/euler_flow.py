"""Triton kernels of the fused ResNet-LDDMM Euler flow: forward and backward, then the launchers.

Model and backward formulas: fastlddmm/ops/flow/reference.py (the ground truth) and the launcher
contract in fastlddmm/ops/flow/__init__.py. Per layer l, for every point x (a row of the tile):
    z = W1_l x + b1_l (H),  h = ρ(z),  v = W2_l h + b2_l (D),  x <- x + dt·v,
    S = Σ_l Σ_i |v_l(x_i^l)|² (the kinetic sum, raw; the op makes it the energy ½ · dt · S / N).

Design (judged by the compiled SASS, see benchmarks/kernel_report.py):

* One program = one tile of BLOCK_N points through ALL L layers. The tile's points stay in registers
  from layer to layer; only states[l] (the input of block l, L·N·D numbers) is written, for the
  backward pass. Hidden activations (N·H per layer) never touch global memory: they are computed
  BLOCK_H units at a time and recomputed in the backward pass.

* D = 1, 2, 3 (a constexpr) take the fast path: one (BLOCK_N, BLOCK_H) register tile per coordinate,
  z = b1 + Σ_d x_d w1_d and v_d += h · w2_d as elementwise FMAs. The velocity accumulators stay
  elementwise (BLOCK_N, BLOCK_H) tiles through the hidden loop and are reduced over H once after it:
  the hidden loop of the forward holds no shuffle and no barrier, ~7 FMA-class instructions per
  (point, hidden unit) for relu. Larger D take the generic path: a (BLOCK_N, BLOCK_H, BLOCK_D) block
  with tl.sum over D (lanes on D, shuffle-bound, but any D).

* Packed, pre-scaled weights (built by the launcher, O(L·H), padded to whole BLOCK_H chunks with zeros):
  wp (L, Hp, 8) rows [s_in·w1_0, s_in·w1_1, s_in·w1_2, s_in·b1, s_out·w2_0, s_out·w2_1, s_out·w2_2, 0], so a
  hidden unit's 7 numbers are loads at constant offsets from one pointer, the loop has no masks, and the
  activation's constants are folded into the weights: tanh takes z' = 2 log2(e)·z and h = 1 - 2/(1 + 2^z'),
  softplus z' = log2(e)·z and h' = log2(1 + 2^z') = h / ln 2 (w2 scaled by ln 2; z itself above torch's
  threshold z = 20): one MUFU.EX2 (+ one MUFU.RCP or MUFU.LG2) per unit, no multiply by log2(e). float32 uses rcp.approx.ftz /
  lg2.approx.ftz (relative error ~2^-22; inline PTX, so not under the interpreter, which gets the exact
  division and log2); float64 uses libdevice. The backward divides the scaled gradients back.

* Weight gradients (backward): the layout puts each hidden unit of a chunk in one thread and the chunk's
  BLOCK_N points in that thread's registers (BLOCK_H = 32 · num_warps), so Σ_i over the tile's points
  (grad W1, b1, W2) is an in-thread FMA chain: no shuffle, no barrier in the hidden loop. Each program
  adds its sums into its OWN slot of a (P, L, Hp·8 + 4) partial buffer (the packed layout again, plain
  load-add-store: no atomics, deterministic for a given device and grid), torch sums the P slots. The
  grid is P = resident programs (SMs × CTAs per SM from the compiled kernel's registers and shared
  memory), capped by the tiles and by a memory budget; each program walks tiles p, p+P, ... and closes
  each tile with a barrier (a later tile's loads of a slot must see this tile's stores).
  tl.dot for these reductions over points was weighed: with D = 3 the (BLOCK_H × BLOCK_N) @ (BLOCK_N × 16)
  products waste 13/16 of the tensor-core work, need the operands in shared memory (a barrier per chunk)
  and 3×TF32 splitting (~4 instructions per unit) to stay float32-faithful: more than the ~7 in-thread
  FMAs per unit they would replace.

* The kinetic sum: each forward program writes Σ_l Σ_{i in tile} |v|² to its own slot of a
  (num_tiles,) buffer, torch sums it. Deterministic, no atomics, no host sync.

* dt and the other constants are passed as a small tensor of the input dtype, not as Python floats:
  a float kernel argument is float32 under the interpreter whatever the annotation.

* Offsets: row offsets and layer strides are int64 (L·N·D may pass 2^31).

* No autotuning: block sizes come from a table (_GPU_TILES, chosen with the kernel report's sweep: no
  spills for sm_80 / sm_90 with triton 3.6 and 3.9). The interpreter cannot autotune, and the backward
  kernel's read-add-write partials would need resetting between autotuner trials.

* GPU numerics: approximate exp2 / rcp / lg2 (above), FMA contraction and in-thread sums in a different
  order than torch's: float32 results differ from the interpreter's by a few ulps of the largest term,
  summed over L layers; tests/test_triton_gpu.py states its tolerances for that.

Interpreter limitations met (TRITON_INTERPRET=1, triton 3.9):
  - TRITON_INTERPRET=1 must be set before triton is imported, not just before this module: triton
    decorates its own tl.sum, tl.zeros, ... at import, and a compiled-mode one cannot be called from
    an interpreted kernel ("Cannot call @triton.jit'd outside of the scope of a kernel");
    cpu_unavailable_reason() says so instead of failing inside the kernel;
  - triton.language.extra.libdevice (tanh, log1p) returns None, and inline PTX cannot run: the
    activations are written with tl.exp2 / tl.log2 / division there (FAST=False);
  - a Python float kernel argument reaches the kernel as a float32 constant (see dt above);
  - tl.reduce with a user combine function runs one Python call per element: only tl.sum is used;
  - the interpreter pays ~1 ms per executed op whatever the block size, so it gets large blocks.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ._common import _load_rows, _store_rows, device_guard, interpreter_reason, pow2

ACTIVATIONS = ("relu", "tanh", "softplus")
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}
FAST_MAX_D = 3  # D <= 3: the per-coordinate fast path; larger D: the generic kernels
PACK = 8  # floats per hidden unit in the packed weights and in the gradient partials
# (s_in, s_out) per activation: the kernels see z' = s_in·z and h' = h / s_out (module docstring).
_SCALES = {"relu": (1.0, 1.0), "tanh": (2.0 / math.log(2.0), 1.0), "softplus": (1.0 / math.log(2.0), math.log(2.0))}

# Upper bound on the elements of the backward pass's per-program gradient partials (P × L·(8 Hp + 4)):
# 2^25 elements = 128 MiB in float32; P shrinks when L·H is large.
_PARTIAL_BUDGET = 1 << 25


# ----------------------------------------------------------------------------------------------
# Device functions (fast path)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    """1/x: one MUFU.RCP for float32 on the GPU (rcp.approx.ftz, ~1 ulp; x >= 1 here, no denormals)."""
    if FAST and x.dtype == tl.float32:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        r = 1.0 / x
    return r


@triton.jit
def _lg2(x, FAST: tl.constexpr):
    """log2(x) for x in [1, 2]: one MUFU.LG2 for float32 on the GPU (lg2.approx.ftz, abs. error ~2^-22)."""
    if FAST and x.dtype == tl.float32:
        r = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        r = tl.log2(x)
    return r


@triton.jit
def _act(z, ACT: tl.constexpr, FAST: tl.constexpr):
    """h' = ρ(z) / s_out from z' = s_in · z (the scaled units of the packed weights)."""
    if ACT == 0:
        h = tl.maximum(z, 0.0)
    elif ACT == 1:
        # tanh z = 1 - 2 / (1 + e^{2z}); z' = 2 log2(e) z. e^{2z} = inf gives 1, 0 gives -1: no overflow.
        h = 1.0 - 2.0 * _rcp(1.0 + tl.exp2(z), FAST)
    else:
        # softplus / ln 2 = log2(1 + 2^z'), z' = log2(e) z; above z = 20 torch returns z itself (its
        # threshold), which also keeps 2^z' finite. Below, 1 + 2^z' rounds to 1 once 2^z' < ulp(1): an
        # absolute error under ulp(1) · ln 2, as float32 arithmetic on O(1) activations anyway.
        h = tl.where(z > 20.0 * 1.4426950408889634, z, _lg2(1.0 + tl.exp2(z), FAST))
    return h


@triton.jit
def _act_and_grad(z, ACT: tl.constexpr, FAST: tl.constexpr):
    """(h' as _act, ρ'(z) unscaled), sharing the exp2 and the reciprocal."""
    if ACT == 0:
        h = tl.maximum(z, 0.0)
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        h = 1.0 - 2.0 * _rcp(1.0 + tl.exp2(z), FAST)
        d = 1.0 - h * h
    else:
        e = tl.exp2(z)
        u = 1.0 + e
        big = z > 20.0 * 1.4426950408889634  # torch's threshold: h = z, gradient 1
        h = tl.where(big, z, _lg2(u, FAST))
        d = tl.where(big, 1.0, e * _rcp(u, FAST))  # sigmoid(z) = e^z / (1 + e^z), no cancellation
    return h, d


@triton.jit
def _preact(p, x0, x1, x2, D: tl.constexpr):
    """z' (BLOCK_N, BLOCK_H) for the packed rows p (BLOCK_H,) of one chunk."""
    z = tl.load(p + 3)[None, :] + x0[:, None] * tl.load(p)[None, :]
    if D > 1:
        z += x1[:, None] * tl.load(p + 1)[None, :]
    if D > 2:
        z += x2[:, None] * tl.load(p + 2)[None, :]
    return z


@triton.jit
def _velocity(wl, HP, x0, x1, x2, b2_l, D: tl.constexpr, ACT: tl.constexpr, BLOCK_H: tl.constexpr,
              FAST: tl.constexpr):
    """v_d = Σ_k h'_k w2'_dk + b2_d (BLOCK_N,) per coordinate; elementwise accumulators, reduced once."""
    a0 = tl.zeros([x0.shape[0], BLOCK_H], dtype=x0.dtype)
    a1 = tl.zeros([x0.shape[0], BLOCK_H], dtype=x0.dtype)
    a2 = tl.zeros([x0.shape[0], BLOCK_H], dtype=x0.dtype)
    p = wl + tl.arange(0, BLOCK_H) * 8
    for _ in range(0, HP, BLOCK_H):
        h = _act(_preact(p, x0, x1, x2, D), ACT, FAST)
        a0 += h * tl.load(p + 4)[None, :]
        if D > 1:
            a1 += h * tl.load(p + 5)[None, :]
        if D > 2:
            a2 += h * tl.load(p + 6)[None, :]
        p += BLOCK_H * 8
    v0 = tl.sum(a0, axis=1) + tl.load(b2_l)
    v1 = v0
    v2 = v0
    if D > 1:
        v1 = tl.sum(a1, axis=1) + tl.load(b2_l + 1)
    if D > 2:
        v2 = tl.sum(a2, axis=1) + tl.load(b2_l + 2)
    return v0, v1, v2


# ----------------------------------------------------------------------------------------------
# Kernels, fast path (D <= 3)
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N"])
def _euler_flow_fwd_kernel(
    x_ptr,  # (N, D)
    wp_ptr,  # (L, Hp, 8) packed, scaled [w1 | b1 | w2 | 0] per hidden unit
    b2_ptr,  # (L, D)
    c_ptr,  # (1,) [dt]
    out_ptr,  # (N, D) x at time 1
    states_ptr,  # (L, N, D) states[l] = input of block l
    sq_ptr,  # (num_tiles,) per tile: Σ_l Σ_i |v_l(x_i^l)|²
    N, L, HP,
    D: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
    STORE_STATES: tl.constexpr, FAST: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    layer_stride = tl.cast(N, tl.int64) * D
    dt = tl.load(c_ptr)
    x0, x1, x2 = _load_rows(x_ptr, rows, row_ok, D)
    sq = tl.zeros([BLOCK_N], dtype=x0.dtype)
    for layer in range(L):
        if STORE_STATES:
            _store_rows(states_ptr + layer * layer_stride, rows, row_ok, x0, x1, x2, D)
        v0, v1, v2 = _velocity(wp_ptr + tl.cast(layer, tl.int64) * HP * 8, HP, x0, x1, x2, b2_ptr + layer * D, D, ACT,
                               BLOCK_H, FAST)
        # padded rows would add b2-driven velocity to the energy
        v0 = tl.where(row_ok, v0, 0.0)
        sq += v0 * v0
        x0 += dt * v0
        if D > 1:
            v1 = tl.where(row_ok, v1, 0.0)
            sq += v1 * v1
            x1 += dt * v1
        if D > 2:
            v2 = tl.where(row_ok, v2, 0.0)
            sq += v2 * v2
            x2 += dt * v2
    _store_rows(out_ptr, rows, row_ok, x0, x1, x2, D)
    tl.store(sq_ptr + pid, tl.sum(sq, axis=0))


@triton.jit(do_not_specialize=["N", "num_tiles"])
def _euler_flow_bwd_kernel(
    gout_ptr,  # (N, D) dLoss/dx_final
    states_ptr,  # (L, N, D)
    wp_ptr,  # (L, Hp, 8) packed as for the forward
    b2_ptr,  # (L, D)
    c_ptr,  # (3,) [dt, 2 · dLoss/dS, 1 / (s_in · s_out)]
    gx_ptr,  # (N, D) dLoss/dx
    part_ptr,  # (P, L, Hp·8 + 4) this program's partial sums: per hidden unit [s_out·gW1 | s_out·gb1 | gW2/s_out | 0],
               # then gb2 (D) per layer
    N, L, HP, num_tiles,
    D: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, FAST: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    layer_stride = tl.cast(N, tl.int64) * D
    per_layer = HP * 8 + 4
    slot = part_ptr + pid.to(tl.int64) * L * per_layer
    dt = tl.load(c_ptr)
    e_coef = tl.load(c_ptr + 1)  # dLoss/dv = 2 · dLoss/dS · v
    back = tl.load(c_ptr + 2)  # Σ_k gz'_k w1'_k = s_in · s_out · (W1ᵀ gz)
    units = tl.arange(0, BLOCK_H) * 8

    for tile in range(pid, num_tiles, num_progs):
        rows = tl.cast(tile, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        g0, g1, g2 = _load_rows(gout_ptr, rows, row_ok, D)  # dLoss/dx^{l+1}
        for rev in range(L):
            layer = L - 1 - rev
            wl = wp_ptr + tl.cast(layer, tl.int64) * HP * 8
            sl = slot + layer * per_layer
            x0, x1, x2 = _load_rows(states_ptr + layer * layer_stride, rows, row_ok, D)
            v0, v1, v2 = _velocity(wl, HP, x0, x1, x2, b2_ptr + layer * D, D, ACT, BLOCK_H, FAST)
            # gv = dt · g + 2 dL/dS · v; padded rows contribute to no gradient
            gv0 = tl.where(row_ok, dt * g0 + e_coef * v0, 0.0)
            gv1 = gv0
            gv2 = gv0
            tl.store(sl + HP * 8, tl.load(sl + HP * 8) + tl.sum(gv0, axis=0))
            if D > 1:
                gv1 = tl.where(row_ok, dt * g1 + e_coef * v1, 0.0)
                tl.store(sl + HP * 8 + 1, tl.load(sl + HP * 8 + 1) + tl.sum(gv1, axis=0))
            if D > 2:
                gv2 = tl.where(row_ok, dt * g2 + e_coef * v2, 0.0)
                tl.store(sl + HP * 8 + 2, tl.load(sl + HP * 8 + 2) + tl.sum(gv2, axis=0))

            c0 = tl.zeros([BLOCK_N, BLOCK_H], dtype=x0.dtype)
            c1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=x0.dtype)
            c2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=x0.dtype)
            p = wl + units
            q = sl + units
            for _ in range(0, HP, BLOCK_H):
                w10 = tl.load(p)[None, :]
                z = tl.load(p + 3)[None, :] + x0[:, None] * w10
                a = gv0[:, None] * tl.load(p + 4)[None, :]  # s_out · (W2ᵀ gv)
                w11 = w10
                w12 = w10
                if D > 1:
                    w11 = tl.load(p + 1)[None, :]
                    z += x1[:, None] * w11
                    a += gv1[:, None] * tl.load(p + 5)[None, :]
                if D > 2:
                    w12 = tl.load(p + 2)[None, :]
                    z += x2[:, None] * w12
                    a += gv2[:, None] * tl.load(p + 6)[None, :]
                h, dh = _act_and_grad(z, ACT, FAST)
                gz = a * dh  # s_out · dLoss/dz
                # W1ᵀ gz, elementwise over the chunk, reduced over H after the loop
                c0 += gz * w10
                # Σ over the tile's points: in-thread (each thread holds all BLOCK_N points of its units)
                tl.store(q, tl.load(q) + tl.sum(gz * x0[:, None], axis=0))
                tl.store(q + 3, tl.load(q + 3) + tl.sum(gz, axis=0))
                tl.store(q + 4, tl.load(q + 4) + tl.sum(h * gv0[:, None], axis=0))
                if D > 1:
                    c1 += gz * w11
                    tl.store(q + 1, tl.load(q + 1) + tl.sum(gz * x1[:, None], axis=0))
                    tl.store(q + 5, tl.load(q + 5) + tl.sum(h * gv1[:, None], axis=0))
                if D > 2:
                    c2 += gz * w12
                    tl.store(q + 2, tl.load(q + 2) + tl.sum(gz * x2[:, None], axis=0))
                    tl.store(q + 6, tl.load(q + 6) + tl.sum(h * gv2[:, None], axis=0))
                p += BLOCK_H * 8
                q += BLOCK_H * 8
            g0 += back * tl.sum(c0, axis=1)
            if D > 1:
                g1 += back * tl.sum(c1, axis=1)
            if D > 2:
                g2 += back * tl.sum(c2, axis=1)
        _store_rows(gx_ptr, rows, row_ok, g0, g1, g2, D)
        # The next tile reads back the partials stored above, possibly from other threads.
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Kernels, generic path (any D; used for D > 3)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rho(z, ACT: tl.constexpr):
    """ρ(z) for ACT 0 relu, 1 tanh, 2 softplus (torch's threshold-20 form)."""
    if ACT == 0:
        h = tl.maximum(z, 0.0)
    elif ACT == 1:
        # tanh from exp of a non-positive argument: no overflow for any z.
        t = tl.exp(-2.0 * tl.abs(z))
        th = (1.0 - t) / (1.0 + t)
        h = tl.where(z < 0.0, -th, th)
    else:
        # log(1 + e^z) = max(z, 0) + log(1 + e^{-|z|}): no overflow for any z. Above 20,
        # torch.nn.functional.softplus (beta=1, threshold=20) returns z itself, and gradient 1.
        soft = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
        h = tl.where(z > 20.0, z, soft)
    return h


@triton.jit
def _rho_grad(z, h, ACT: tl.constexpr):
    """ρ'(z), given h = ρ(z); the same branch choices as torch's backward of each activation."""
    if ACT == 0:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        d = 1.0 - h * h
    else:
        d = tl.where(z > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-z)))
    return d


@triton.jit
def _load_chunk(w1_ptr, b1_ptr, w2_ptr, h0, H, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """W1[h0:h0+BLOCK_H, :], b1[h0:...], and W2[:, h0:...] transposed, of one layer, zero-padded."""
    hs = h0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    h_ok = hs < H
    wmask = h_ok[:, None] & (cols < D)[None, :]
    w1 = tl.load(w1_ptr + hs[:, None] * D + cols[None, :], mask=wmask, other=0.0)  # (BH, BD): W1[h, d]
    w2t = tl.load(w2_ptr + cols[None, :] * H + hs[:, None], mask=wmask, other=0.0)  # (BH, BD): W2[d, h]
    b1 = tl.load(b1_ptr + hs, mask=h_ok, other=0.0)  # (BH,)
    return w1, b1, w2t


@triton.jit
def _velocity_g(
    x,  # (BLOCK_N, BLOCK_D) registers, zero in padded columns
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # one layer's parameters
    H, D,
    ACT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """v = W2 ρ(W1 x + b1) + b2 for a tile of points, over H in chunks of BLOCK_H."""
    cols = tl.arange(0, BLOCK_D)
    b2 = tl.load(b2_ptr + cols, mask=cols < D, other=0.0)
    v = tl.zeros_like(x) + b2[None, :]
    for h0 in range(0, H, BLOCK_H):
        w1, b1, w2t = _load_chunk(w1_ptr, b1_ptr, w2_ptr, h0, H, D, BLOCK_H, BLOCK_D)
        z = tl.sum(x[:, None, :] * w1[None, :, :], axis=2) + b1[None, :]  # (BN, BH)
        h = _rho(z, ACT)
        # padded hidden units have ρ(0) ≠ 0 for softplus, but their W2 columns are zero.
        v += tl.sum(h[:, :, None] * w2t[None, :, :], axis=1)  # (BN, BD)
    return v




@triton.jit(do_not_specialize=["N"])
def _euler_flow_fwd_generic(
    x_ptr,  # (N, D)
    w1_ptr,  # (L, H, D)
    b1_ptr,  # (L, H)
    w2_ptr,  # (L, D, H)
    b2_ptr,  # (L, D)
    dt_ptr,  # (1,)
    out_ptr,  # (N, D) x at time 1
    states_ptr,  # (L, N, D) states[l] = input of block l
    sq_ptr,  # (num_tiles,) per tile: Σ_l Σ_i |v_l(x_i^l)|²
    N, L, H, D,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    STORE_STATES: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    layer_stride = tl.cast(N, tl.int64) * D

    dt = tl.load(dt_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    sq = tl.zeros([BLOCK_N], dtype=x.dtype)
    for layer in range(L):
        if STORE_STATES:
            tl.store(states_ptr + layer * layer_stride + offs, x, mask=mask)
        v = _velocity_g(
            x, w1_ptr + layer * H * D, b1_ptr + layer * H, w2_ptr + layer * D * H, b2_ptr + layer * D,
            H, D, ACT, BLOCK_H, BLOCK_D,
        )
        v = tl.where(row_ok[:, None], v, 0.0)  # padded rows would add b2-driven velocity to the energy
        sq += tl.sum(v * v, axis=1)
        x = x + dt * v
    tl.store(out_ptr + offs, x, mask=mask)
    tl.store(sq_ptr + pid, tl.sum(sq, axis=0))


@triton.jit(do_not_specialize=["N", "num_tiles"])
def _euler_flow_bwd_generic(
    gout_ptr,  # (N, D) dLoss/dx_final
    gs_ptr,  # (1,) dLoss/dS, S = Σ_l Σ_i |v_l(x_i^l)|² (the kinetic sum)
    states_ptr,  # (L, N, D)
    w1_ptr,  # (L, H, D)
    b1_ptr,  # (L, H)
    w2_ptr,  # (L, D, H)
    b2_ptr,  # (L, D)
    dt_ptr,  # (1,)
    gx_ptr,  # (N, D) dLoss/dx
    part_ptr,  # (P, L·(2HD + H + D)) this program's partial grads: [W1 (L,H,D) | W2 (L,D,H) | b1 (L,H) | b2 (L,D)]
    N, L, H, D, num_tiles,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    layer_stride = tl.cast(N, tl.int64) * D

    # This program's slot of the partial-gradient buffer, and the sections inside it.
    per_layer = 2 * H * D + H + D
    slot = part_ptr + pid.to(tl.int64) * L * per_layer
    gw1_base = slot
    gw2_base = slot + L * H * D
    gb1_base = slot + 2 * L * H * D
    gb2_base = gb1_base + L * H

    dt = tl.load(dt_ptr)
    # dLoss/dv = 2 · dLoss/dS · v.
    e_coef = 2 * tl.load(gs_ptr)

    for tile in range(pid, num_tiles, num_progs):
        rows = tl.cast(tile, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        g = tl.load(gout_ptr + offs, mask=mask, other=0.0)  # dLoss/dx^{l+1}
        for rev in range(L):
            layer = L - 1 - rev
            w1_l = w1_ptr + layer * H * D
            b1_l = b1_ptr + layer * H
            w2_l = w2_ptr + layer * D * H
            x = tl.load(states_ptr + layer * layer_stride + offs, mask=mask, other=0.0)
            v = _velocity_g(x, w1_l, b1_l, w2_l, b2_ptr + layer * D, H, D, ACT, BLOCK_H, BLOCK_D)
            gv = dt * g + e_coef * v
            gv = tl.where(row_ok[:, None], gv, 0.0)  # padded rows contribute to no gradient

            gb2_ptrs = gb2_base + layer * D + cols
            tl.store(gb2_ptrs, tl.load(gb2_ptrs, mask=col_ok, other=0.0) + tl.sum(gv, axis=0), mask=col_ok)

            g_new = g
            for h0 in range(0, H, BLOCK_H):
                w1, b1, w2t = _load_chunk(w1_l, b1_l, w2_l, h0, H, D, BLOCK_H, BLOCK_D)
                hs = h0 + tl.arange(0, BLOCK_H)
                h_ok = hs < H
                wmask = h_ok[:, None] & col_ok[None, :]

                z = tl.sum(x[:, None, :] * w1[None, :, :], axis=2) + b1[None, :]  # (BN, BH)
                h = _rho(z, ACT)
                gz = tl.sum(gv[:, None, :] * w2t[None, :, :], axis=2) * _rho_grad(z, h, ACT)  # (BN, BH)

                # grad_W2[d, h] += Σ_i gv_i[d] h_i[h], held transposed as (BH, BD)
                gw2_ptrs = gw2_base + layer * D * H + cols[None, :] * H + hs[:, None]
                gw2 = tl.sum(h[:, :, None] * gv[:, None, :], axis=0)
                tl.store(gw2_ptrs, tl.load(gw2_ptrs, mask=wmask, other=0.0) + gw2, mask=wmask)
                # grad_W1[h, d] += Σ_i gz_i[h] x_i[d]
                gw1_ptrs = gw1_base + layer * H * D + hs[:, None] * D + cols[None, :]
                gw1 = tl.sum(gz[:, :, None] * x[:, None, :], axis=0)
                tl.store(gw1_ptrs, tl.load(gw1_ptrs, mask=wmask, other=0.0) + gw1, mask=wmask)
                # grad_b1[h] += Σ_i gz_i[h]
                gb1_ptrs = gb1_base + layer * H + hs
                tl.store(gb1_ptrs, tl.load(gb1_ptrs, mask=h_ok, other=0.0) + tl.sum(gz, axis=0), mask=h_ok)

                g_new += tl.sum(gz[:, :, None] * w1[None, :, :], axis=1)  # W1ᵀ gz
            g = g_new
        tl.store(gx_ptr + offs, g, mask=mask)
        # The next tile reads back the partials stored above, possibly from other threads.
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


# Whether the kernels above were built for Triton's CPU interpreter: decided by TRITON_INTERPRET at the
# moment this module was imported (triton.jit reads it then), not by its value now. Triton's own
# library functions (tl.sum, tl.zeros, ...) are decorated when triton is imported: the interpreter can
# only run them if TRITON_INTERPRET=1 was already set then.
_INTERPRETED = isinstance(_euler_flow_fwd_kernel, InterpretedFunction)
_LIBRARY_INTERPRETED = isinstance(tl.standard.sum, InterpretedFunction)


def cpu_unavailable_reason() -> str | None:
    """Why these kernels cannot take CPU tensors in this process, or None when they can (interpreter)."""
    return interpreter_reason("euler_flow", _INTERPRETED, _LIBRARY_INTERPRETED)


def _check_device(t: Tensor) -> None:
    if t.device.type == "cpu":
        reason = cpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"euler_flow (triton) got CPU tensors, but {reason}")


# Fast-path GPU tiles (D <= 3): (BLOCK_N, BLOCK_H, num_warps) per (pass, dtype[, activation]). Both passes use
# BLOCK_H = 8: Triton's default layout then puts 8 lanes along the hidden units and 4 lanes (× warps) along the
# points, every thread holding BLOCK_N / (4 · warps) points. The forward's one reduction over H (after the
# hidden loop) is 3 shuffle rounds; the backward's sums over points (inside it) are in-thread FMAs and 2
# shuffle rounds, with one warp so that they never cross warps (no barrier). BLOCK_H = 32 · warps (every
# thread one hidden unit, no shuffle at all in the loop) was weighed for the backward: its per-layer
# reductions over H cross all the lanes and warps, ~33 instructions per (point, hidden unit) more at H = 500.
# Chosen with `python benchmarks/kernel_report.py --sweep flow_fwd|flow_bwd` (D = 3, sm_90, triton 3.6 and
# 3.9): the fewest SASS instructions per unit (innermost loops + the per-layer work around them) without
# spills, fewer registers when the difference is under ~10%; then checked without spills on sm_80 and
# sm_90 with both tritons by the full report. Not timed: no GPU on the build machine.
_GPU_TILES = {
    ("fwd", torch.float32): (128, 8, 2),  # 16 points per thread, ~146 registers
    ("bwd", torch.float32): (64, 8, 1),  # 16 points per thread, ~220-240 registers
    ("fwd", torch.float64): (32, 8, 1),  # 8 points per thread
    ("bwd", torch.float64): (32, 8, 1),  # 8 points per thread
}
# Where one activation needs another tile: the report found spills (4-16 B, D = 2 on sm_80) with the default
# tiles for tanh (float32) and softplus (float64, libdevice's log1p/exp take more registers).
_GPU_TILES_ACT: dict[tuple[str, torch.dtype, str], tuple[int, int, int]] = {
    ("bwd", torch.float32, "tanh"): (32, 8, 1),
    ("bwd", torch.float64, "softplus"): (16, 8, 1),
}


def _configs(n: int, width: int, dim: int, dtype: torch.dtype, backward: bool,
             activation: str = "relu") -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_H, BLOCK_D, num_warps) for N points, hidden width H and dimension D."""
    block_d = pow2(dim)
    if _INTERPRETED:
        # The interpreter pays ~1 ms per executed op whatever the block size: big blocks, few
        # tiles and H-chunks. (Tests force small blocks to exercise the tile and chunk loops.)
        return min(64, pow2(n)), min(64, pow2(width)), block_d, 1
    if dim > FAST_MAX_D:
        # Generic path: blocks that compile without spills for sm_80 and sm_90 at D = 4 with both tritons (the
        # kernel report; the backward spills a few bytes at 16 x 16 and 4 warps, and at 8 x 8 with 1 warp),
        # capped on the (BLOCK_N, BLOCK_H, BLOCK_D) register block for larger D.
        wide = dtype == torch.float64
        block_n, block_h = (16, 8) if backward else ((32, 16) if wide else (64, 32))
        cap = block_n * block_h * 4
        block_n = min(block_n, pow2(n))
        block_h = min(block_h, pow2(width))
        while block_n * block_h * block_d > cap and block_h > 2:
            block_h //= 2
        while block_n * block_h * block_d > cap and block_n > 2:
            block_n //= 2
        return block_n, block_h, block_d, 2 if backward else 4
    key = ("bwd" if backward else "fwd", dtype)
    block_n, block_h, warps = _GPU_TILES_ACT.get((*key, activation), _GPU_TILES[key])
    while block_n > 4 * warps and block_n // 2 >= n:  # small clouds: fewer idle rows
        block_n //= 2
    warps = max(1, min(warps, block_n // 4))
    return block_n, block_h, block_d, warps


def _pack_weights(weight1: Tensor, bias1: Tensor, weight2: Tensor, activation: str, block_h: int) -> Tensor:
    """(L, Hp, 8) [s_in·w1 (3) | s_in·b1 | s_out·w2 (3) | 0] per hidden unit, Hp = H rounded up to whole chunks."""
    layers, width, dim = weight1.shape
    s_in, s_out = _SCALES[activation]
    wp = weight1.new_zeros((layers, triton.cdiv(width, block_h) * block_h, PACK))
    wp[:, :width, :dim] = weight1 * s_in
    wp[:, :width, 3] = bias1 * s_in
    wp[:, :width, 4:4 + dim] = weight2.transpose(1, 2) * s_out
    return wp


def _check(name: str, t: Tensor, shape: tuple[int, ...], like: Tensor) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} must have dtype {like.dtype} on {like.device}, got {t.dtype} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_inputs(x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, activation: str):
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (N, D) with N >= 1, got {tuple(x.shape)}")
    if weight1.dim() != 3:
        raise ValueError(f"weight1 must have shape (L, H, D), got {tuple(weight1.shape)}")
    layers, width, dim = weight1.shape
    _check("x", x, (x.shape[0], dim), x)
    _check("weight1", weight1, (layers, width, dim), x)
    _check("bias1", bias1, (layers, width), x)
    _check("weight2", weight2, (layers, dim, width), x)
    _check("bias2", bias2, (layers, dim), x)
    return layers, width, dim


def forward(
    x: Tensor,  # (N, D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
    *,
    save_states: bool = True,
    block_n: int | None = None,
    block_h: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # (N, D), (L, N, D) or (0, N, D), ()
    """The fused flow: (x at time 1, states with states[l] = input of block l (empty unless save_states),
    the kinetic sum S = Σ_l Σ_i |v_l(x_i^l)|²): the launcher contract of fastlddmm/ops/flow.

    Contiguous tensors of one dtype (float32 or float64) on a CUDA device, or on the CPU under
    TRITON_INTERPRET=1. block_n / block_h override the tile sizes (powers of two; for tests).
    """
    layers, width, dim = _check_inputs(x, weight1, bias1, weight2, bias2, activation)
    _check_device(x)
    n = x.shape[0]
    states = x.new_empty((layers if save_states else 0, n, dim))
    if layers == 0:
        return x.clone(), states, x.new_zeros(())
    bn, bh, bd, warps = _configs(n, width, dim, x.dtype, backward=False, activation=activation)
    bn, bh = block_n or bn, block_h or bh
    num_tiles = triton.cdiv(n, bn)
    out = torch.empty_like(x)
    sq = x.new_empty((num_tiles,))
    with device_guard(x):
        if dim > FAST_MAX_D:
            dt_t = torch.full((1,), float(dt), dtype=x.dtype, device=x.device)  # see the module docstring
            _euler_flow_fwd_generic[(num_tiles,)](
                x, weight1, bias1, weight2, bias2, dt_t, out, states if save_states else out, sq,
                n, layers, width, dim,
                ACT=_ACT_CODE[activation], BLOCK_N=bn, BLOCK_H=bh, BLOCK_D=bd, STORE_STATES=save_states,
                num_warps=warps,
            )
        else:
            wp = _pack_weights(weight1, bias1, weight2, activation, bh)
            consts = torch.full((1,), float(dt), dtype=x.dtype, device=x.device)
            _euler_flow_fwd_kernel[(num_tiles,)](
                x, wp, bias2, consts, out, states if save_states else out, sq, n, layers, wp.shape[1],
                D=dim, ACT=_ACT_CODE[activation], BLOCK_N=bn, BLOCK_H=bh, STORE_STATES=save_states,
                FAST=not _INTERPRETED, num_warps=warps,
            )
    return out, states, sq.sum()


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def _programs_per_sm(device: torch.device, n_regs: int, shared: int, warps: int) -> int:
    """CTAs of this kernel resident on one SM: limited by registers (allocated per warp in units of 256),
    shared memory, threads and the 32-CTA cap."""
    props = torch.cuda.get_device_properties(device)
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    threads_per_sm = getattr(props, "max_threads_per_multi_processor", 2048)
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = regs_per_sm // (per_warp * warps)
    by_smem = smem_per_sm // shared if shared else 32
    return max(1, min(by_regs, by_smem, threads_per_sm // (32 * warps), 32))


def _num_programs(num_tiles: int, per_slot: int, device: torch.device, compiled=None, warps: int = 4) -> int:
    """The backward's grid: the programs that fit on the GPU at once (so every SM is busy and no slot
    waits for a second wave), capped by the tiles and by the partials' memory budget."""
    if _INTERPRETED or device.type != "cuda":
        # Two programs: enough to exercise the grid-stride loop and the sum over partials.
        return min(num_tiles, 2)
    per_sm = 2
    if compiled is not None:
        try:
            compiled._init_handles()  # loads the module: fills n_regs
            per_sm = _programs_per_sm(device, int(compiled.n_regs), int(compiled.metadata.shared), warps)
        except Exception:  # noqa: BLE001 - only the grid size depends on it: keep the conservative default
            per_sm = 2
    resident = per_sm * _sm_count(device)
    return max(1, min(num_tiles, resident, _PARTIAL_BUDGET // max(per_slot, 1)))


def backward(
    grad_x_final: Tensor | None,  # (N, D) or None (= zero)
    grad_kinetic_sum: Tensor | None,  # () dLoss/dS, S = Σ_l Σ_i |v_l(x_i^l)|², or None (= zero)
    states: Tensor,  # (L, N, D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
    *,
    block_n: int | None = None,
    block_h: int | None = None,
    num_programs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # (N, D), then the parameters' shapes
    """Gradients (x, weight1, bias1, weight2, bias2) of a loss given its gradients wrt (x_final, S).

    Recomputes the hidden activations from states; deterministic for a given device and sizes.
    block_n / block_h / num_programs override the tiling (for tests).
    """
    if states.dim() != 3:
        raise ValueError(f"states must have shape (L, N, D), got {tuple(states.shape)}")
    layers, n, dim = states.shape
    like = states[0] if layers > 0 else states.new_empty((n, dim))
    _, width, _ = _check_inputs(like, weight1, bias1, weight2, bias2, activation)
    _check_device(like)
    if weight1.shape[0] != layers:
        raise ValueError(f"states has {layers} layers but weight1 has {weight1.shape[0]}")
    if grad_x_final is None:
        grad_x_final = like.new_zeros((n, dim))
    _check("grad_x_final", grad_x_final, (n, dim), like)
    if grad_kinetic_sum is None:
        grad_kinetic_sum = like.new_zeros(())
    if grad_kinetic_sum.numel() != 1:
        raise ValueError(f"grad_kinetic_sum must be a scalar tensor, got shape {tuple(grad_kinetic_sum.shape)}")
    gs = grad_kinetic_sum.detach().to(dtype=like.dtype, device=like.device).reshape(1).contiguous()

    if layers == 0:
        return (grad_x_final.clone(), torch.zeros_like(weight1), torch.zeros_like(bias1),
                torch.zeros_like(weight2), torch.zeros_like(bias2))
    bn, bh, bd, warps = _configs(n, width, dim, states.dtype, backward=True, activation=activation)
    bn, bh = block_n or bn, block_h or bh
    num_tiles = triton.cdiv(n, bn)
    with device_guard(like):
        if dim > FAST_MAX_D:
            return _backward_generic(grad_x_final, gs, states, weight1, bias1, weight2, bias2, dt, activation,
                                     bn, bh, bd, warps, num_tiles, num_programs)
        wp = _pack_weights(weight1, bias1, weight2, activation, bh)
        hp = wp.shape[1]
        per_layer = hp * PACK + 4
        s_in, s_out = _SCALES[activation]
        # [dt, 2 dL/dS, 1/(s_in s_out)], built on the device (no host sync on gs)
        consts = torch.cat([torch.full((1,), float(dt), dtype=like.dtype, device=like.device), 2 * gs,
                            torch.full((1,), 1.0 / (s_in * s_out), dtype=like.dtype, device=like.device)])
        grad_x = torch.empty_like(grad_x_final)
        meta = dict(D=dim, ACT=_ACT_CODE[activation], BLOCK_N=bn, BLOCK_H=bh, FAST=not _INTERPRETED, num_warps=warps)
        progs = num_programs
        if progs is None:
            compiled = None
            if not _INTERPRETED and like.device.type == "cuda":
                compiled = _euler_flow_bwd_kernel.warmup(
                    grad_x_final, states, wp, bias2, consts, grad_x, wp, n, layers, hp, num_tiles, grid=(1,), **meta
                )
            progs = _num_programs(num_tiles, layers * per_layer, like.device, compiled, warps)
        progs = max(1, min(progs, num_tiles))
        partials = states.new_zeros((progs, layers, per_layer))
        _euler_flow_bwd_kernel[(progs,)](
            grad_x_final, states, wp, bias2, consts, grad_x, partials, n, layers, hp, num_tiles, **meta
        )
    total = partials.sum(0) if progs > 1 else partials[0]  # (L, Hp·8 + 4)
    units = total[:, : hp * PACK].view(layers, hp, PACK)[:, :width]
    # Undo the packing's scales (module docstring); separate tensors: outputs of a torch.library op must not alias.
    return (
        grad_x,
        (units[:, :, :dim] / s_out).contiguous(),
        (units[:, :, 3] / s_out).contiguous(),
        (units[:, :, 4:4 + dim] * s_out).transpose(1, 2).contiguous(),
        total[:, hp * PACK: hp * PACK + dim].contiguous(),
    )


def _backward_generic(grad_x_final, gs, states, weight1, bias1, weight2, bias2, dt, activation, bn, bh, bd, warps,
                      num_tiles, num_programs):
    layers, n, dim = states.shape
    width = weight1.shape[1]
    per_layer = 2 * width * dim + width + dim
    progs = num_programs or _num_programs(num_tiles, layers * per_layer, states.device)
    progs = max(1, min(progs, num_tiles))
    grad_x = torch.empty_like(grad_x_final)
    partials = states.new_zeros((progs, layers * per_layer))
    dt_t = torch.full((1,), float(dt), dtype=states.dtype, device=states.device)
    _euler_flow_bwd_generic[(progs,)](
        grad_x_final, gs, states, weight1, bias1, weight2, bias2, dt_t, grad_x, partials,
        n, layers, width, dim, num_tiles,
        ACT=_ACT_CODE[activation], BLOCK_N=bn, BLOCK_H=bh, BLOCK_D=bd, num_warps=warps,
    )
    total = partials.sum(0) if progs > 1 else partials[0]
    # Separate tensors (clones of small slices): outputs of a torch.library op must not alias.
    lhd, lh = layers * width * dim, layers * width
    gw1, gw2, gb1, gb2 = total.split([lhd, lhd, lh, layers * dim])
    return (
        grad_x,
        gw1.view(layers, width, dim).clone(),
        gb1.view(layers, width).clone(),
        gw2.view(layers, dim, width).clone(),
        gb2.view(layers, dim).clone(),
    )
