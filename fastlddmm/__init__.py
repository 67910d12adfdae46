"""fastlddmm: diffeomorphic registration of large point clouds (ResNet-LDDMM), with fused kernels
for the residual Euler flow and exact Chamfer / Sinkhorn distances."""

from . import ops, reference
from ._backend import BackendUnavailableError, backends
from .flow import ResNetFlow
from .registration import Registration, RegistrationDiverged, register

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "Registration", "RegistrationDiverged", "ResNetFlow", "register", "backends", "ops", "reference", "__version__"]
