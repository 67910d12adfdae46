"""The one dispatch table: which implementation of which op runs, and why.

Every question "which backend runs this?" is answered here and nowhere else (fl.chamfer, fl.nearest,
fl.sinkhorn*, fl.ops.euler_flow / ResNetFlow, fastlddmm.compat, fastlddmm.distributed and fl.register
all ask ``implementation(op, backend, problem)``), and so is "is it built, and why not?"
(``fl.backends()``, ``fastlddmm backends``).

Backends (``status(name)`` says whether each is usable here, and how to get it when it is not):

    reference  pure PyTorch, the ground truth (fastlddmm/ops/<op>/reference.py): any device and dtype
    cpu        compiled C++ / OpenMP (fastlddmm._C, built by ``pip install`` from csrc/)
    cuda       compiled CUDA (fastlddmm._C built where CMake found nvcc); needs a GPU at run time
    triton     Triton kernels (kernels/, shipped as fastlddmm.kernels): CUDA tensors, or CPU tensors
               when TRITON_INTERPRET=1 was set before triton was imported (slow; for tests)
    keops      pykeops LazyTensor reductions, CPU (g++) and GPU
    kdtree     scipy's exact cKDTree (nearest neighbours on the CPU)

The ops, each one room ``fastlddmm/ops/<op>/`` holding its reference twin and its backends behind one
contract (the room's ``__init__`` docstring states it):

    euler_flow   the fused ResNet-LDDMM flow, forward and backward (reference, cpu, cuda, triton): ops/flow/
    softmin      Sinkhorn's reduction f_i = -eps log sum_j exp(h_j - C(x_i, y_j) / eps) (reference, keops, triton)
    projection   the barycentric projection's sum_j softmax_j(h_j - C_ij / eps) v_j (reference, keops, triton)
    nearest      K nearest neighbours' indices (reference, kdtree, keops, triton)
    kernel_sum   sum_j k(x_i, y_j) b_j for GeomLoss's kernel losses (reference, keops)

``backend="auto"`` follows the rules in ``_AUTO`` below (each threshold written once, with the
measurement that set it) and falls back to the reference without an error. A backend named by the user
that cannot run raises BackendUnavailableError saying why and how to get it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton", "keops", "kdtree")
FUSED_DTYPES = (torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here; the message says why and how to get it."""


# ---------------------------------------------------------------------------------------------------
# What is built and installed here
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is (not) usable, and how to get it when it is not

    def __bool__(self) -> bool:
        return self.available


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
    """Whether backend ``name`` is usable here (for some op and device), and why (not)."""
    if name == "reference":
        return BackendStatus(name, True, "pure PyTorch, always available")
    if name == "cpu":
        if compiled_module() is None:
            return BackendStatus(
                name, False,
                "the compiled extension fastlddmm._C is not built: reinstall from source with a C++ compiler "
                "(pip install . builds csrc/ with CMake)")
        return BackendStatus(name, True, "compiled C++ extension fastlddmm._C (OpenMP, follows torch.get_num_threads())")
    if name == "cuda":
        mod = compiled_module()
        if mod is None or not mod.has_cuda():
            return BackendStatus(name, False,
                                 "fastlddmm._C was built without CUDA: rebuild where nvcc is on PATH (or FASTLDDMM_CUDA=1)")
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
        return BackendStatus(name, False,
                             "no CUDA GPU here; set TRITON_INTERPRET=1 to run the Triton kernels on the CPU (slow)")
    if name == "keops":
        if not _has_module("pykeops"):
            return BackendStatus(name, False, "pykeops is missing: pip install 'fastlddmm[keops]' (needs g++)")
        return BackendStatus(name, True, "pykeops LazyTensor reductions (formulas compiled on first use, then cached)")
    if name == "kdtree":
        if not _has_module("scipy"):
            return BackendStatus(name, False, "scipy is missing: pip install 'fastlddmm[keops]' (or scipy)")
        return BackendStatus(name, True, "scipy's exact cKDTree (nearest neighbours, CPU)")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS} or 'auto'")


def backends() -> dict[str, BackendStatus]:
    """Every backend with whether it is usable here and why (not)."""
    return {name: status(name) for name in BACKENDS}


def check_name(backend: str) -> str:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


# ---------------------------------------------------------------------------------------------------
# The problem an op is asked to solve: what a backend's limits and the auto rules look at
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    device: str  # "cpu" or "cuda"
    dtype: torch.dtype
    dim: int  # D
    n: int = 0  # points on the query side (per batch item)
    m: int = 0  # points on the reduced side (per batch item)
    batch: int = 1
    k: int = 1  # neighbours (nearest)
    norm: int = 2  # 2: squared Euclidean, 1: L1 (nearest)
    deterministic: bool = False  # bitwise-reproducible runs: no atomics (euler_flow)


