"""fastlddmm: diffeomorphic registration of large point clouds (ResNet-LDDMM), with fused kernels
for the residual Euler flow and exact Chamfer / Sinkhorn distances."""

from . import ops, reference
from .dispatch import BackendUnavailableError, backends
from .distances import chamfer, nearest, sinkhorn, sinkhorn_potentials, sinkhorn_projection
from .flow import ResNetFlow
from .registration import Registration, RegistrationDiverged, register
from .pairwise import shape_distances

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "Registration", "RegistrationDiverged", "ResNetFlow", "__version__", "backends",
    "chamfer", "nearest", "ops", "reference", "register", "shape_distances", "sinkhorn", "sinkhorn_potentials", "sinkhorn_projection",
]
