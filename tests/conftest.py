"""Shared test helpers: assert_close that says where tensors disagree, flow parameters, random points, and
the parametrisation of an op's tests over the backends the dispatch table lists for it.

An op's tests run once per (backend, device) of ``backend_cases(op)``: every backend of
``fastlddmm.dispatch.TABLE[op]`` on every device type its entry takes (CUDA ones marked ``gpu``), as
pytorch_scatter's tests run once per device. ``require_backend`` then skips, with the dispatch table's own
reason (why, and what would make it run), the cases this machine cannot run.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch
from torch import Tensor

# torch.compile's on-disk cache keys a compiled backward by the graph, not by a custom op's Python autograd
# formula (pytorch/pytorch#144344): graphs cached by another fastlddmm version on this machine would be
# replayed against this one's kernels. The tests compile into a cache of their own (unless one is set).
_OWN_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _OWN_INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastlddmm-tests-inductor-")


def pytest_sessionfinish(session, exitstatus):
    if _OWN_INDUCTOR_CACHE is not None:
        shutil.rmtree(_OWN_INDUCTOR_CACHE, ignore_errors=True)

# Without a GPU, the Triton kernels are tested in Triton's CPU interpreter. The variable must be set
# before triton is first imported (triton builds tl.sum & co. at import), hence here, before fastlddmm.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastlddmm import dispatch  # noqa: E402  (after TRITON_INTERPRET)


def _describe(index: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(i) for i in index) + "]"


def assert_close(actual: Tensor, expected: Tensor, *, rtol: float, atol: float, name: str = "tensor",
                 max_report: int = 5) -> None:
    """|actual - expected| <= atol + rtol·|expected| everywhere, NaN/Inf in the same places.

    On failure the message gives the number of mismatches, the worst absolute and relative errors with
    their indices, and the first few mismatching entries (NaN/Inf mismatches included).
    """
    assert isinstance(actual, Tensor) and isinstance(expected, Tensor), f"{name}: expected two tensors"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != expected {expected.dtype}"
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & (a != e) & ~(torch.isnan(a) | torch.isnan(e))
    finite = torch.isfinite(a) & torch.isfinite(e)
    diff = torch.where(finite, (a - e).abs(), torch.zeros_like(a))
    bad = (finite & (diff > atol + rtol * e.abs())) | nan_mismatch | inf_mismatch
    if not bool(bad.any()):
        return
    lines = [f"{name}: {int(bad.sum())} of {a.numel()} entries differ (rtol={rtol:g}, atol={atol:g})"]
    if bool(nan_mismatch.any()) or bool(inf_mismatch.any()):
        lines.append(f"  NaN mismatches: {int(nan_mismatch.sum())}, Inf mismatches: {int(inf_mismatch.sum())}")
    if a.numel():
        worst = int(diff.reshape(-1).argmax())
        rel = diff / e.abs().clamp_min(torch.finfo(torch.float64).tiny)
        worst_rel = int(torch.where(finite, rel, torch.zeros_like(rel)).reshape(-1).argmax())
        unravel = lambda flat: tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))  # noqa: E731
        lines.append(f"  max abs error {diff.reshape(-1)[worst].item():.3e} at {_describe(unravel(worst))}")
        lines.append(f"  max rel error {rel.reshape(-1)[worst_rel].item():.3e} at {_describe(unravel(worst_rel))}")
    for idx in bad.nonzero()[:max_report].tolist():
        t = tuple(idx)
        lines.append(f"  at {_describe(t)}: actual {a[t].item()!r}, expected {e[t].item()!r}")
    raise AssertionError("\n".join(lines))


def assert_close_to_max(actual: Tensor, expected: Tensor, tol: float, name: str = "tensor") -> None:
    """|actual - expected| <= tol · (|expected| + max |expected|) everywhere, compared in float64: for sums
    whose rounding error scales with their largest terms, not with each entry (soft-mins, gradients).
    An expected tensor of zeros (a gradient that cancels exactly, e.g. a soft-max over one point) is compared
    to the absolute tolerance tol: the inputs of these tests are O(1), so is the rounding of the cancelling terms."""
    expected = expected.detach().double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    scale = scale if scale > 0 else 1.0
    assert_close(actual.detach().double(), expected, rtol=tol, atol=tol * scale, name=name)


def flow_params(layers: int, width: int, dim: int, *, dtype=torch.float64, device="cpu", seed: int = 0,
                requires_grad: bool = False) -> list[Tensor]:
    """Random (weight1, bias1, weight2, bias2) with non-trivial but tame velocities (|dt·v| ~ 0.1):
    W1, b1 ~ U(±1/√D) as nn.Linear, W2 ~ N(0, 1/H), b2 ~ N(0, 0.1²)."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / dim**0.5
    w1 = (torch.rand(layers, width, dim, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    b1 = (torch.rand(layers, width, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    w2 = torch.randn(layers, dim, width, generator=gen, dtype=torch.float64) / width**0.5
    b2 = torch.randn(layers, dim, generator=gen, dtype=torch.float64) * 0.1
    return [p.to(device=device, dtype=dtype).requires_grad_(requires_grad) for p in (w1, b1, w2, b2)]


def flow_backward_states(backend: str, x: Tensor, states: Tensor) -> Tensor:
    """What a fused euler_flow backend's backward takes (ops/flow's contract): the forward's (L, N, D) states,
    or x[None] (1, N, D) where the backend recomputes the layers (SAVED_FOR_BACKWARD == "input")."""
    from fastlddmm.ops.flow import SAVED_FOR_BACKWARD

    return states if SAVED_FOR_BACKWARD[backend] == "layers" else x.detach()[None]


def random_points(*shape: int, dtype=torch.float64, device="cpu", seed: int = 1, requires_grad: bool = False) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def clouds(n: int, m: int, dim: int = 3, *, batch: int | None = None, dtype=torch.float64, device="cpu",
           seed: int = 0, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Two random clouds x (…, n, dim) ~ N(offset, 1) and y (…, m, dim) ~ N(offset + 0.3, 0.8²), drawn in
    float64 then cast (so float32 and float64 cases hold the same points up to rounding)."""
    gen = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    x = torch.randn(*shape, n, dim, generator=gen, dtype=torch.float64) + offset
    y = torch.randn(*shape, m, dim, generator=gen, dtype=torch.float64) * 0.8 + 0.3 + offset
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Backends of an op, from the dispatch table
# ------------------------------------------------------------------------------------------------

GPU_REASON = "needs a CUDA GPU (torch sees none here): run `pytest -m gpu` on a machine with one"

# The Triton interpreter pays ~1 ms per executed op: CPU-interpreted Triton gets the cases up to this many
# points (per batch item and side); the larger ones run compiled on a GPU (the same case, device "cuda").
INTERPRETER_MAX_POINTS = 64

# KeOps compiles every new formula (reduction, point dimension, dtype, differentiated variable) with g++ on
# first use, ~15 s each on a 2-core CPU, then caches it on disk. CI starts with an empty cache, so the
# suite keeps KeOps to a fixed set of formulas (the ones each test file names); FASTLDDMM_TEST_KEOPS_ALL=1
# runs the other combinations too.
KEOPS_ALL = os.environ.get("FASTLDDMM_TEST_KEOPS_ALL", "0") not in ("", "0")


def backend_cases(op: str, *, exclude: tuple[str, ...] = (), devices: tuple[str, ...] = ("cpu", "cuda")) -> list:
    """pytest params ``(backend, device)``: every backend of ``op`` in the dispatch table, on every device
    type its table entry takes (CPU first), ids like "keops-cpu"; the CUDA cases are marked ``gpu``."""
    cases = []
    for device in devices:
        for name in dispatch.backends_for(op):
            if name in exclude or device not in dispatch.TABLE[op][name].devices:
                continue
            marks = (pytest.mark.gpu,) if device == "cuda" else ()
            cases.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return cases


def require_backend(op: str, backend: str, device: str = "cpu", *, dtype: torch.dtype = torch.float64,
                    dim: int = 3, **problem) -> torch.device:
    """Skips, saying why and what would make the test run, unless ``backend`` can run ``op`` here on
    ``device`` tensors of this dtype and dimension (dispatch.why_not); returns the device."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(GPU_REASON)
    reason = dispatch.why_not(op, backend, dispatch.Problem(device=device, dtype=dtype, dim=dim, **problem))
    if reason is not None:
        pytest.skip(reason)
    return torch.device(device)


def interpreted(backend: str, device) -> bool:
    """Whether this case runs in Triton's (slow) CPU interpreter."""
    return backend == "triton" and torch.device(device).type == "cpu"


def skip_if_interpreted(backend: str, device, points: int, limit: int = INTERPRETER_MAX_POINTS) -> None:
    """Skips cases with more than ``limit`` points under the Triton interpreter (they run on a GPU)."""
    if interpreted(backend, device) and points > limit:
        pytest.skip(f"{points} points are too slow for Triton's CPU interpreter (TRITON_INTERPRET=1): this case "
                    "runs compiled on a GPU (`pytest -m gpu`, device cuda)")


def keops_formula(backend: str, compiled: bool, what: str) -> None:
    """Skips a KeOps case that would compile a formula outside the suite's set (see KEOPS_ALL)."""
    if backend == "keops" and not compiled and not KEOPS_ALL:
        pytest.skip(f"KeOps would compile another formula for {what} (~15 s with g++ on 2 cores, then cached): "
                    "the suite keeps KeOps to a fixed set; FASTLDDMM_TEST_KEOPS_ALL=1 runs it")
