"""Triton kernels of the streaming soft-min of the Sinkhorn loop and of the soft-max weighted sum (the
barycentric projection): forward and backward, then the launchers.

The reduction (ground truth: fastlddmm/ops/softmin/reference.py):

    lse_i = log Σ_j exp(h_j - C(x_i, y_j) · inv_eps),   f_i = -eps · lse_i,
    C(x, y) = |x - y|² / 2 (p = 2)  or  sqrt(max(|x - y|², 1e-8)) (p = 1).

Backward, with P_ij = exp(h_j - C_ij · inv_eps - lse_i) (the soft-max weights, each ≤ 1) and the
incoming gradient go_i = ∂L/∂f_i:

    ∂L/∂x_i = go_i · Σ_j P_ij ∂C_ij/∂x_i            (backward_x: a reduction over j)
    ∂L/∂y_j = -Σ_i go_i P_ij ∂C_ij/∂x_i,
    ∂L/∂h_j = -eps · Σ_i go_i P_ij                   (backward_y: a reduction over i)

with ∂C/∂x = x - y (p = 2) or (x - y) / |x - y| where |x - y|² > 1e-8, else 0 (p = 1, the floor).
The weighted sum T_i = Σ_j P_ij v_j and its gradients (to x through the cost, to v and h):
    ∂L/∂x_i = -inv_eps · Σ_j P_ij (go_i · v_j - c_i) ∂C_ij/∂x_i,  c_i = go_i · T_i,
    ∂L/∂v_j = Σ_i P_ij go_i,   ∂L/∂h_j = Σ_i P_ij (go_i · v_j - c_i)
(the cost side y is not differentiated: the projection detaches it, as GeomLoss does).

Design (judged by the compiled SASS, see benchmarks/kernel_report.py; D = 1, 2, 3 take the fast path,
larger D a generic one):

* Streaming, FlashAttention-style: one program = BLOCK_N rows of x (grid axis 1: batch item), walking y
  in tiles of BLOCK_M; nothing of size N × M is stored, memory O(B·(N + M)). The y-side kernels stream
  the other way (one program = BLOCK_M columns, walking x).

* One 2-D tile per coordinate, oriented so that the reduced axis stays inside a thread. A tensor of
  shape (A, B) gets Triton's default layout: lanes and warps along the last axis B, the first axis A in
  each thread's registers. So the tiles are (BLOCK_M, BLOCK_N) = (reduced j, kept i): the row max, the
  sums over j and the gradient accumulators are in-thread adds with no shuffle and no barrier, and
  each thread reads the y tile with broadcast loads (every lane the same address: one transaction).
  The D coordinates are separate tiles (D is a constexpr), not a padded (…, BLOCK_D) axis whose
  reductions cost shuffles.

* One exp2 per pair, log2(e) folded in: the launcher packs y with h_j·log2(e) as (B, Mp, 4) rows
  [y_0, y_1, y_2, h_j log2 e] (padded to a multiple of BLOCK_M with h = -inf, so the loops need no
  masks: a padded column's weight is an exact 0), and the cost factor -inv_eps·log2(e)/p' arrives as one
  number: s_ij = fma(d²_ij, k, hh_j), then exp2(s_ij - m_i). The online log-sum-exp keeps the running
  max m_i and sum l_i per row; the tile's max over j is in-thread (one FMNMX per pair), and l_i is
  rescaled once per tile and row. Per pair (p = 2, D = 3): 3 FADD + 1 FMUL + 2 FFMA (d²), 1 FFMA (s),
  1 FMNMX, 1 FADD + 1 MUFU.EX2, 1 FADD (sum), plus the y loads shared by a thread's rows.

* Differences, not the |x|² + |y|² - 2 x·y expansion (nor a tensor-core cross term): d² = Σ_d (x_d - y_d)².
  For clouds offset by 1e3 in float32 the expansion cancels ~1e6-sized terms; the differences keep the
  reference's rounding, for p = 1 and 2, float32 and float64. The cost is ~6 of the ~12 instructions per
  pair; the exp unit (MUFU, 16 per clock and SM against 128 FP32 lanes) bounds a pair at the cost of ~8
  issue slots, so a tensor-core x·yᵀ (FlashSinkhorn) could gain at most ~1.4× here, and 3×TF32 to keep
  1e-4 agreement with GeomLoss would eat most of it; see the kernel report.

* Backward kernels recompute C_ij and use the saved lse_i (P_ij ≤ 1 cannot overflow): one pass each.
  The gradients use the same differences x_i - y_j as the cost (never x_i Σ P - Σ P y, which cancels
  for offset clouds).

* Offsets: batch and tile offsets are int64 (N·D and M·D may pass 2^31); every pointer advances by a
  64-bit increment per tile.

* Deterministic: no atomics; every output element is written by exactly one program.

* GPU numerics: tl.exp2 / tl.log2 become ex2.approx / lg2.approx (relative error ~2^-22), sqrt and the
  p = 1 reciprocal are approximate (rsqrt.approx), FMAs contract, and in-thread sums run in a different
  order than torch's: float32 results differ from the interpreter's by a few ulps of the largest term;
  tests/test_triton_gpu.py states its tolerances for that.

* 1/eps and the folded constants arrive as one-element tensors of the input dtype: a Python float
  kernel argument is float32 under the interpreter, which would round float64 runs.

Interpreter (TRITON_INTERPRET=1) notes: see kernels/euler_flow.py. Only tl.exp2 / tl.log2 / tl.sqrt /
tl.math.rsqrt / tl.max / tl.sum are used (no inline assembly, no custom tl.reduce).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from ._common import _load_packed, _load_rows, _store_rows, device_guard, interpreter_reason, pow2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# GeomLoss's floor under the p = 1 square root (fastlddmm.ops.softmin.reference.P1_SQDIST_FLOOR).
P1_FLOOR = 1e-8
# Row stride of the packed y / x arrays (floats): 4 = [3 coordinates, one per-point constant], 8 = the
# weighted sum's [3 coordinates, constant, 3 values, one more constant]. Fast path for D <= 3.
FAST_MAX_D = 3

# ------------------------------------------------------------------------------------------------
# Device functions (fast path: D <= 3, one register tile per coordinate)
# ------------------------------------------------------------------------------------------------


@triton.jit
def _diffs(a0, a1, a2, b0, b1, b2, D: tl.constexpr):
    """a - b per coordinate (tiles) and |a - b|²; a and b already broadcast to the tile's shape."""
    d0 = a0 - b0
    d2 = d0 * d0
    d1 = d0
    dd = d0
    if D > 1:
        d1 = a1 - b1
        d2 += d1 * d1
    if D > 2:
        dd = a2 - b2
        d2 += dd * dd
    return d0, d1, dd, d2


