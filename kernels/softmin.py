"""Triton kernels of the streaming soft-min of the Sinkhorn loop: forward and backward, then the launchers.

The reduction (see fastlddmm/reference/sinkhorn.py, ``softmin_dense``, the ground truth):

    lse_i = log Σ_j exp(h_j - C(x_i, y_j) · inv_eps),   f_i = -eps · lse_i,
    C(x, y) = |x - y|² / 2 (p = 2)  or  sqrt(max(|x - y|², 1e-8)) (p = 1).

Backward, with P_ij = exp(h_j - C_ij · inv_eps - lse_i) (the soft-max weights, each ≤ 1) and the
incoming gradient go_i = ∂L/∂f_i:

    ∂L/∂x_i = go_i · Σ_j P_ij ∂C_ij/∂x_i            (_softmin_bwd_x_kernel: a reduction over j)
    ∂L/∂y_j = -Σ_i go_i P_ij ∂C_ij/∂x_i,
    ∂L/∂h_j = -eps · Σ_i go_i P_ij                   (_softmin_bwd_y_kernel: a reduction over i)

with ∂C/∂x = x - y (p = 2) or (x - y) / |x - y| where |x - y|² > 1e-8, else 0 (p = 1, the floor).
The soft-max weighted sum T_i = Σ_j P_ij v_j (the barycentric projection) and its two backward
kernels follow the same pattern (formulas above _wsum_fwd_kernel).

Design choices (and why):

* FlashAttention-style streaming: one program = one tile of BLOCK_N rows of x (and one batch item,
  grid axis 1) in registers; it walks y in tiles of BLOCK_M and keeps a running max m_i and a
  running sum l_i = Σ exp(s_ij - m_i) (rescaled when m_i grows). Nothing of size N × M is ever
  stored: memory is O(B·(N + M)). The backward kernels recompute C_ij and use the saved lse_i, so
  they are one pass each, with no running max needed (P_ij ≤ 1 cannot overflow).

* Differences, not the |x|² + |y|² - 2 x·y expansion: d2 = Σ_d (x_id - y_jd)² over a
  (BLOCK_N, BLOCK_M, BLOCK_D) register block (BLOCK_D = next power of two ≥ D, masked). For clouds
  offset by 1e3 in float32, the expansion cancels ~1e6-sized terms down to O(1) distances and loses
  every digit; differences keep the reference's rounding. It also keeps float64 exact (no tl.dot,
  whose float32 default is TF32 and whose float64 support varies). D is 2 or 3 in practice, so the
  tensor cores would waste most of a 16-deep contraction anyway; a tl.dot cross term is left for
  when it can be measured on a GPU.

* 1/eps arrives as a one-element tensor of the input dtype: a Python float kernel argument is
  float32 under the interpreter, which would round float64 runs.

* Padding: masked columns load h = -inf and masked rows lse = +inf, so their P_ij is an exact 0
  (no overflow of exp in padded lanes, no inf · 0 = NaN).

* Deterministic: no atomics; every output element is written by exactly one program.

Interpreter (TRITON_INTERPRET=1) notes: see kernels/euler_flow.py. Only tl.exp / tl.log / tl.sqrt /
tl.max / tl.sum are used (no libdevice, no custom tl.reduce), and the interpreter gets big blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

@triton.jit
def _sq_dist(x, y_ptr, cols_j, j_ok, D, cols_d, d_ok):
    """(BLOCK_N, BLOCK_M) squared distances from x (BLOCK_N, BLOCK_D) to the y rows cols_j, and the
    (BLOCK_N, BLOCK_M, BLOCK_D) differences x_i - y_j."""
    y = tl.load(y_ptr + cols_j[:, None] * D + cols_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
    diff = x[:, None, :] - y[None, :, :]
    return tl.sum(diff * diff, axis=2), diff


@triton.jit
def _cost(d2, P: tl.constexpr):
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
def _softmin_fwd_kernel(
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
        s = h[None, :] - _cost(d2, P) * inv_eps
        s = tl.where(j_ok[None, :], s, float("-inf"))
        # Every tile holds at least one valid column, so m_new is finite and exp(-inf - m_new) = 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["N", "M"])
def _softmin_bwd_x_kernel(
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
        prob = tl.exp(h[None, :] - _cost(d2, P) * inv_eps - lse[:, None])
        w = tl.where(j_ok[None, :], prob * _cost_grad_scale(d2, P), 0.0)  # (BLOCK_N, BLOCK_M)
        acc += tl.sum(w[:, :, None] * diff, axis=1)
    tl.store(gx_ptr + rows[:, None] * D + cols_d[None, :], go[:, None] * acc, mask=mask_x)


@triton.jit(do_not_specialize=["N", "M"])
def _softmin_bwd_y_kernel(
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
        rows = start + tl.arange(0, BLOCK_N)
        i_ok = rows < N
        x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + rows, mask=i_ok, other=float("inf"))
        go = tl.load(go_ptr + rows, mask=i_ok, other=0.0)
        diff = x[:, None, :] - y[None, :, :]  # (BLOCK_N, BLOCK_M, BLOCK_D)
        d2 = tl.sum(diff * diff, axis=2)
        prob = tl.exp(h[None, :] - _cost(d2, P) * inv_eps - lse[:, None])
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
def _wsum_fwd_kernel(
    x_ptr,  # (B, N, D)
    y_ptr,  # (B, M, D) cost side
    h_ptr,  # (B, M)
    v_ptr,  # (B, M, D) values
    inv_eps_ptr,  # (1,)
    lse_ptr,  # (B, N) from _softmin_fwd_kernel
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
        prob = tl.exp(h[None, :] - _cost(d2, P) * inv_eps - lse[:, None])  # (BLOCK_N, BLOCK_M)
        v = tl.load(v_ptr + cols_j[:, None] * D + cols_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(prob[:, :, None] * v[None, :, :], axis=1)
    tl.store(out_ptr + rows[:, None] * D + cols_d[None, :], acc, mask=mask_x)


@triton.jit(do_not_specialize=["N", "M"])
def _wsum_bwd_x_kernel(
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
        prob = tl.exp(h[None, :] - _cost(d2, P) * inv_eps - lse[:, None])
        v = tl.load(v_ptr + cols_j[:, None] * D + cols_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        gov = tl.sum(go[:, None, :] * v[None, :, :], axis=2)  # (BLOCK_N, BLOCK_M)
        w = prob * (gov - c[:, None]) * _cost_grad_scale(d2, P)
        acc += tl.sum(w[:, :, None] * diff, axis=1)
    tl.store(gx_ptr + rows[:, None] * D + cols_d[None, :], -inv_eps * acc, mask=mask_x)


@triton.jit(do_not_specialize=["N", "M"])
def _wsum_bwd_y_kernel(
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
        rows = start + tl.arange(0, BLOCK_N)
        i_ok = rows < N
        mask_x = i_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=mask_x, other=0.0)
        go = tl.load(go_ptr + rows[:, None] * D + cols_d[None, :], mask=mask_x, other=0.0)
        lse = tl.load(lse_ptr + rows, mask=i_ok, other=float("inf"))
        c = tl.load(c_ptr + rows, mask=i_ok, other=0.0)
        diff = x[:, None, :] - y[None, :, :]
        d2 = tl.sum(diff * diff, axis=2)
        prob = tl.exp(h[None, :] - _cost(d2, P) * inv_eps - lse[:, None])  # (BLOCK_N, BLOCK_M)
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
    if _INTERPRETED and _LIBRARY_INTERPRETED:
        return None
    if not _INTERPRETED:
        return (
            "the Triton soft-min kernels were compiled for the GPU: move the tensors to a CUDA device, or set "
            "TRITON_INTERPRET=1 in the environment before Python starts (Triton's slow CPU interpreter)"
        )
    return (
        "TRITON_INTERPRET=1 was set after triton was imported, so triton's own library functions were built "
        "for the GPU: set TRITON_INTERPRET=1 in the environment before Python starts"
    )


def _check_device(t: Tensor, op: str) -> None:
    if t.device.type == "cpu":
        reason = cpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{op} (triton) got CPU tensors, but {reason}")


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(max(int(n), 1)))


# GPU tiles (BLOCK_N, BLOCK_M) per kernel and dtype at BLOCK_D <= 4: the largest of a sweep that compile for
# sm_90 with 4 warps without register spills (triton.compile + cuobjdump --dump-resource-usage, no GPU
# needed; registers per thread in brackets). Not timed: no GPU on the build machine.
_GPU_TILES = {
    ("fwd", torch.float32): (64, 32),  # 131 registers
    ("bwd_x", torch.float32): (32, 32),  # 166 (p = 2), 220 (p = 1)
    ("bwd_y", torch.float32): (32, 32),  # 203 / 194
    ("nearest", torch.float32): (64, 32),  # 127
    ("fwd", torch.float64): (32, 32),  # 168
    ("bwd_x", torch.float64): (16, 16),  # 120 / 155
    ("bwd_y", torch.float64): (16, 16),  # 138 / 156
    ("nearest", torch.float64): (32, 32),  # 128
    ("wsum_fwd", torch.float32): (32, 32),  # 128
    ("wsum_bwd_x", torch.float32): (32, 16),  # 127 / 140
    ("wsum_bwd_y", torch.float32): (32, 32),  # 128
    ("wsum_fwd", torch.float64): (32, 16),  # 168
    ("wsum_bwd_x", torch.float64): (16, 16),  # 156 / 168
    ("wsum_bwd_y", torch.float64): (32, 16),  # 166
}


def configs(kernel: str, n: int, m: int, dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_M, BLOCK_D, num_warps) for ``kernel`` (a key of _GPU_TILES: "fwd", "nearest", ...) over
    n points of x and m points of y in dimension dim."""
    block_d = _pow2(dim)
    if _INTERPRETED:
        # ~1 ms per executed op whatever the block size: big blocks, few tiles.
        return min(64, _pow2(n)), min(64, _pow2(m)), block_d, 1
    block_n, block_m = _GPU_TILES[(kernel, dtype)]
    cap = block_n * block_m * 4  # the (BLOCK_N, BLOCK_M, BLOCK_D) register block of the sweep
    block_n, block_m = min(block_n, _pow2(n)), min(block_m, _pow2(m))
    while block_n * block_m * block_d > cap and block_m > 2:
        block_m //= 2
    while block_n * block_m * block_d > cap and block_n > 2:
        block_n //= 2
    return block_n, block_m, block_d, 4


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
    inv_eps = torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)
    _softmin_fwd_kernel[(triton.cdiv(n, bn), batch)](
        x, y, h, inv_eps, lse, n, m, dim, P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps
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
    inv_eps = torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)
    _softmin_bwd_x_kernel[(triton.cdiv(n, bn), batch)](
        x, y, h, inv_eps, lse, grad_f, gx, n, m, dim, P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps
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
    inv_eps = torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)
    _softmin_bwd_y_kernel[(triton.cdiv(m, bm), batch)](
        x, y, h, inv_eps, lse, grad_f, gy, gh, n, m, dim, P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps
    )
    return gy, gh * (-eps)


