"""The ``cpu`` backend of nearest: exact K nearest neighbours by the C++ k-d tree of
csrc/nearest/nearest_cpu.cpp (fastlddmm._C), built per call on each batch item's y, queried with
torch.get_num_threads() OpenMP threads. Batched with lengths in one call; norm 2 (squared Euclidean) and
1 (L1); any K >= 1; D <= 64. Distances are computed in the clouds' dtype from coordinate differences.
The neighbours found do not depend on the thread count.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..softmin.cpu import _DTYPES, _module

MAX_DIM = 64


def knn_index(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    k: int,
    norm: int,
    x_lengths: Tensor | None = None,  # (B,)
    y_lengths: Tensor | None = None,  # (B,)
) -> Tensor:  # (B, N, k) int64
    if x.dtype not in _DTYPES or y.dtype != x.dtype:
        raise TypeError(f"the cpu nearest search takes float32 or float64 clouds of one dtype, got {x.dtype}, {y.dtype}")
    if x.device.type != "cpu" or y.device.type != "cpu":
        raise ValueError(f"the cpu nearest search takes CPU tensors, got {x.device} and {y.device}")
    x, y = x.detach().contiguous(), y.detach().contiguous()
    batch, n, dim = x.shape
    m = y.shape[1]
    out = torch.zeros((batch, n, k), dtype=torch.int64)
    lengths = [None if t is None else t.detach().to(device="cpu", dtype=torch.int64).contiguous()
               for t in (x_lengths, y_lengths)]
    _module().knn_cpu(
        _DTYPES[x.dtype], x.data_ptr(), y.data_ptr(), *(0 if t is None else t.data_ptr() for t in lengths),
        batch, n, m, dim, int(k), int(norm), torch.get_num_threads(), out.data_ptr())
    return out