@triton.jit
def _dot_rows(a0, a1, a2, b0, b1, b2, D: tl.constexpr):
    """Σ_d a_d b_d over the D coordinates (broadcast tiles): go_i · v_j of the weighted sum's gradients."""
    r = a0 * b0
    if D > 1:
        r += a1 * b1
    if D > 2:
        r += a2 * b2
    return r


@triton.jit
def _cost(d2, P: tl.constexpr):
    """C_ij without its constant factor (folded into k by the launcher): d² (p = 2), sqrt(max(d², floor)) (p = 1)."""
    if P == 2:
        c = d2
    else:
        c = tl.sqrt(tl.maximum(d2, 1e-8))
    return c


@triton.jit
def _cost_and_scale(d2, P: tl.constexpr):
    """(C_ij as in _cost, s with ∂C/∂x = s · (x - y)): p = 2: (d², 1); p = 1: (|x - y| floored, 1/|x - y|
    above the floor and 0 below), from one reciprocal square root."""
    if P == 2:
        c = d2
        s = tl.full(d2.shape, 1.0, d2.dtype)
    else:
        dm = tl.maximum(d2, 1e-8)
        r = tl.math.rsqrt(dm)
        c = dm * r
        s = tl.where(d2 > 1e-8, r, 0.0)
    return c, s