def problem(x: torch.Tensor, y: torch.Tensor | None = None, **extra) -> Problem:
    """The Problem of points x (..., N, D) reduced against y (..., M, D) (y=None: x alone)."""
    batch = x.shape[0] if x.dim() == 3 else 1
    return Problem(device=x.device.type, dtype=x.dtype, dim=int(x.shape[-1]), n=int(x.shape[-2]) if x.dim() > 1 else 1,
                   m=int(y.shape[-2]) if y is not None else 0, batch=batch, **extra)


# ---------------------------------------------------------------------------------------------------
# The table: (op, backend) -> where the implementation lives, and what it takes
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    module: str  # the module with the op's contract (see the op room's __init__ docstring)
    devices: tuple[str, ...]  # device types of the tensors it takes ("cpu" for triton: interpreter only)
    limit: Callable[[Problem], str | None] = field(default=lambda pr: None)  # why it cannot take pr, or None


def _fused_dtype(pr: Problem) -> str | None:
    if pr.dtype not in FUSED_DTYPES:
        return f"it runs float32 or float64 tensors, got {pr.dtype} (convert, or use backend='reference')"
    return None


def _cuda_dim(pr: Problem) -> str | None:
    mod = compiled_module()
    limit = int(getattr(mod, "CUDA_MAX_DIM", 0)) if mod is not None else 0
    if pr.dim > limit:
        return f"it supports points of dimension D <= {limit}, got D = {pr.dim} (use backend='triton' or 'reference')"
    return _fused_dtype(pr)


def _first_nearest_only(pr: Problem) -> str | None:
    if pr.k != 1 or pr.norm != 2:
        return f"it finds the single nearest neighbour in squared Euclidean distance only (asked: K={pr.k}, norm={pr.norm})"
    return _fused_dtype(pr)


def _cpu_nearest(pr: Problem) -> str | None:
    if pr.dim > 64:
        return f"its k-d tree takes points of dimension D <= 64, got D = {pr.dim} (use backend='keops' or 'reference')"
    return _fused_dtype(pr)


TABLE: dict[str, dict[str, Entry]] = {
    "euler_flow": {
        "reference": Entry("fastlddmm.ops.flow.reference", ("cpu", "cuda")),
        "cpu": Entry("fastlddmm.ops.flow.cpu", ("cpu",), _fused_dtype),
        "cuda": Entry("fastlddmm.ops.flow.cuda", ("cuda",), _cuda_dim),
        "triton": Entry("fastlddmm.kernels.euler_flow", ("cuda", "cpu"), _fused_dtype),
    },
    "softmin": {
        "reference": Entry("fastlddmm.ops.softmin.reference", ("cpu", "cuda")),
        "cpu": Entry("fastlddmm.ops.softmin.cpu", ("cpu",), _fused_dtype),
        "keops": Entry("fastlddmm.ops.softmin.keops", ("cpu", "cuda")),
        "triton": Entry("fastlddmm.ops.softmin.triton", ("cuda", "cpu"), _fused_dtype),
    },
    "projection": {
        "reference": Entry("fastlddmm.ops.projection.reference", ("cpu", "cuda")),
        "cpu": Entry("fastlddmm.ops.projection.cpu", ("cpu",), _fused_dtype),
        "keops": Entry("fastlddmm.ops.projection.keops", ("cpu", "cuda")),
        "triton": Entry("fastlddmm.ops.projection.triton", ("cuda", "cpu"), _fused_dtype),
    },
    "nearest": {
        "reference": Entry("fastlddmm.ops.nearest.reference", ("cpu", "cuda")),
        "cpu": Entry("fastlddmm.ops.nearest.cpu", ("cpu",), _cpu_nearest),
        "kdtree": Entry("fastlddmm.ops.nearest.kdtree", ("cpu", "cuda")),  # CUDA tensors go through the host
        "keops": Entry("fastlddmm.ops.nearest.keops", ("cpu", "cuda")),
        "triton": Entry("fastlddmm.ops.nearest.triton", ("cuda", "cpu"), _first_nearest_only),
    },
    "kernel_sum": {
        "reference": Entry("fastlddmm.ops.kernel_sum.reference", ("cpu", "cuda")),
        "keops": Entry("fastlddmm.ops.kernel_sum.keops", ("cpu", "cuda")),
    },
}
OPS = tuple(TABLE)


