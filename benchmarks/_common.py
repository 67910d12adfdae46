"""Shared helpers of the asv suite: inputs built outside the timings, backends skipped cleanly."""

import torch

import fastlddmm as fl


def require_backend(name: str, device: str = "cpu") -> None:
    """asv skips a benchmark whose setup raises NotImplementedError: do that for unusable backends."""
    if device == "cuda" and not torch.cuda.is_available():
        raise NotImplementedError("no CUDA GPU here")
    status = fl.backends()[name] if name != "auto" else None
    if status is not None and not status.available:
        raise NotImplementedError(f"backend {name!r} unavailable: {status.reason}")
    if name == "triton" and device == "cpu":
        raise NotImplementedError("Triton on the CPU is the (slow) interpreter: not benchmarked")


def flow_inputs(n: int, width: int, layers: int, dim: int = 3, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    w1 = torch.randn(layers, width, dim, generator=g, dtype=dtype) / dim**0.5
    b1 = torch.randn(layers, width, generator=g, dtype=dtype) * 0.1
    w2 = torch.randn(layers, dim, width, generator=g, dtype=dtype) / width**0.5
    b2 = torch.randn(layers, dim, generator=g, dtype=dtype) * 0.1
    return [t.to(device) for t in (x, w1, b1, w2, b2)]


def clouds(n: int, m: int, dim: int = 3, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    y = torch.randn(m, dim, generator=g, dtype=dtype) * 0.8 + 0.3
    return x.to(device), y.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
