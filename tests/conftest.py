"""Shared test helpers: assert_close that says where tensors disagree, flow parameters, devices."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

# Without a GPU, the Triton kernels are tested in Triton's CPU interpreter. The variable must be set
# before triton is first imported (triton builds tl.sum & co. at import), hence here, before fastlddmm.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastlddmm import dispatch


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


def random_points(*shape: int, dtype=torch.float64, device="cpu", seed: int = 1, requires_grad: bool = False) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def backend_device(backend: str) -> torch.device:
    """Where a backend's tensors live: 'cuda' needs a GPU, 'triton' uses one when there is one."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def require_backend(backend: str) -> None:
    """Skips (saying what would make the test run) unless ``backend`` is usable here."""
    st = dispatch.status(backend)
    if not st.available:
        pytest.skip(f"backend {backend!r} unavailable: {st.reason}")
