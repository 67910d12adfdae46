"""Input checks shared by the public entry points: errors say, in the user's words, what is wrong."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_points(t, name: str, *, allow_batch: bool = True, allow_empty: bool = False, finite: bool = True) -> Tensor:
    """``t`` must be a float32/float64 tensor of shape (N, D) (or (B, N, D) when allow_batch)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype} (convert with {name}.float() or .double())")
    shapes = "(N, D) or (B, N, D)" if allow_batch else "(N, D)"
    if t.dim() not in ((2, 3) if allow_batch else (2,)):
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} has zero coordinates per point (shape {tuple(t.shape)})")
    if not allow_empty and t.shape[-2] == 0:
        raise ValueError(f"{name} is an empty point cloud (shape {tuple(t.shape)})")
    if finite and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return t


def check_pair(x: Tensor, y: Tensor, xname: str = "x", yname: str = "y") -> None:
    """x and y: same dimension D, same batching, dtype and device."""
    if x.dim() != y.dim():
        raise ValueError(f"{xname} and {yname} must both be batched (B, N, D) or both not, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{xname} and {yname} must have the same point dimension D, got {x.shape[-1]} and {y.shape[-1]}")
    if x.dim() == 3 and x.shape[0] != y.shape[0]:
        raise ValueError(f"{xname} and {yname} must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
    if x.dtype != y.dtype:
        raise TypeError(f"{xname} and {yname} must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.device != y.device:
        raise ValueError(f"{xname} and {yname} must be on the same device, got {x.device} and {y.device}")


def check_lengths(lengths, name: str, points: Tensor) -> Tensor | None:
    """Per-item lengths (B,) for batched points (B, N, D): integers in [1, N]."""
    if lengths is None:
        return None
    if points.dim() != 3:
        raise ValueError(f"{name} is only meaningful for batched (B, N, D) inputs")
    lengths = torch.as_tensor(lengths, device=points.device)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {lengths.dtype}")
    if lengths.shape != (points.shape[0],):
        raise ValueError(f"{name} must have shape ({points.shape[0]},), got {tuple(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > points.shape[1]):
        raise ValueError(f"{name} must lie in [1, {points.shape[1]}], got values in [{int(lengths.min())}, {int(lengths.max())}]")
    return lengths.to(torch.int64)


def check_weights(w, name: str, points: Tensor) -> Tensor | None:
    """Non-negative weights of shape points.shape[:-1], positive total mass."""
    if w is None:
        return None
    if not isinstance(w, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    if w.shape != points.shape[:-1]:
        raise ValueError(f"{name} must have shape {tuple(points.shape[:-1])}, got {tuple(w.shape)}")
    if w.dtype != points.dtype or w.device != points.device:
        raise TypeError(f"{name} must have the dtype and device of its points ({points.dtype}, {points.device})")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative")
    if bool((w.sum(-1) <= 0).any()):
        raise ValueError(f"{name} must have a positive total mass")
    return w


def check_positive(value, name: str, *, allow_none: bool = False, integer: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a {'positive integer' if integer else 'positive number'}, got {value!r}")
    if integer and not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return value


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
