"""Similarities, regularisers and the fold metric of image registration (2D and 3D).

Maps are unit-box coordinate tensors (B, dim, *spatial) (see fastlddmm.image.transforms): spatial
derivatives are taken by forward differences divided by the grid spacing 1 / (n_i - 1), so they
are derivatives in unit-box coordinates and do not change with the resolution of the grid.

Every function returns per-item values (B,) with ``reduction="none"`` and their mean with the
default ``reduction="mean"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .transforms import Transform, identity_map, spacing

_REDUCTIONS = ("mean", "none")


def _reduce(per_item: Tensor, reduction: str) -> Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    return per_item.mean() if reduction == "mean" else per_item


def _check_images(a: Tensor, b: Tensor, aname: str, bname: str) -> None:
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise TypeError(f"{aname} and {bname} must be torch.Tensors")
    if a.shape != b.shape:
        raise ValueError(f"{aname} and {bname} must have the same shape (B, C, *spatial), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dim() not in (4, 5):
        raise ValueError(f"{aname} must be a 2D (B, C, H, W) or 3D (B, C, D, H, W) image batch, got {tuple(a.shape)}")


def _check_map(phi: Tensor, name: str = "phi") -> int:
    if not isinstance(phi, Tensor):
        raise TypeError(f"{name} must be a map tensor (B, dim, *spatial); sample a Transform first with "
                        f"phi.on_grid(shape, batch=B)")
    dim = phi.dim() - 2
    if dim not in (2, 3) or phi.shape[1] != dim:
        raise ValueError(f"{name} must have shape (B, dim, *spatial) with dim = 2 or 3 spatial axes, got {tuple(phi.shape)}")
    return dim


def ssd(warped: Tensor,  # (B, C, *spatial)
        fixed: Tensor,  # (B, C, *spatial)
        *, reduction: str = "mean") -> Tensor:
    """Sum of squared differences, averaged over pixels and channels (so it does not grow with size)."""
    _check_images(warped, fixed, "warped", "fixed")
    return _reduce((warped - fixed).square().flatten(1).mean(1), reduction)


def lncc(warped: Tensor,  # (B, C, *spatial)
         fixed: Tensor,  # (B, C, *spatial)
         *, window: int = 5, eps: float = 1e-5, reduction: str = "mean") -> Tensor:
    """Local normalised cross-correlation *loss*: 1 - mean over windows of cov / sqrt(var_a var_b + eps).

    Means, variances and covariance are box averages over ``window`` pixels per axis (only windows
    fully inside the image). Zero for images equal up to a local affine change of intensity (in
    windows with contrast); at most 2. ``eps`` keeps flat windows (background) finite.
    """
    _check_images(warped, fixed, "warped", "fixed")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")
    if any(n < window for n in warped.shape[2:]):
        raise ValueError(f"window ({window}) is larger than the image {tuple(warped.shape[2:])}")
    pool = F.avg_pool2d if warped.dim() == 4 else F.avg_pool3d

    def mean(t):
        return pool(t, window, stride=1)

    ma, mb = mean(warped), mean(fixed)
    var_a = (mean(warped * warped) - ma * ma).clamp_min(0)
    var_b = (mean(fixed * fixed) - mb * mb).clamp_min(0)
    cov = mean(warped * fixed) - ma * mb
    cc = cov / torch.sqrt(var_a * var_b + eps)
    return _reduce(1.0 - cc.flatten(1).mean(1), reduction)


def _forward_differences(u: Tensor) -> list[Tensor]:
    """∂u/∂x_a for each spatial axis a (forward differences / spacing), each (B, C, *spatial) minus 1 along a."""
    h = spacing(u.shape[2:])
    return [u.diff(dim=2 + a) / h[a] for a in range(u.dim() - 2)]


def diffusion(phi: Tensor,  # (B, dim, *spatial) map on the pixel grid
              *, reduction: str = "mean") -> Tensor:
    """Diffusion regulariser: mean over the grid of |∇u|_F² with u = phi - identity.

    Zero for every translation (u constant); derivatives in unit-box coordinates.
    """
    _check_map(phi)
    u = phi - identity_map(phi.shape[2:], batch=phi.shape[0], dtype=phi.dtype, device=phi.device)
    per_item = sum(d.square().sum(1).flatten(1).mean(1) for d in _forward_differences(u))
    return _reduce(per_item, reduction)


def icon_diffusion_weight(lmbda: float, shape) -> float:
    """The weight ``lam`` of :func:`diffusion` that gives icon_registration's diffusion objective.

    icon_registration's ``DiffusionRegularizedNet(net, SSD(), lmbda)`` minimises
    ``2 · SSD + lmbda · D_icon`` with ``D_icon = n_0² · Σ_axes mean(Δu²)`` (forward differences of
    u = phi - id, each mean over batch, coordinates and cells, scaled by the first axis' size n_0,
    not by the spacing). Here ``diffusion = Σ_axes Σ_coords mean((Δu / h_a)²)`` with h_a = 1 / (n_a - 1),
    so for a square grid ``D_icon = n² / (dim · (n - 1)²) · diffusion``, and minimising
    ``ssd + lam · diffusion`` is the same problem (Adam does not see the overall factor 2) for
    ``lam = lmbda · D_icon / (2 · diffusion)``. For 28×28 images and lmbda = 0.05: lam ≈ 0.0134.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or any(n < 2 for n in shape) or len(set(shape)) != 1:
        raise ValueError(f"shape must be a square (2D) or cubic (3D) grid with sides >= 2, got {shape}")
    n, dim = shape[0], len(shape)
    return float(lmbda) * n * n / (2.0 * dim * (n - 1) ** 2)


def inverse_consistency(phi_ab: Transform, phi_ba: Transform, shape, *, batch: int,
                        dtype=torch.float32, device=None, reduction: str = "mean") -> Tensor:
    """|Φ[A,B] ∘ Φ[B,A](x) - x|², summed over coordinates, averaged over the grid of ``shape``.

    In squared unit-box units (divide by spacing² for pixels²). Zero when the two are inverses.
    """
    x = identity_map(shape, batch=batch, dtype=dtype, device=device)
    return _reduce((phi_ab(phi_ba(x)) - x).square().sum(1).flatten(1).mean(1), reduction)


def jacobian_determinant(phi: Tensor) -> Tensor:  # (B, dim, *spatial) -> (B, *(spatial - 1))
    """det ∇phi by forward differences, on the cells of the grid (each axis one shorter).

    1 for the identity; ≤ 0 where the map folds.
    """
    _check_map(phi)
    diffs = _forward_differences(phi)
    crop = tuple(slice(0, n - 1) for n in phi.shape[2:])
    # jac[..., i, a] = ∂phi_i / ∂x_a
    jac = torch.stack([d[(slice(None), slice(None)) + crop] for d in diffs], dim=2)  # (B, dim, dim, *cells)
    jac = jac.movedim(1, -1).movedim(1, -1)  # (B, *cells, dim(a), dim(i)): the transpose, same det
    return torch.linalg.det(jac)


def folds_fraction(phi: Tensor,  # (B, dim, *spatial)
                   *, reduction: str = "mean") -> Tensor:
    """Fraction of grid cells where the Jacobian determinant of phi is ≤ 0 (folded pixels)."""
    det = jacobian_determinant(phi)
    return _reduce((det <= 0).flatten(1).to(phi.dtype).mean(1), reduction)