def backends_for(op: str) -> tuple[str, ...]:
    """The backends that implement ``op`` (usable here or not)."""
    return tuple(_entries(op))


def _entries(op: str) -> dict[str, Entry]:
    try:
        return TABLE[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}") from None


def load(op: str, backend: str):
    """The module of ``backend``'s implementation of ``op`` (imported on first use)."""
    entry = _entries(op).get(backend)
    if entry is None:
        raise BackendUnavailableError(f"backend {backend!r} has no {op}; use one of {('auto', *backends_for(op))}")
    try:
        return importlib.import_module(entry.module)
    except ImportError as err:
        raise BackendUnavailableError(
            f"backend {backend!r}: its {op} implementation ({entry.module}) could not be imported: {err}") from err


def why_not(op: str, backend: str, pr: Problem) -> str | None:
    """Why ``backend`` cannot run ``op`` on the problem ``pr`` here (None when it can)."""
    entry = _entries(op).get(backend)
    if entry is None:
        return f"backend {backend!r} has no {op}; use one of {('auto', *backends_for(op))}"
    st = status(backend)
    if not st.available:
        return f"backend {backend!r} is not available: {st.reason}"
    if pr.device not in entry.devices:
        return f"backend {backend!r} runs {op} on {' or '.join(entry.devices)} tensors, got tensors on {pr.device}"
    if backend == "triton" and pr.device == "cpu":
        if not triton_interpret():
            return ("backend 'triton' got CPU tensors: move them to a GPU, or set TRITON_INTERPRET=1 to use the "
                    "(slow) CPU interpreter")
        try:
            reason = getattr(load(op, backend), "cpu_unavailable_reason", lambda: None)()
        except BackendUnavailableError as err:
            return str(err)
        if reason:
            return f"backend 'triton' got CPU tensors, but {reason}"
    limit = entry.limit(pr)
    if limit:
        return f"backend {backend!r} cannot run {op} here: {limit}"
    return None


def usable(op: str, backend: str, pr: Problem) -> bool:
    return why_not(op, backend, pr) is None


# ---------------------------------------------------------------------------------------------------
# The auto rules: every threshold once, with the measurement behind it
# ---------------------------------------------------------------------------------------------------

# Nearest neighbours, CPU, float32, D = 3, Chamfer forward + backward with one torch thread
# (benchmarks/compare_distances.py, 2-core x86): N = M = 100: dense 1.0 ms, KeOps 1.9 ms, cKDTree 2.0 ms;
# 300: 3.7 / 2.1 / 2.4 ms; 1000: 52 / 5.8 / 4.4 ms; 3000: 930 / 82 / 9.6 ms. So: dense below ~5e4 pairs,
# then the k-d tree in D <= 3 (cost ~ N log M against KeOps' N·M), KeOps in higher dimension.
NEAREST_DENSE_MAX_PAIRS = 50_000
KDTREE_MAX_DIM = 3
# On CUDA tensors the dense search stays cheap for longer (not measured: no GPU on the build machine).
NEAREST_DENSE_MAX_PAIRS_CUDA = 16 * NEAREST_DENSE_MAX_PAIRS

# Sinkhorn soft-min / projection: on a 2-core x86 CPU the dense logsumexp beat KeOps at every size where it
# fits (float32, D = 3, forward + backward, one torch thread: N = M = 300: 0.13 s against 0.36 s; 2000: 7.7 s
# against 12.8 s), so "auto" stays dense while the cost matrices are small (B·max(N, M)² entries up to 5000²,
# ~0.4 GB in float32), then streams. GeomLoss's "auto" uses the same 5000² bound for its "tensorized" backend.
SOFTMIN_DENSE_MAX_ENTRIES = 5000**2

# GeomLoss's kernel losses: dense up to GeomLoss's own 5000² bound, then KeOps.
KERNEL_DENSE_MAX_ENTRIES = 5000**2


def _first_usable(op: str, pr: Problem, names) -> str:
    for name in names:
        if usable(op, name, pr):
            return name
    return "reference"


def _auto_euler_flow(pr: Problem) -> str:
    if pr.device == "cpu":
        return _first_usable("euler_flow", pr, ("cpu",))
    # CUDA: Triton first (no atomics, so also bitwise reproducible), then the CUDA kernels, whose weight
    # gradients are summed with atomics (not reproducible: skipped when deterministic). Not timed on a GPU yet.
    return _first_usable("euler_flow", pr, ("triton",) if pr.deterministic else ("triton", "cuda"))


