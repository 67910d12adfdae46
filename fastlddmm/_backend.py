"""One loader, one truth about which backends are built and usable here, and why not.

Backends:
    reference  pure PyTorch (fastlddmm.reference): always there, any device, float64-capable
    cpu        compiled C++ / OpenMP (fastlddmm._C), built by pip install from csrc/
    cuda       compiled CUDA (fastlddmm._C built where CMake found nvcc), needs a GPU at run time
    triton     Triton kernels (fastlddmm.kernels): CUDA tensors, or CPU tensors with TRITON_INTERPRET=1
    keops      pykeops LazyTensor reductions, CPU (g++) and GPU

``fastlddmm.backends()`` returns, for each name, whether it is usable and, if not, why and how to get it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

NAMES = ("reference", "cpu", "cuda", "triton", "keops")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is (not) usable, and how to get it when it is not

    def __bool__(self) -> bool:
        return self.available


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why and how to get it."""


@functools.lru_cache(maxsize=None)
def compiled_module():
    """The compiled extension fastlddmm._C, or None when it was not built."""
    try:
        return importlib.import_module("fastlddmm._C")
    except ImportError:
        return None


def triton_interpret() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=None)
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def status(name: str) -> BackendStatus:
    """Whether backend ``name`` is usable here, and why (not)."""
    if name == "reference":
        return BackendStatus(name, True, "pure PyTorch, always available")
    if name == "cpu":
        mod = compiled_module()
        if mod is None:
            return BackendStatus(
                name, False,
                "the compiled extension fastlddmm._C is not built: reinstall from source with a C++ compiler "
                "(pip install . builds csrc/ with CMake)",
            )
        return BackendStatus(name, True, "compiled C++ extension fastlddmm._C (OpenMP)")
    if name == "cuda":
        mod = compiled_module()
        if mod is None or not getattr(mod, "has_cuda", lambda: False)():
            return BackendStatus(
                name, False,
                "fastlddmm._C was built without CUDA: rebuild where nvcc is on PATH (or FASTLDDMM_CUDA=1)",
            )
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "built with CUDA, but torch sees no GPU here")
        return BackendStatus(name, True, "compiled CUDA kernels in fastlddmm._C")
    if name == "triton":
        if not _has_module("triton"):
            return BackendStatus(name, False, "the triton package is missing: pip install 'fastlddmm[triton]'")
        if torch.cuda.is_available():
            return BackendStatus(name, True, "Triton on the GPU")
        if triton_interpret():
            return BackendStatus(name, True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow, for testing)")
        return BackendStatus(
            name, False, "no CUDA GPU here; set TRITON_INTERPRET=1 to run the Triton kernels on the CPU (slow)"
        )
    if name == "keops":
        if not _has_module("pykeops"):
            return BackendStatus(name, False, "pykeops is missing: pip install 'fastlddmm[keops]' (needs g++)")
        return BackendStatus(name, True, "pykeops LazyTensor reductions (formulas compiled on first use, then cached)")
    raise ValueError(f"unknown backend {name!r}; expected one of {NAMES} or 'auto'")


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable here and why (not)."""
    return {name: status(name) for name in NAMES}


def require(name: str, *, device: torch.device | None = None) -> None:
    """Raises BackendUnavailableError (with why and how) unless ``name`` can run on ``device``."""
    st = status(name)
    if not st.available:
        raise BackendUnavailableError(f"backend {name!r} is not available: {st.reason}")
    if device is None:
        return
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"backend 'cuda' runs on CUDA tensors, got tensors on {device}")
    if name == "triton" and device.type == "cpu" and not triton_interpret():
        raise BackendUnavailableError(
            "backend 'triton' got CPU tensors: move them to a GPU, or set TRITON_INTERPRET=1 to use the "
            "(slow) CPU interpreter"
        )


def check_name(backend: str) -> str:
    if backend != "auto" and backend not in NAMES:
        raise ValueError(f"backend must be 'auto' or one of {NAMES}, got {backend!r}")
    return backend
