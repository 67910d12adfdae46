"""Pure-PyTorch references: readable, float64-capable, differentiable by autograd. The ground truth."""

from .distances import chamfer, l2, nearest, squared_distances
from .flow import ACTIVATIONS, euler_flow, trajectory, velocity
from .sinkhorn import sinkhorn

__all__ = ["ACTIVATIONS", "chamfer", "euler_flow", "l2", "nearest", "sinkhorn", "squared_distances", "trajectory", "velocity"]
