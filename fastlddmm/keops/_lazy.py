"""Lazy access to pykeops: imported on first use, with a one-time note about compilation."""

from __future__ import annotations

import functools
import warnings

from .._backend import require, status


class KeOpsCompilationWarning(UserWarning):
    """KeOps is about to compile (or load from its cache) its formulas: the first call is slow."""


def keops_available() -> bool:
    return status("keops").available


@functools.lru_cache(maxsize=None)
def lazy_tensor():
    """pykeops.torch.LazyTensor; raises BackendUnavailableError (why, how to install) without pykeops.

    The first call of a process announces, once, that formulas are compiled on first use and
    where they are cached, so that a first slow call is not a silent mystery.
    """
    require("keops")
    import pykeops
    from pykeops.torch import LazyTensor

    warnings.warn(
        "fastlddmm: KeOps compiles each new formula with a C++ compiler on first use (~10-20 s each, "
        f"per reduction, dimension and dtype) and caches it in {pykeops.get_build_folder()}",
        KeOpsCompilationWarning,
        stacklevel=3,
    )
    return LazyTensor