def _wsum_setup(kernel, x, y, h, v, lse, eps, p, block_n, block_m):
    _check_inputs(x, y, h, p)
    if tuple(v.shape) != tuple(y.shape) or v.dtype != x.dtype or v.device != x.device:
        raise ValueError(f"v must have y's shape {tuple(y.shape)}, dtype and device, got {tuple(v.shape)}, {v.dtype}")
    batch, n, dim = x.shape
    bn, bm, bd, warps = configs(kernel, n, y.shape[1], dim, x.dtype)
    inv_eps = torch.full((1,), 1.0 / eps, dtype=x.dtype, device=x.device)
    return block_n or bn, block_m or bm, bd, warps, inv_eps


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
    bn, bm, bd, warps, inv_eps = _wsum_setup("wsum_fwd", x, y, h, v, lse, eps, p, block_n, block_m)
    _wsum_fwd_kernel[(triton.cdiv(n, bn), batch)](
        x, y, h, v, inv_eps, lse, out, n, y.shape[1], dim, P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps
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
    if need_x:
        bn, bm, bd, warps, inv_eps = _wsum_setup("wsum_bwd_x", x, y, h, v, lse, eps, p, block_n, block_m)
        _wsum_bwd_x_kernel[(triton.cdiv(n, bn), batch)](
            x, y, h, v, inv_eps, lse, grad_out, c, gx, n, m, dim,
            P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps,
        )
    if need_vh:
        bn, bm, bd, warps, inv_eps = _wsum_setup("wsum_bwd_y", x, y, h, v, lse, eps, p, block_n, block_m)
        _wsum_bwd_y_kernel[(triton.cdiv(m, bm), batch)](
            x, y, h, v, inv_eps, lse, grad_out, c, gv, gh, n, m, dim,
            P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps,
        )
    return gx, gv, gh