# CPU tensors: the C++ k-d tree ("cpu") wins at every size measured (benchmarks/results/cpu_kernels.md,
# 2-core Xeon, float32, D = 3, one query direction, one thread: N = M = 100: 0.017 ms against cKDTree
# 0.092 ms; 1000: 0.23 / 0.89 ms; 10^4: 11.7 / 28.9 ms; Chamfer forward + backward, two threads: 10^5 and
# 10^6 points ~0.3x cKDTree's time); the dense search is slower from ~100 points on (its (rows, M) blocks).
# Its limit (D <= 64) sends the rest to the old rule.


def _auto_nearest(pr: Problem) -> str:
    pairs = pr.n * pr.m
    if pr.device == "cpu":
        if usable("nearest", "cpu", pr):
            return "cpu"
        if pairs <= NEAREST_DENSE_MAX_PAIRS:
            return "reference"
        return _first_usable("nearest", pr, ("kdtree", "keops") if pr.dim <= KDTREE_MAX_DIM else ("keops",))
    # GPU: the streaming Triton search (O(N + M) memory, no compilation step like KeOps'), else dense while
    # small, KeOps beyond.
    if usable("nearest", "triton", pr):
        return "triton"
    if pairs <= NEAREST_DENSE_MAX_PAIRS_CUDA:
        return "reference"
    return _first_usable("nearest", pr, ("keops",))


# CPU tensors: the streaming C++ soft-min ("cpu") from the smallest sizes on (benchmarks/results/cpu_kernels.md,
# 2-core Xeon, float32, D = 3, fl.sinkhorn value + gradient: N = M = 10 and 30: the same time as the dense
# reference within noise (~50 ms: the Python loop of the solver dominates both); 300: 48 ms against 522 ms;
# 3000: 2.3 s against 37 s; 10^4: ~0.03x GeomLoss online (KeOps), see the results file). float16 / bfloat16
# and builds without fastlddmm._C fall through to the old rule.


def _auto_softmin(pr: Problem, op: str = "softmin") -> str:
    if pr.device == "cpu" and usable(op, "cpu", pr):
        return "cpu"
    if pr.batch * max(pr.n, pr.m) ** 2 <= SOFTMIN_DENSE_MAX_ENTRIES:
        return "reference"
    # CUDA: the streaming Triton kernels before KeOps (not timed: no GPU on the build machine).
    return _first_usable(op, pr, ("triton", "keops") if pr.device == "cuda" else ("keops",))


def _auto_kernel_sum(pr: Problem) -> str:
    if pr.batch * pr.n * pr.m <= KERNEL_DENSE_MAX_ENTRIES:
        return "reference"
    return _first_usable("kernel_sum", pr, ("keops",))


_AUTO: dict[str, Callable[[Problem], str]] = {
    "euler_flow": _auto_euler_flow,
    "softmin": _auto_softmin,
    "projection": functools.partial(_auto_softmin, op="projection"),
    "nearest": _auto_nearest,
    "kernel_sum": _auto_kernel_sum,
}


def choose(op: str, backend: str, pr: Problem) -> str:
    """The backend that runs ``op`` on ``pr``: ``backend`` itself if it can (else BackendUnavailableError
    saying why), or for "auto" the rule of ``_AUTO`` (the reference when nothing faster can run)."""
    check_name(backend)
    if backend == "auto":
        return _AUTO[op](pr)
    reason = why_not(op, backend, pr)
    if reason is not None:
        raise BackendUnavailableError(reason)
    return backend


def implementation(op: str, backend: str, pr: Problem):
    """The module that runs ``op`` on ``pr`` under ``backend`` ("auto" or a name); see choose()."""
    return load(op, choose(op, backend, pr))


# What is built and usable does not change while a program runs: torch.compile treats this answer as a
# constant instead of tracing the import machinery behind it (that keeps fullgraph=True possible).
@torch.compiler.assume_constant_result
def choose_euler_flow(backend: str, device: str, dtype: str, dim: int, deterministic: bool) -> str:
    """choose("euler_flow", ...) with plain arguments, constant for torch.compile (dtype: "float32", ...)."""
    pr = Problem(device=device, dtype=getattr(torch, dtype), dim=dim, deterministic=deterministic)
    return choose("euler_flow", backend, pr)


def usable_backends(op: str, pr: Problem) -> list[str]:
    """The backends that can run ``op`` on ``pr`` here (for tests, benchmarks and ``fastlddmm backends``)."""
    return [name for name in backends_for(op) if usable(op, name, pr)]
