"""Networks Φθ(moving, fixed) -> Transform: they predict a displacement field on the image grid.

Both networks end in a zero-initialised layer, so an untrained network is the identity map and
training starts from "no deformation". Displacements are in unit-box units (see transforms.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .transforms import DisplacementField


class DisplacementNet(nn.Module):
    """Base class: ``forward(moving, fixed)`` returns a :class:`DisplacementField` on the images' grid.

    Subclasses implement ``displacement(moving, fixed) -> (B, dim, *spatial)``.
    """

    dim: int

    def displacement(self, moving: Tensor, fixed: Tensor) -> Tensor:
        raise NotImplementedError

    def _check(self, moving: Tensor, fixed: Tensor) -> None:
        if not isinstance(moving, Tensor) or not isinstance(fixed, Tensor):
            raise TypeError("moving and fixed must be torch.Tensors (B, C, *spatial)")
        if moving.shape != fixed.shape:
            raise ValueError(f"moving and fixed must have the same shape, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
        if moving.dim() != self.dim + 2:
            raise ValueError(f"{type(self).__name__} is {self.dim}D: images must have shape (B, C, *spatial) with "
                             f"{self.dim} spatial axes, got {tuple(moving.shape)}")

    def forward(self, moving: Tensor,  # (B, C, *spatial)
                fixed: Tensor,  # (B, C, *spatial)
                ) -> DisplacementField:
        self._check(moving, fixed)
        return DisplacementField(self.displacement(moving, fixed))


class MLP(DisplacementNet):
    """A fully connected network: flattened (moving, fixed) -> hidden -> ... -> displacement field.

    The kind of network icon_registration's multistep experiment iterates (its ``FCNet(28)`` has hidden
    layers of 8000 and 3000, 41 M parameters, and zero-initialises only the last layer's weight, so an
    untrained FCNet shifts every image by its random last-layer bias). Here the widths are a parameter
    (two hidden layers of 50 ReLU units by default) and the last layer's weight *and* bias start at
    zero: an untrained MLP is exactly the identity map, however many times it is applied.

    Args:
        shape: spatial shape of the images, e.g. (28, 28) (2D) or (D, H, W) (3D).
        channels: image channels C.
        hidden: widths of the hidden layers.
    """

    def __init__(self, shape=(28, 28), channels: int = 1, hidden=(50, 50)):
        super().__init__()
        shape = tuple(int(n) for n in shape)
        if len(shape) not in (2, 3) or any(n < 2 for n in shape):
            raise ValueError(f"shape must be a 2D or 3D spatial shape with sizes ≥ 2, got {shape}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        hidden = tuple(int(h) for h in hidden)
        if not hidden or any(h < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty tuple of positive widths, got {hidden}")
        self.shape, self.channels, self.dim = shape, channels, len(shape)
        pixels = math.prod(shape)
        widths = (2 * channels * pixels, *hidden)
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        last = nn.Linear(widths[-1], self.dim * pixels)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def _check(self, moving, fixed):
        super()._check(moving, fixed)
        if tuple(moving.shape[1:]) != (self.channels, *self.shape):
            raise ValueError(f"MLP built for images ({self.channels}, *{self.shape}), got {tuple(moving.shape[1:])}")

    def displacement(self, moving, fixed):
        x = torch.cat([moving.flatten(1), fixed.flatten(1)], dim=1)
        return self.net(x).view(moving.shape[0], self.dim, *self.shape)


class UNet(DisplacementNet):
    """A small U-Net on the channel-stacked pair: conv blocks, stride-2 downsampling, skip connections.

    Works for any image size (upsampled features are resized to their skip's shape). The output
    convolution is zero-initialised (identity map).

    Args:
        dim: 2 or 3.
        channels: image channels C (the input has 2C channels).
        features: channels per level, coarsest last; len(features) - 1 downsamplings.
    """

    def __init__(self, dim: int = 2, channels: int = 1, features=(16, 32, 32)):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        features = tuple(int(f) for f in features)
        if not features or any(f < 1 for f in features):
            raise ValueError(f"features must be a non-empty tuple of positive channel counts, got {features}")
        self.dim, self.channels = dim, channels
        conv = nn.Conv2d if dim == 2 else nn.Conv3d

        def block(c_in, c_out, stride=1):
            return nn.Sequential(conv(c_in, c_out, 3, stride=stride, padding=1), nn.LeakyReLU(0.2))

        self.inc = block(2 * channels, features[0])
        self.down = nn.ModuleList(block(a, b, stride=2) for a, b in zip(features[:-1], features[1:]))
        # up[k] fuses the upsampled level k+1 with the skip of level k.
        self.up = nn.ModuleList(block(features[k + 1] + features[k], features[k]) for k in range(len(features) - 1))
        self.out = conv(features[0], dim, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def displacement(self, moving, fixed):
        x = self.inc(torch.cat([moving, fixed], dim=1))
        skips = [x]
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = skips.pop()
        for k in reversed(range(len(self.up))):
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear" if self.dim == 2 else "trilinear",
                              align_corners=False)
            x = self.up[k](torch.cat([x, skip], dim=1))
        return self.out(x)
