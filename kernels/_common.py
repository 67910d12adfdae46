"""Pieces shared by the Triton kernel files: per-coordinate loads and stores of the fast paths (D <= 3),
the launch device guard and the interpreter check."""

from __future__ import annotations

import triton
import triton.language as tl
import torch
from torch import Tensor


@triton.jit
def _load_rows(ptr, rows, row_ok, D: tl.constexpr):
    """x_0, x_1, x_2 of the rows (BLOCK,) of an (., D) array; coordinates >= D are zeros (never used)."""
    x0 = tl.load(ptr + rows * D, mask=row_ok, other=0.0)
    x1 = tl.zeros_like(x0)
    x2 = tl.zeros_like(x0)
    if D > 1:
        x1 = tl.load(ptr + rows * D + 1, mask=row_ok, other=0.0)
    if D > 2:
        x2 = tl.load(ptr + rows * D + 2, mask=row_ok, other=0.0)
    return x0, x1, x2


@triton.jit
def _store_rows(ptr, rows, row_ok, v0, v1, v2, D: tl.constexpr):
    tl.store(ptr + rows * D, v0, mask=row_ok)
    if D > 1:
        tl.store(ptr + rows * D + 1, v1, mask=row_ok)
    if D > 2:
        tl.store(ptr + rows * D + 2, v2, mask=row_ok)


@triton.jit
def _load_packed(ptr, offs, D: tl.constexpr):
    """Columns 0, 1, 2 (the coordinates) of packed rows at offsets offs: no mask (padded to whole tiles);
    coordinates >= D are not loaded (copies of column 0, never used)."""
    c0 = tl.load(ptr + offs)
    c1 = c0
    c2 = c0
    if D > 1:
        c1 = tl.load(ptr + offs + 1)
    if D > 2:
        c2 = tl.load(ptr + offs + 2)
    return c0, c1, c2


class _NoGuard:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def device_guard(t: Tensor):
    """Triton launches on the current CUDA device: make it t's for the launch (tensors on cuda:1 while
    cuda:0 is current would otherwise run on the wrong device)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else _NoGuard()


def pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(max(int(n), 1)))


def interpreter_reason(what: str, kernel_interpreted: bool, library_interpreted: bool) -> str | None:
    """Why ``what`` cannot take CPU tensors in this process, or None when it can (the interpreter)."""
    if kernel_interpreted and library_interpreted:
        return None
    if not kernel_interpreted:
        return (
            f"the Triton {what} kernels were compiled for the GPU: move the tensors to a CUDA device, or set "
            "TRITON_INTERPRET=1 in the environment before Python starts (Triton's slow CPU interpreter)"
        )
    return (
        "TRITON_INTERPRET=1 was set after triton was imported, so triton's own library functions were built "
        "for the GPU: set TRITON_INTERPRET=1 in the environment before Python starts"
    )
