"""Lazy access to pykeops, shared by the KeOps backends of every op (fastlddmm/ops/*/keops.py).

pykeops is optional (``pip install 'fastlddmm[keops]'``, needs g++ or nvcc at run time) and is imported
only when a KeOps backend is first called. KeOps compiles each new formula (per reduction, point
dimension D and dtype) with g++/nvcc on first use, ~10-20 s each on a CPU, and caches the result on disk
in ``pykeops.get_build_folder()`` (``~/.cache/keops<version>/...``); later calls and later processes
reuse it. Delete that folder (or call ``pykeops.clean_pykeops()``) to force a rebuild.
"""

from __future__ import annotations

import functools
import warnings

from .dispatch import BackendUnavailableError, status


class KeOpsCompilationWarning(UserWarning):
    """KeOps is about to compile (or load from its cache) its formulas: the first call is slow."""


@functools.lru_cache(maxsize=None)
def lazy_tensor():
    """pykeops.torch.LazyTensor; raises BackendUnavailableError (why, how to install) without pykeops.

    The first call of a process announces, once, that formulas are compiled on first use and
    where they are cached, so that a first slow call is not a silent mystery.
    """
    st = status("keops")
    if not st.available:
        raise BackendUnavailableError(f"backend 'keops' is not available: {st.reason}")
    import pykeops
    from pykeops.torch import LazyTensor

    warnings.warn(
        "fastlddmm: KeOps compiles each new formula with a C++ compiler on first use (~10-20 s each, "
        f"per reduction, dimension and dtype) and caches it in {pykeops.get_build_folder()}",
        KeOpsCompilationWarning,
        stacklevel=3,
    )
    return LazyTensor


def sinkhorn_cost(x_i, y_j, p: int):
    """|x_i - y_j|^p / p as a KeOps formula (p = 1: sqrt(max(d², floor)), as the dense reference)."""
    from .ops.softmin import P1_SQDIST_FLOOR

    d2 = ((x_i - y_j) ** 2).sum(-1)
    if p == 2:
        return d2 / 2
    if p == 1:
        return ((d2 - P1_SQDIST_FLOOR).relu() + P1_SQDIST_FLOOR).sqrt()
    raise ValueError(f"p must be 1 or 2, got {p!r}")