# ------------------------------------------------------------------------------------------------
# Kernels, fast path (D <= 3). Packed inputs (built by the launchers, padded to whole tiles):
#   yp (B, Mp, 4): [y_0, y_1, y_2, h_j·log2 e]            padded columns: y = 0, h = -inf
#   yv (B, Mp, 8): [y_0, y_1, y_2, h_j·log2 e, v_0, v_1, v_2, 0]
#   xp (B, Np, 8): [x_0, x_1, x_2, lse_i·log2 e, go_i, 0, 0, 0]   padded rows: lse = +inf, go = 0
#   xg (B, Np, 8): [x_0, x_1, x_2, lse_i·log2 e, go_i0, go_i1, go_i2, c_i]
#   k_ptr (2,): [k = -inv_eps·log2(e) / (2 if p = 2 else 1), -inv_eps]
# ------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "MP"])
def _softmin_fwd_kernel(
    x_ptr,  # (B, N, D)
    yp_ptr,  # (B, Mp, 4) packed y and h·log2 e
    k_ptr,  # (2,)
    lse_ptr,  # (B, N) out: log Σ_j exp(h_j - C_ij / eps)
    N, MP,
    D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    yp_ptr += batch * MP * 4
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x0, x1, x2 = _load_rows(x_ptr, rows, row_ok, D)
    k = tl.load(k_ptr)
    offs = tl.arange(0, BLOCK_M) * 4

    # Running max and sum of 2^s in log2 units, one per row (in every thread holding the row).
    m = tl.full([BLOCK_N], float("-inf"), x0.dtype)
    l = tl.zeros([BLOCK_N], x0.dtype)
    for _ in range(0, MP, BLOCK_M):
        y0, y1, y2 = _load_packed(yp_ptr, offs, D)
        hh = tl.load(yp_ptr + offs + 3)
        _, _, _, d2 = _diffs(x0[None, :], x1[None, :], x2[None, :], y0[:, None], y1[:, None], y2[:, None], D)
        s = hh[:, None] + _cost(d2, P) * k  # (BLOCK_M, BLOCK_N): one FFMA for p = 2
        m_new = tl.maximum(m, tl.max(s, axis=0))
        # A row whose weights are all zero so far (h = -inf) keeps m = -inf: shift by 0 then, not by -inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(m - shift) + tl.sum(tl.exp2(s - shift[None, :]), axis=0)
        m = m_new
        yp_ptr += BLOCK_M * 4
    tl.store(lse_ptr + batch * N + rows, (m + tl.log2(l)) * 0.6931471805599453, mask=row_ok)


@triton.jit(do_not_specialize=["N", "MP"])
def _softmin_bwd_x_kernel(
    x_ptr,  # (B, N, D)
    yp_ptr,  # (B, Mp, 4)
    k_ptr,  # (2,)
    lse_ptr,  # (B, N) from the forward pass
    go_ptr,  # (B, N) ∂L/∂f
    gx_ptr,  # (B, N, D) out: ∂L/∂x
    N, MP,
    D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    gx_ptr += batch * N * D
    yp_ptr += batch * MP * 4
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x0, x1, x2 = _load_rows(x_ptr, rows, row_ok, D)
    lse2 = tl.load(lse_ptr + batch * N + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    go = tl.load(go_ptr + batch * N + rows, mask=row_ok, other=0.0)
    k = tl.load(k_ptr)
    offs = tl.arange(0, BLOCK_M) * 4

    a0 = tl.zeros([BLOCK_N], x0.dtype)
    a1 = tl.zeros([BLOCK_N], x0.dtype)
    a2 = tl.zeros([BLOCK_N], x0.dtype)
    for _ in range(0, MP, BLOCK_M):
        y0, y1, y2 = _load_packed(yp_ptr, offs, D)
        hh = tl.load(yp_ptr + offs + 3)
        d0, d1, dd, d2 = _diffs(x0[None, :], x1[None, :], x2[None, :], y0[:, None], y1[:, None], y2[:, None], D)
        c, sc = _cost_and_scale(d2, P)
        w = tl.exp2(hh[:, None] + c * k - lse2[None, :])  # P_ij
        if P == 1:
            w = w * sc
        a0 += tl.sum(w * d0, axis=0)
        if D > 1:
            a1 += tl.sum(w * d1, axis=0)
        if D > 2:
            a2 += tl.sum(w * dd, axis=0)
        yp_ptr += BLOCK_M * 4
    _store_rows(gx_ptr, rows, row_ok, go * a0, go * a1, go * a2, D)


@triton.jit(do_not_specialize=["M", "NP"])
def _softmin_bwd_y_kernel(
    xp_ptr,  # (B, Np, 8) packed x, lse·log2 e, go
    y_ptr,  # (B, M, D)
    h_ptr,  # (B, M)
    k_ptr,  # (2,)
    gy_ptr,  # (B, M, D) out: ∂L/∂y = -Σ_i go_i P_ij ∂C_ij/∂x_i
    gh_ptr,  # (B, M) out: Σ_i go_i P_ij (the launcher multiplies by -eps)
    M, NP,
    D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Transposed streaming: one program = BLOCK_M columns j (across the threads), walking x in tiles of
    # BLOCK_N rows (inside each thread): tiles are (BLOCK_N, BLOCK_M).
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    y_ptr += batch * M * D
    gy_ptr += batch * M * D
    xp_ptr += batch * NP * 8
    cols = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    y0, y1, y2 = _load_rows(y_ptr, cols, col_ok, D)
    hh = tl.load(h_ptr + batch * M + cols, mask=col_ok, other=float("-inf")) * 1.4426950408889634
    k = tl.load(k_ptr)
    offs = tl.arange(0, BLOCK_N) * 8

    ah = tl.zeros([BLOCK_M], y0.dtype)
    a0 = tl.zeros([BLOCK_M], y0.dtype)
    a1 = tl.zeros([BLOCK_M], y0.dtype)
    a2 = tl.zeros([BLOCK_M], y0.dtype)
    for _ in range(0, NP, BLOCK_N):
        x0, x1, x2 = _load_packed(xp_ptr, offs, D)
        lse2 = tl.load(xp_ptr + offs + 3)
        go = tl.load(xp_ptr + offs + 4)
        d0, d1, dd, d2 = _diffs(x0[:, None], x1[:, None], x2[:, None], y0[None, :], y1[None, :], y2[None, :], D)
        c, sc = _cost_and_scale(d2, P)
        w = go[:, None] * tl.exp2(hh[None, :] + c * k - lse2[:, None])  # go_i P_ij
        ah += tl.sum(w, axis=0)
        if P == 1:
            w = w * sc
        a0 -= tl.sum(w * d0, axis=0)
        if D > 1:
            a1 -= tl.sum(w * d1, axis=0)
        if D > 2:
            a2 -= tl.sum(w * dd, axis=0)
        xp_ptr += BLOCK_N * 8
    _store_rows(gy_ptr, cols, col_ok, a0, a1, a2, D)
    tl.store(gh_ptr + batch * M + cols, ah, mask=col_ok)


@triton.jit(do_not_specialize=["N", "MP"])
def _wsum_fwd_kernel(
    x_ptr,  # (B, N, D)
    yv_ptr,  # (B, Mp, 8) packed y, h·log2 e, v
    k_ptr,  # (2,)
    lse_ptr,  # (B, N) from _softmin_fwd_kernel
    out_ptr,  # (B, N, D) out: Σ_j P_ij v_j
    N, MP,
    D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    out_ptr += batch * N * D
    yv_ptr += batch * MP * 8
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x0, x1, x2 = _load_rows(x_ptr, rows, row_ok, D)
    lse2 = tl.load(lse_ptr + batch * N + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    k = tl.load(k_ptr)
    offs = tl.arange(0, BLOCK_M) * 8

    a0 = tl.zeros([BLOCK_N], x0.dtype)
    a1 = tl.zeros([BLOCK_N], x0.dtype)
    a2 = tl.zeros([BLOCK_N], x0.dtype)
    for _ in range(0, MP, BLOCK_M):
        y0, y1, y2 = _load_packed(yv_ptr, offs, D)
        v0, v1, v2 = _load_packed(yv_ptr + 4, offs, D)
        hh = tl.load(yv_ptr + offs + 3)
        _, _, _, d2 = _diffs(x0[None, :], x1[None, :], x2[None, :], y0[:, None], y1[:, None], y2[:, None], D)
        w = tl.exp2(hh[:, None] + _cost(d2, P) * k - lse2[None, :])
        a0 += tl.sum(w * v0[:, None], axis=0)
        if D > 1:
            a1 += tl.sum(w * v1[:, None], axis=0)
        if D > 2:
            a2 += tl.sum(w * v2[:, None], axis=0)
        yv_ptr += BLOCK_M * 8
    _store_rows(out_ptr, rows, row_ok, a0, a1, a2, D)


@triton.jit(do_not_specialize=["N", "MP"])
def _wsum_bwd_x_kernel(
    x_ptr,  # (B, N, D)
    yv_ptr,  # (B, Mp, 8)
    k_ptr,  # (2,)
    lse_ptr,  # (B, N)
    go_ptr,  # (B, N, D) ∂L/∂T
    c_ptr,  # (B, N) go_i · T_i
    gx_ptr,  # (B, N, D) out
    N, MP,
    D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    go_ptr += batch * N * D
    gx_ptr += batch * N * D
    yv_ptr += batch * MP * 8
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x0, x1, x2 = _load_rows(x_ptr, rows, row_ok, D)
    g0, g1, g2 = _load_rows(go_ptr, rows, row_ok, D)
    lse2 = tl.load(lse_ptr + batch * N + rows, mask=row_ok, other=float("inf")) * 1.4426950408889634
    ci = tl.load(c_ptr + batch * N + rows, mask=row_ok, other=0.0)
    k = tl.load(k_ptr)
    neg_inv_eps = tl.load(k_ptr + 1)
    offs = tl.arange(0, BLOCK_M) * 8

    a0 = tl.zeros([BLOCK_N], x0.dtype)
    a1 = tl.zeros([BLOCK_N], x0.dtype)
    a2 = tl.zeros([BLOCK_N], x0.dtype)
    for _ in range(0, MP, BLOCK_M):
        y0, y1, y2 = _load_packed(yv_ptr, offs, D)
        v0, v1, v2 = _load_packed(yv_ptr + 4, offs, D)
        gov = _dot_rows(g0[None, :], g1[None, :], g2[None, :], v0[:, None], v1[:, None], v2[:, None], D) - ci[None, :]
        hh = tl.load(yv_ptr + offs + 3)
        d0, d1, dd, d2 = _diffs(x0[None, :], x1[None, :], x2[None, :], y0[:, None], y1[:, None], y2[:, None], D)
        c, sc = _cost_and_scale(d2, P)
        w = tl.exp2(hh[:, None] + c * k - lse2[None, :]) * gov
        if P == 1:
            w = w * sc
        a0 += tl.sum(w * d0, axis=0)
        if D > 1:
            a1 += tl.sum(w * d1, axis=0)
        if D > 2:
            a2 += tl.sum(w * dd, axis=0)
        yv_ptr += BLOCK_M * 8
    _store_rows(gx_ptr, rows, row_ok, neg_inv_eps * a0, neg_inv_eps * a1, neg_inv_eps * a2, D)


@triton.jit(do_not_specialize=["M", "NP"])
def _wsum_bwd_y_kernel(
    xg_ptr,  # (B, Np, 8) packed x, lse·log2 e, go, c
    y_ptr,  # (B, M, D) cost side
    h_ptr,  # (B, M)
    v_ptr,  # (B, M, D)
    k_ptr,  # (2,)
    gv_ptr,  # (B, M, D) out: ∂L/∂v
    gh_ptr,  # (B, M) out: ∂L/∂h
    M, NP,
    D: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    y_ptr += batch * M * D
    v_ptr += batch * M * D
    gv_ptr += batch * M * D
    xg_ptr += batch * NP * 8
    cols = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    y0, y1, y2 = _load_rows(y_ptr, cols, col_ok, D)
    v0, v1, v2 = _load_rows(v_ptr, cols, col_ok, D)
    hh = tl.load(h_ptr + batch * M + cols, mask=col_ok, other=float("-inf")) * 1.4426950408889634
    k = tl.load(k_ptr)
    offs = tl.arange(0, BLOCK_N) * 8

    ah = tl.zeros([BLOCK_M], y0.dtype)
    a0 = tl.zeros([BLOCK_M], y0.dtype)
    a1 = tl.zeros([BLOCK_M], y0.dtype)
    a2 = tl.zeros([BLOCK_M], y0.dtype)
    for _ in range(0, NP, BLOCK_N):
        x0, x1, x2 = _load_packed(xg_ptr, offs, D)
        g0, g1, g2 = _load_packed(xg_ptr + 4, offs, D)
        gov = _dot_rows(g0[:, None], g1[:, None], g2[:, None], v0[None, :], v1[None, :], v2[None, :], D) - tl.load(
            xg_ptr + offs + 7)[:, None]
        lse2 = tl.load(xg_ptr + offs + 3)
        _, _, _, d2 = _diffs(x0[:, None], x1[:, None], x2[:, None], y0[None, :], y1[None, :], y2[None, :], D)
        w = tl.exp2(hh[None, :] + _cost(d2, P) * k - lse2[:, None])  # P_ij, (BLOCK_N, BLOCK_M)
        ah += tl.sum(w * gov, axis=0)
        a0 += tl.sum(w * g0[:, None], axis=0)
        if D > 1:
            a1 += tl.sum(w * g1[:, None], axis=0)
        if D > 2:
            a2 += tl.sum(w * g2[:, None], axis=0)
        xg_ptr += BLOCK_N * 8
    _store_rows(gv_ptr, cols, col_ok, a0, a1, a2, D)
    tl.store(gh_ptr + batch * M + cols, ah, mask=col_ok)


# ------------------------------------------------------------------------------------------------
# Kernels, generic path (any D, used for D > 3): a (BLOCK_N, BLOCK_M, BLOCK_D) register block with
# BLOCK_D = next power of two >= D (masked), reductions over D by tl.sum. Slower (lanes on D), exact.
# ------------------------------------------------------------------------------------------------


@triton.jit
def _sq_dist(x, y_ptr, cols_j, j_ok, D, cols_d, d_ok):
    """(BLOCK_N, BLOCK_M) squared distances from x (BLOCK_N, BLOCK_D) to the y rows cols_j, and the
    (BLOCK_N, BLOCK_M, BLOCK_D) differences x_i - y_j."""
    y = tl.load(y_ptr + cols_j[:, None] * D + cols_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    diff = x[:, None, :] - y[None, :, :]
    return tl.sum(diff * diff, axis=2), diff


@triton.jit
def _cost_g(d2, P: tl.constexpr):
    # 1e-8: GeomLoss's floor under the p = 1 square root (fastlddmm.reference.sinkhorn.P1_SQDIST_FLOOR).
    if P == 2:
        return d2 * 0.5
    else:
        return tl.sqrt(tl.maximum(d2, 1e-8))


@triton.jit
def _cost_grad_scale(d2, P: tl.constexpr):
    """∂C/∂x = scale · (x - y): 1 for p = 2; 1/|x - y| above the floor, 0 below for p = 1."""
    if P == 2:
        return tl.full(d2.shape, 1.0, d2.dtype)
    else:
        return tl.where(d2 > 1e-8, 1.0 / tl.sqrt(tl.maximum(d2, 1e-8)), 0.0)


@triton.jit(do_not_specialize=["N", "M"])
def _softmin_fwd_generic(
    x_ptr,  # (B, N, D)
    y_ptr,  # (B, M, D)
    h_ptr,  # (B, M)
    inv_eps_ptr,  # (1,)
    lse_ptr,  # (B, N) out: log Σ_j exp(h_j - C_ij / eps)
    N, M, D,
    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    y_ptr += batch * M * D
    h_ptr += batch * M
    lse_ptr += batch * N

    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    inv_eps = tl.load(inv_eps_ptr)

    m_i = tl.full([BLOCK_N], float("-inf"), x.dtype)
    l_i = tl.zeros([BLOCK_N], x.dtype)
    for start in range(0, M, BLOCK_M):
        cols_j = start + tl.arange(0, BLOCK_M)
        j_ok = cols_j < M
        d2, _ = _sq_dist(x, y_ptr, cols_j, j_ok, D, cols_d, d_ok)
        h = tl.load(h_ptr + cols_j, mask=j_ok, other=float("-inf"))
        s = h[None, :] - _cost_g(d2, P) * inv_eps
        s = tl.where(j_ok[None, :], s, float("-inf"))
        # Every tile holds at least one valid column, so m_new is finite and exp(-inf - m_new) = 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["N", "M"])
def _softmin_bwd_x_generic(
    x_ptr,  # (B, N, D)
    y_ptr,  # (B, M, D)
    h_ptr,  # (B, M)
    inv_eps_ptr,  # (1,)
    lse_ptr,  # (B, N) from the forward pass
    go_ptr,  # (B, N) ∂L/∂f
    gx_ptr,  # (B, N, D) out: ∂L/∂x
    N, M, D,
    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    gx_ptr += batch * N * D
    y_ptr += batch * M * D
    h_ptr += batch * M
    lse_ptr += batch * N
    go_ptr += batch * N

    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    mask_x = row_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=mask_x, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    go = tl.load(go_ptr + rows, mask=row_ok, other=0.0)
    inv_eps = tl.load(inv_eps_ptr)

    acc = tl.zeros([BLOCK_N, BLOCK_D], x.dtype)
    for start in range(0, M, BLOCK_M):
        cols_j = start + tl.arange(0, BLOCK_M)
        j_ok = cols_j < M
        d2, diff = _sq_dist(x, y_ptr, cols_j, j_ok, D, cols_d, d_ok)
        h = tl.load(h_ptr + cols_j, mask=j_ok, other=float("-inf"))
        prob = tl.exp(h[None, :] - _cost_g(d2, P) * inv_eps - lse[:, None])
        w = tl.where(j_ok[None, :], prob * _cost_grad_scale(d2, P), 0.0)  # (BLOCK_N, BLOCK_M)
        acc += tl.sum(w[:, :, None] * diff, axis=1)
    tl.store(gx_ptr + rows[:, None] * D + cols_d[None, :], go[:, None] * acc, mask=mask_x)


@triton.jit(do_not_specialize=["N", "M"])
def _softmin_bwd_y_generic(
    x_ptr,  # (B, N, D)
    y_ptr,  # (B, M, D)
    h_ptr,  # (B, M)
    inv_eps_ptr,  # (1,)
    lse_ptr,  # (B, N) from the forward pass
    go_ptr,  # (B, N) ∂L/∂f
    gy_ptr,  # (B, M, D) out: ∂L/∂y = -Σ_i go_i P_ij ∂C_ij/∂x_i
    gh_ptr,  # (B, M) out: Σ_i go_i P_ij (the caller multiplies by -eps)
    N, M, D,
    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Transposed streaming: one program = BLOCK_M columns j, walking x in tiles of BLOCK_N rows.
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    y_ptr += batch * M * D
    gy_ptr += batch * M * D
    h_ptr += batch * M
    gh_ptr += batch * M
    lse_ptr += batch * N
    go_ptr += batch * N

    cols = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    mask_y = col_ok[:, None] & d_ok[None, :]
    y = tl.load(y_ptr + cols[:, None] * D + cols_d[None, :], mask=mask_y, other=0.0)
    h = tl.load(h_ptr + cols, mask=col_ok, other=float("-inf"))
    inv_eps = tl.load(inv_eps_ptr)

    acc_y = tl.zeros([BLOCK_M, BLOCK_D], y.dtype)
    acc_h = tl.zeros([BLOCK_M], y.dtype)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: N·D may pass 2^31
        i_ok = rows < N
        x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + rows, mask=i_ok, other=float("inf"))
        go = tl.load(go_ptr + rows, mask=i_ok, other=0.0)
        diff = x[:, None, :] - y[None, :, :]  # (BLOCK_N, BLOCK_M, BLOCK_D)
        d2 = tl.sum(diff * diff, axis=2)
        prob = tl.exp(h[None, :] - _cost_g(d2, P) * inv_eps - lse[:, None])
        w = tl.where(i_ok[:, None], go[:, None] * prob, 0.0)  # (BLOCK_N, BLOCK_M)
        acc_h += tl.sum(w, axis=0)
        acc_y -= tl.sum((w * _cost_grad_scale(d2, P))[:, :, None] * diff, axis=0)
    tl.store(gy_ptr + cols[:, None] * D + cols_d[None, :], acc_y, mask=mask_y)
    tl.store(gh_ptr + cols, acc_h, mask=col_ok)


# ------------------------------------------------------------------------------------------------
# Soft-max weighted sum (the barycentric projection): T_i = Σ_j P_ij v_j, given lse from the forward
# kernel. Gradients, with c_i = go_i · T_i and go_i = ∂L/∂T_i (D-vectors):
#   ∂L/∂x_i = -inv_eps · Σ_j P_ij (go_i · v_j - c_i) ∂C_ij/∂x_i,
#   ∂L/∂v_j = Σ_i P_ij go_i,   ∂L/∂h_j = Σ_i P_ij (go_i · v_j - c_i).
# (The cost side y is not differentiated: the projection detaches it, as GeomLoss does.)
# ------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N", "M"])
def _wsum_fwd_generic(
    x_ptr,  # (B, N, D)
    y_ptr,  # (B, M, D) cost side
    h_ptr,  # (B, M)
    v_ptr,  # (B, M, D) values
    inv_eps_ptr,  # (1,)
    lse_ptr,  # (B, N) from _softmin_fwd_generic
    out_ptr,  # (B, N, D) out: Σ_j P_ij v_j
    N, M, D,
    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    out_ptr += batch * N * D
    y_ptr += batch * M * D
    v_ptr += batch * M * D
    h_ptr += batch * M
    lse_ptr += batch * N

    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    mask_x = row_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=mask_x, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    inv_eps = tl.load(inv_eps_ptr)

    acc = tl.zeros([BLOCK_N, BLOCK_D], x.dtype)
    for start in range(0, M, BLOCK_M):
        cols_j = start + tl.arange(0, BLOCK_M)
        j_ok = cols_j < M
        d2, _ = _sq_dist(x, y_ptr, cols_j, j_ok, D, cols_d, d_ok)
        h = tl.load(h_ptr + cols_j, mask=j_ok, other=float("-inf"))
        prob = tl.exp(h[None, :] - _cost_g(d2, P) * inv_eps - lse[:, None])  # (BLOCK_N, BLOCK_M)
        v = tl.load(v_ptr + cols_j[:, None] * D + cols_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(prob[:, :, None] * v[None, :, :], axis=1)
    tl.store(out_ptr + rows[:, None] * D + cols_d[None, :], acc, mask=mask_x)


@triton.jit(do_not_specialize=["N", "M"])
def _wsum_bwd_x_generic(
    x_ptr,  # (B, N, D)
    y_ptr,  # (B, M, D) cost side
    h_ptr,  # (B, M)
    v_ptr,  # (B, M, D)
    inv_eps_ptr,  # (1,)
    lse_ptr,  # (B, N)
    go_ptr,  # (B, N, D) ∂L/∂T
    c_ptr,  # (B, N) go_i · T_i
    gx_ptr,  # (B, N, D) out
    N, M, D,
    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    go_ptr += batch * N * D
    gx_ptr += batch * N * D
    y_ptr += batch * M * D
    v_ptr += batch * M * D
    h_ptr += batch * M
    lse_ptr += batch * N
    c_ptr += batch * N

    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    mask_x = row_ok[:, None] & d_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=mask_x, other=0.0)
    go = tl.load(go_ptr + rows[:, None] * D + cols_d[None, :], mask=mask_x, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf"))
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    inv_eps = tl.load(inv_eps_ptr)

    acc = tl.zeros([BLOCK_N, BLOCK_D], x.dtype)
    for start in range(0, M, BLOCK_M):
        cols_j = start + tl.arange(0, BLOCK_M)
        j_ok = cols_j < M
        d2, diff = _sq_dist(x, y_ptr, cols_j, j_ok, D, cols_d, d_ok)
        h = tl.load(h_ptr + cols_j, mask=j_ok, other=float("-inf"))
        prob = tl.exp(h[None, :] - _cost_g(d2, P) * inv_eps - lse[:, None])
        v = tl.load(v_ptr + cols_j[:, None] * D + cols_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        gov = tl.sum(go[:, None, :] * v[None, :, :], axis=2)  # (BLOCK_N, BLOCK_M)
        w = prob * (gov - c[:, None]) * _cost_grad_scale(d2, P)
        acc += tl.sum(w[:, :, None] * diff, axis=1)
    tl.store(gx_ptr + rows[:, None] * D + cols_d[None, :], -inv_eps * acc, mask=mask_x)


@triton.jit(do_not_specialize=["N", "M"])
def _wsum_bwd_y_generic(
    x_ptr,  # (B, N, D)
    y_ptr,  # (B, M, D) cost side
    h_ptr,  # (B, M)
    v_ptr,  # (B, M, D)
    inv_eps_ptr,  # (1,)
    lse_ptr,  # (B, N)
    go_ptr,  # (B, N, D)
    c_ptr,  # (B, N)
    gv_ptr,  # (B, M, D) out: ∂L/∂v
    gh_ptr,  # (B, M) out: ∂L/∂h
    N, M, D,
    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    go_ptr += batch * N * D
    y_ptr += batch * M * D
    v_ptr += batch * M * D
    gv_ptr += batch * M * D
    h_ptr += batch * M
    gh_ptr += batch * M
    lse_ptr += batch * N
    c_ptr += batch * N

    cols = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    mask_y = col_ok[:, None] & d_ok[None, :]
    y = tl.load(y_ptr + cols[:, None] * D + cols_d[None, :], mask=mask_y, other=0.0)
    v = tl.load(v_ptr + cols[:, None] * D + cols_d[None, :], mask=mask_y, other=0.0)
    h = tl.load(h_ptr + cols, mask=col_ok, other=float("-inf"))
    inv_eps = tl.load(inv_eps_ptr)

    acc_v = tl.zeros([BLOCK_M, BLOCK_D], y.dtype)
    acc_h = tl.zeros([BLOCK_M], y.dtype)
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N).to(tl.int64)  # int64: N·D may pass 2^31
        i_ok = rows < N
        mask_x = i_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=mask_x, other=0.0)
        go = tl.load(go_ptr + rows[:, None] * D + cols_d[None, :], mask=mask_x, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=i_ok, other=float("inf"))
        c = tl.load(c_ptr + rows, mask=i_ok, other=0.0)
        diff = x[:, None, :] - y[None, :, :]
        d2 = tl.sum(diff * diff, axis=2)
        prob = tl.exp(h[None, :] - _cost_g(d2, P) * inv_eps - lse[:, None])  # (BLOCK_N, BLOCK_M)
        gov = tl.sum(go[:, None, :] * v[None, :, :], axis=2)
        acc_h += tl.sum(prob * (gov - c[:, None]), axis=0)
        acc_v += tl.sum(prob[:, :, None] * go[:, None, :], axis=0)
    tl.store(gv_ptr + cols[:, None] * D + cols_d[None, :], acc_v, mask=mask_y)
    tl.store(gh_ptr + cols, acc_h, mask=col_ok)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------

_INTERPRETED = isinstance(_softmin_fwd_kernel, InterpretedFunction)
_LIBRARY_INTERPRETED = isinstance(tl.standard.sum, InterpretedFunction)


def cpu_unavailable_reason() -> str | None:
    """Why these kernels cannot take CPU tensors in this process, or None when they can (interpreter)."""
    return interpreter_reason("soft-min", _INTERPRETED, _LIBRARY_INTERPRETED)


def _check_device(t: Tensor, op: str) -> None:
    if t.device.type == "cpu":
        reason = cpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{op} (triton) got CPU tensors, but {reason}")


# Fast-path GPU tiles (BLOCK_N, BLOCK_M, num_warps) per kernel and dtype (D <= 3). The kernel axis that
# spreads over the threads (x rows for "fwd", "bwd_x", "wsum_*x", "nearest"; y columns for the "*_y"
# kernels) must be >= 32 · num_warps, the other one lies in each thread's registers. Chosen with
# `python benchmarks/kernel_report.py --sweep KERNEL` (D = 3, float32, sm_90, triton 3.6 and 3.9): 4 x rows
# per thread and 16 y points is within ~5% of the fewest SASS instructions per pair at about half the
# registers (8 rows: ~250 registers); then every tile here compiles without spills for sm_80 and sm_90
# with both tritons in the full report. Not timed: no GPU on the build machine.
_GPU_TILES = {
    ("fwd", torch.float32): (256, 16, 2),
    ("bwd_x", torch.float32): (256, 16, 2),
    ("bwd_y", torch.float32): (16, 256, 2),
    ("wsum_fwd", torch.float32): (256, 16, 2),
    ("wsum_bwd_x", torch.float32): (128, 16, 2),  # (256, 16) spills 96 B at p = 1 on sm_80 (triton 3.9)
    ("wsum_bwd_y", torch.float32): (16, 256, 2),
    ("nearest", torch.float32): (256, 16, 2),
    # float64: fewer pairs per thread (twice the registers per value); the backward kernels spill with the
    # float32 tiles (p = 1 most: its rsqrt and floor keep more values alive).
    ("fwd", torch.float64): (128, 16, 2),
    ("bwd_x", torch.float64): (128, 8, 2),
    ("bwd_y", torch.float64): (4, 128, 2),
    ("wsum_fwd", torch.float64): (128, 8, 2),
    ("wsum_bwd_x", torch.float64): (128, 4, 2),
    ("wsum_bwd_y", torch.float64): (8, 128, 2),
    ("nearest", torch.float64): (128, 16, 2),
}
# Which tile axis spreads over the threads: "n" (x rows) or "m" (y columns).
_THREAD_AXIS = {"bwd_y": "m", "wsum_bwd_y": "m"}

# Generic path (D > 3): the (BLOCK_N, BLOCK_M, BLOCK_D) register block of the former kernels, 4 warps,
# capped at BLOCK_N · BLOCK_M · 4 elements.
_GENERIC_TILES = {torch.float32: (32, 32), torch.float64: (16, 16)}


def configs(kernel: str, n: int, m: int, dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps) for ``kernel`` (a key of _GPU_TILES: "fwd", "nearest", ...) over
    n points of x and m points of y in dimension dim. BLOCK_D is only used by the generic path (dim > 3)."""
    block_d = pow2(dim)
    if _INTERPRETED:
        # ~1 ms per executed op whatever the block size: big blocks, few tiles.
        return min(64, pow2(n)), min(64, pow2(m)), block_d, 1
    if dim > FAST_MAX_D:
        block_n, block_m = _GENERIC_TILES[dtype]
        cap = block_n * block_m * 4
        block_n, block_m = min(block_n, pow2(n)), min(block_m, pow2(m))
        while block_n * block_m * block_d > cap and block_m > 2:
            block_m //= 2
        while block_n * block_m * block_d > cap and block_n > 2:
            block_n //= 2
        return block_n, block_m, block_d, 4
    block_n, block_m, warps = _GPU_TILES[(kernel, dtype)]
    # Small problems: shrink the threads' axis (fewer warps) rather than launch idle lanes.
    if _THREAD_AXIS.get(kernel, "n") == "n":
        while block_n > 32 and block_n // 2 >= n:
            block_n //= 2
        warps = max(1, min(warps, block_n // 32))
    else:
        while block_m > 32 and block_m // 2 >= m:
            block_m //= 2
        warps = max(1, min(warps, block_m // 32))
    return block_n, block_m, block_d, warps


def _check_inputs(x: Tensor, y: Tensor, h: Tensor, p: int) -> None:
    if p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x and y must have shapes (B, N, D) and (B, M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if tuple(h.shape) != tuple(y.shape[:2]):
        raise ValueError(f"h must have shape {tuple(y.shape[:2])}, got {tuple(h.shape)}")
    for name, t in (("y", y), ("h", h)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must have x's dtype {x.dtype} and device {x.device}, got {t.dtype} on {t.device}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    _check_device(x, "softmin")


def _consts(eps: float, p: int, like: Tensor) -> Tensor:
    """(2,) [k, -1/eps] with k = -log2(e) / (p' eps), p' = 2 for p = 2 (C = d²/2) and 1 for p = 1."""
    inv_eps = 1.0 / eps
    return torch.tensor([-inv_eps * LOG2E / (2.0 if p == 2 else 1.0), -inv_eps], dtype=like.dtype, device=like.device)


def _padded(n: int, block: int) -> int:
    return triton.cdiv(n, block) * block


def _pack(
    points: Tensor,  # (B, K, D), D <= 3
    cols: list[tuple[int, Tensor]],  # (column, (B, K) or (B, K, D) values) placed after the coordinates
    width: int,
    block: int,
    pad: list[tuple[int, float]],  # (column, value) in the padded rows (default 0)
) -> Tensor:  # (B, Kp, width), Kp = K rounded up to whole blocks
    """The kernels' packed operand: coordinates in columns 0..D-1, per-point constants after, whole tiles."""
    batch, k, dim = points.shape
    out = points.new_zeros((batch, _padded(max(k, 1), block), width))
    out[:, :k, :dim] = points
    for col, val in cols:
        if val.dim() == 3:
            out[:, :k, col:col + val.shape[2]] = val
        else:
            out[:, :k, col] = val
    for col, val in pad:
        out[:, k:, col] = val
    return out


def forward(
    x: Tensor,  # (B, N, D) contiguous
    y: Tensor,  # (B, M, D) contiguous
    h: Tensor,  # (B, M) contiguous
    eps: float,
    p: int,
    *,
    block_n: int | None = None,
    block_m: int | None = None,
) -> Tensor:  # (B, N) lse_i = log Σ_j exp(h_j - C(x_i, y_j) / eps)
    """Streaming log-sum-exp over y; f = -eps · lse is the soft-min. block_* override tile sizes (tests)."""
    _check_inputs(x, y, h, p)
    batch, n, dim = x.shape
    m = y.shape[1]
    lse = x.new_empty((batch, n))
    if batch == 0 or n == 0:
        return lse
    if m == 0:
        return lse.fill_(float("-inf"))
    bn, bm, bd, warps = configs("fwd", n, m, dim, x.dtype)
    bn, bm = block_n or bn, block_m or bm
    with device_guard(x):
        if dim > FAST_MAX_D:
            inv_eps = torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)
            _softmin_fwd_generic[(triton.cdiv(n, bn), batch)](
                x, y, h, inv_eps, lse, n, m, dim, P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps
            )
            return lse
        yp = _pack(y, [(3, h * LOG2E)], 4, bm, [(3, float("-inf"))])
        _softmin_fwd_kernel[(triton.cdiv(n, bn), batch)](
            x, yp, _consts(eps, p, x), lse, n, yp.shape[1], D=dim, P=p, BLOCK_N=bn, BLOCK_M=bm, num_warps=warps
        )
    return lse


def backward_x(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    h: Tensor,  # (B, M)
    lse: Tensor,  # (B, N) from forward
    grad_f: Tensor,  # (B, N) ∂L/∂f, f = -eps · lse
    eps: float,
    p: int,
    *,
    block_n: int | None = None,
    block_m: int | None = None,
) -> Tensor:  # (B, N, D) ∂L/∂x
    """∂L/∂x_i = grad_f_i · Σ_j P_ij ∂C(x_i, y_j)/∂x_i, streamed over y."""
    _check_inputs(x, y, h, p)
    batch, n, dim = x.shape
    m = y.shape[1]
    gx = torch.zeros_like(x)
    if batch == 0 or n == 0 or m == 0:
        return gx
    bn, bm, bd, warps = configs("bwd_x", n, m, dim, x.dtype)
    bn, bm = block_n or bn, block_m or bm
    with device_guard(x):
        if dim > FAST_MAX_D:
            inv_eps = torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)
            _softmin_bwd_x_generic[(triton.cdiv(n, bn), batch)](
                x, y, h, inv_eps, lse, grad_f, gx, n, m, dim, P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd,
                num_warps=warps,
            )
            return gx
        yp = _pack(y, [(3, h * LOG2E)], 4, bm, [(3, float("-inf"))])
        _softmin_bwd_x_kernel[(triton.cdiv(n, bn), batch)](
            x, yp, _consts(eps, p, x), lse, grad_f, gx, n, yp.shape[1], D=dim, P=p, BLOCK_N=bn, BLOCK_M=bm,
            num_warps=warps,
        )
    return gx


def backward_y(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    h: Tensor,  # (B, M)
    lse: Tensor,  # (B, N) from forward
    grad_f: Tensor,  # (B, N) ∂L/∂f
    eps: float,
    p: int,
    *,
    block_n: int | None = None,
    block_m: int | None = None,
) -> tuple[Tensor, Tensor]:  # (B, M, D) ∂L/∂y, (B, M) ∂L/∂h
    """The gradients to the reduced-over side, streamed over x (columns are the program axis)."""
    _check_inputs(x, y, h, p)
    batch, n, dim = x.shape
    m = y.shape[1]
    gy, gh = torch.zeros_like(y), torch.zeros_like(h)
    if batch == 0 or n == 0 or m == 0:
        return gy, gh
    bn, bm, bd, warps = configs("bwd_y", n, m, dim, x.dtype)  # program axis: columns
    bn, bm = block_n or bn, block_m or bm
    with device_guard(x):
        if dim > FAST_MAX_D:
            inv_eps = torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)
            _softmin_bwd_y_generic[(triton.cdiv(m, bm), batch)](
                x, y, h, inv_eps, lse, grad_f, gy, gh, n, m, dim, P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd,
                num_warps=warps,
            )
        else:
            xp = _pack(x, [(3, lse * LOG2E), (4, grad_f)], 8, bn, [(3, float("inf"))])
            _softmin_bwd_y_kernel[(triton.cdiv(m, bm), batch)](
                xp, y, h, _consts(eps, p, x), gy, gh, m, xp.shape[1], D=dim, P=p, BLOCK_N=bn, BLOCK_M=bm,
                num_warps=warps,
            )
    return gy, gh * (-eps)


def _wsum_setup(kernel, x, y, h, v, lse, eps, p, block_n, block_m):
    _check_inputs(x, y, h, p)
    if tuple(v.shape) != tuple(y.shape) or v.dtype != x.dtype or v.device != x.device:
        raise ValueError(f"v must have y's shape {tuple(y.shape)}, dtype and device, got {tuple(v.shape)}, {v.dtype}")
    batch, n, dim = x.shape
    bn, bm, bd, warps = configs(kernel, n, y.shape[1], dim, x.dtype)
    return block_n or bn, block_m or bm, bd, warps


def _pack_yv(y: Tensor, h: Tensor, v: Tensor, block_m: int) -> Tensor:  # (B, Mp, 8)
    return _pack(y, [(3, h * LOG2E), (4, v)], 8, block_m, [(3, float("-inf"))])


def weighted_sum(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D) cost side
    h: Tensor,  # (B, M)
    v: Tensor,  # (B, M, D) values
    lse: Tensor,  # (B, N) from forward(x, y, h, eps, p)
    eps: float,
    p: int,
    *,
    block_n: int | None = None,
    block_m: int | None = None,
) -> Tensor:  # (B, N, D)
    """T_i = Σ_j P_ij v_j with P_ij = exp(h_j - C(x_i, y_j) / eps - lse_i), streamed over y."""
    batch, n, dim = x.shape
    out = torch.zeros_like(x)
    if batch == 0 or n == 0 or y.shape[1] == 0:
        return out
    bn, bm, bd, warps = _wsum_setup("wsum_fwd", x, y, h, v, lse, eps, p, block_n, block_m)
    with device_guard(x):
        if dim > FAST_MAX_D:
            inv_eps = torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)
            _wsum_fwd_generic[(triton.cdiv(n, bn), batch)](
                x, y, h, v, inv_eps, lse, out, n, y.shape[1], dim, P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd,
                num_warps=warps,
            )
            return out
        yv = _pack_yv(y, h, v, bm)
        _wsum_fwd_kernel[(triton.cdiv(n, bn), batch)](
            x, yv, _consts(eps, p, x), lse, out, n, yv.shape[1], D=dim, P=p, BLOCK_N=bn, BLOCK_M=bm,
            num_warps=warps,
        )
    return out


def weighted_sum_backward(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D) cost side
    h: Tensor,  # (B, M)
    v: Tensor,  # (B, M, D)
    lse: Tensor,  # (B, N)
    out: Tensor,  # (B, N, D) T from weighted_sum
    grad_out: Tensor,  # (B, N, D) ∂L/∂T
    eps: float,
    p: int,
    *,
    need_x: bool = True,
    need_vh: bool = True,
    block_n: int | None = None,
    block_m: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # ∂L/∂x (B, N, D), ∂L/∂v (B, M, D), ∂L/∂h (B, M)
    """Gradients of weighted_sum to x (through the cost), v and h; two streaming kernels."""
    batch, n, dim = x.shape
    m = y.shape[1]
    c = (grad_out * out).sum(-1).contiguous()  # (B, N)
    gx = torch.zeros_like(x) if need_x else None
    gv, gh = (torch.zeros_like(v), torch.zeros_like(h)) if need_vh else (None, None)
    if batch == 0 or n == 0 or m == 0:
        return gx, gv, gh
    consts = _consts(eps, p, x) if dim <= FAST_MAX_D else torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)
    with device_guard(x):
        if need_x:
            bn, bm, bd, warps = _wsum_setup("wsum_bwd_x", x, y, h, v, lse, eps, p, block_n, block_m)
            if dim > FAST_MAX_D:
                _wsum_bwd_x_generic[(triton.cdiv(n, bn), batch)](
                    x, y, h, v, consts, lse, grad_out, c, gx, n, m, dim,
                    P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps,
                )
            else:
                yv = _pack_yv(y, h, v, bm)
                _wsum_bwd_x_kernel[(triton.cdiv(n, bn), batch)](
                    x, yv, consts, lse, grad_out, c, gx, n, yv.shape[1], D=dim, P=p, BLOCK_N=bn, BLOCK_M=bm,
                    num_warps=warps,
                )
        if need_vh:
            bn, bm, bd, warps = _wsum_setup("wsum_bwd_y", x, y, h, v, lse, eps, p, block_n, block_m)
            if dim > FAST_MAX_D:
                _wsum_bwd_y_generic[(triton.cdiv(m, bm), batch)](
                    x, y, h, v, consts, lse, grad_out, c, gv, gh, n, m, dim,
                    P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps,
                )
            else:
                xg = _pack(x, [(3, lse * LOG2E), (4, grad_out), (7, c)], 8, bn, [(3, float("inf"))])
                _wsum_bwd_y_kernel[(triton.cdiv(m, bm), batch)](
                    xg, y, h, v, consts, gv, gh, m, xg.shape[1], D=dim, P=p, BLOCK_N=bn, BLOCK_M=bm,
                    num_warps=warps,
                )
    return gx, gv, gh
