"""Triton kernel of the streaming nearest-neighbour search: j*_i = argmin_j |x_i - y_j|², then the launcher.

Ground truth: fastlddmm/ops/nearest/reference.py. Only the index is computed here; the front-ends
recompute |x_i - y_{j*}|² in PyTorch from it (values and gradients of the reference whenever the same
neighbour is found), so there is no backward kernel.

Design (the choices of kernels/softmin.py, see there):
* one program = BLOCK_N rows of x (grid axis 1: batch item), walking y in tiles of BLOCK_M with a
  running (min, argmin) per row; nothing of size N × M is stored;
* D = 1, 2, 3 (constexpr): one (BLOCK_M, BLOCK_N) tile per coordinate, the y axis inside each thread,
  so the tile's min and argmin over j are in-thread compares (no shuffle, no barrier); y is packed by
  the launcher as (B, Mp, 4) rows padded to whole tiles with +inf coordinates (never nearest, no masks
  in the loop). Larger D: the generic (BLOCK_N, BLOCK_M, BLOCK_D) kernel;
* squared distances from coordinate differences, not |x|² + |y|² - 2 x·y (exact far from the origin);
* ties: the smallest j wins, within a tile (min over the j that reach the tile's minimum, not
  tl.argmin, whose tie-break is unspecified) and across tiles (a later tile must be strictly better).
  NaN distances are never selected unless the whole row is NaN (then index 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import _load_packed, _load_rows, device_guard
from .softmin import FAST_MAX_D, _check_device, _diffs, _pack, configs, cpu_unavailable_reason  # noqa: F401


@triton.jit(do_not_specialize=["N", "MP"])
def _nearest_kernel(
    x_ptr,  # (B, N, D)
    yp_ptr,  # (B, Mp, 4) packed y, padded with +inf
    index_ptr,  # (B, N) int64 out
    N, MP,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    yp_ptr += batch * MP * 4
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x0, x1, x2 = _load_rows(x_ptr, rows, row_ok, D)
    local = tl.arange(0, BLOCK_M)
    offs = local * 4

    best = tl.full([BLOCK_N], float("inf"), x0.dtype)
    best_j = tl.zeros([BLOCK_N], tl.int32)
    for start in range(0, MP, BLOCK_M):
        y0, y1, y2 = _load_packed(yp_ptr, offs, D)
        _, _, _, d2 = _diffs(x0[None, :], x1[None, :], x2[None, :], y0[:, None], y1[:, None], y2[:, None], D)
        tile_min = tl.min(d2, axis=0)  # NaN never wins a min (unless all are NaN: then no j matches below)
        tile_j = tl.min(tl.where(d2 == tile_min[None, :], local[:, None], BLOCK_M), axis=0)
        better = tile_min < best
        best_j = tl.where(better, start + tile_j, best_j)
        best = tl.where(better, tile_min, best)
        yp_ptr += BLOCK_M * 4
    tl.store(index_ptr + batch * N + rows, best_j.to(tl.int64), mask=row_ok)


@triton.jit(do_not_specialize=["N", "M"])
def _nearest_generic(
    x_ptr,  # (B, N, D)
    y_ptr,  # (B, M, D)
    index_ptr,  # (B, N) int64 out
    N, M, D,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    x_ptr += batch * N * D
    y_ptr += batch * M * D
    index_ptr += batch * N

    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols_d = tl.arange(0, BLOCK_D)
    d_ok = cols_d < D
    x = tl.load(x_ptr + rows[:, None] * D + cols_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    best = tl.full([BLOCK_N], float("inf"), x.dtype)
    best_j = tl.zeros([BLOCK_N], tl.int64)
    for start in range(0, M, BLOCK_M):
        cols_j = start + tl.arange(0, BLOCK_M).to(tl.int64)
        j_ok = cols_j < M
        y = tl.load(y_ptr + cols_j[:, None] * D + cols_d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        diff = x[:, None, :] - y[None, :, :]
        d2 = tl.sum(diff * diff, axis=2)  # (BLOCK_N, BLOCK_M)
        d2 = tl.where(j_ok[None, :] & (d2 == d2), d2, float("inf"))  # padding and NaN never win
        tile_min = tl.min(d2, axis=1)
        tile_j = tl.min(tl.where(d2 == tile_min[:, None], cols_j[None, :], M), axis=1)
        better = tile_min < best
        best_j = tl.where(better, tile_j, best_j)
        best = tl.where(better, tile_min, best)
    tl.store(index_ptr + rows, best_j, mask=row_ok)


def nearest_index(
    x: Tensor,  # (B, N, D) or (N, D)
    y: Tensor,  # (B, M, D) or (M, D)
    *,
    block_n: int | None = None,
    block_m: int | None = None,
) -> Tensor:  # (B, N) or (N,) int64
    """j* = argmin_j |x_i - y_j|² for each x_i (smallest j on ties). block_* override tiles (tests)."""
    squeeze = x.dim() == 2
    if squeeze:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"x and y must have shapes (B, N, D) and (B, M, D), got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype != x.dtype or y.device != x.device:
        raise ValueError(f"y must have x's dtype {x.dtype} and device {x.device}, got {y.dtype} on {y.device}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    if y.shape[1] == 0 and x.shape[1] > 0:
        raise ValueError("y must hold at least one point")
    _check_device(x, "nearest")
    x, y = x.detach().contiguous(), y.detach().contiguous()
    batch, n, dim = x.shape
    m = y.shape[1]
    index = torch.zeros((batch, n), dtype=torch.int64, device=x.device)
    if batch and n:
        bn, bm, bd, warps = configs("nearest", n, m, dim, x.dtype)
        bn, bm = block_n or bn, block_m or bm
        with device_guard(x):
            if dim > FAST_MAX_D:
                _nearest_generic[(triton.cdiv(n, bn), batch)](
                    x, y, index, n, m, dim, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps
                )
            else:
                if m >= 2**31 - bm:
                    raise ValueError(f"the Triton nearest kernel indexes y with int32: M = {m} is too large")
                yp = _pack(y, [], 4, bm, [(c, float("inf")) for c in range(dim)])
                _nearest_kernel[(triton.cdiv(n, bn), batch)](
                    x, yp, index, n, yp.shape[1], D=dim, BLOCK_N=bn, BLOCK_M=bm, num_warps=warps
                )
    return index[0] if squeeze else index
