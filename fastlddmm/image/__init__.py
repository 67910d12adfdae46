"""Image registration with multistep neural networks (the icon_registration way).

A network Φθ(moving, fixed) predicts a displacement field; the transform it stands for warps the
moving image onto the fixed one. Training minimises similarity(moving ∘ φ, fixed) + λ·regulariser
on image pairs alone. Steps compose: each step sees the image warped by the previous ones.

Conventions (details in fastlddmm.image.transforms): maps are coordinate tensors (B, dim, *spatial)
in the unit box [0, 1]^dim, coordinate i along spatial axis i, pixel centres on linspace(0, 1, n);
``transforms.sample`` is the single place that converts to grid_sample's [-1, 1] convention.
Transforms are callables on coordinate tensors; Compose(φ, ψ)(x) = φ(ψ(x)) exactly.
``multistep(net, steps=K)`` applies one network K times (shared weights); ``multistep([net_1, ...])``
gives each step its own network.
"""

from . import losses, transforms
from .losses import (diffusion, folds_fraction, icon_diffusion_weight, inverse_consistency, jacobian_determinant, lncc,
                     ssd)
from .steps import TwoStep, multistep, registration_loss, step_networks, step_transforms, train
from .networks import MLP, DisplacementNet, UNet
from .transforms import Affine, Compose, DisplacementField, Identity, Transform, identity_map, sample, warp

__all__ = [
    "MLP", "Affine", "Compose", "DisplacementField", "DisplacementNet", "Identity", "Transform", "TwoStep",
    "UNet", "diffusion", "folds_fraction", "icon_diffusion_weight", "identity_map", "inverse_consistency",
    "jacobian_determinant", "lncc", "losses", "multistep", "registration_loss", "sample", "ssd", "step_networks",
    "step_transforms", "train",
    "transforms", "warp",
]
