"""Fused, differentiable ops (autograd functions and torch.library custom ops)."""

from .euler_flow import euler_flow

__all__ = ["euler_flow"]
