"""GeomLoss's ``SamplesLoss`` with fastlddmm underneath: change one import line.

    from geomloss import SamplesLoss            # before
    from fastlddmm.compat import SamplesLoss    # after

Same constructor, same call forms (``L(x, y)``, ``L(a, x, b, y)``, plain ``(N, D)`` or batched
``(B, N, D)``), same values and gradients as GeomLoss's exact backends ("tensorized"/"online").
Conventions followed (read from GeomLoss 0.3.1, ``geomloss/_legacy``):

* ``L(x, y)``: uniform weights 1/N, 1/M. Weights may be ``(N,)``/``(N, 1)`` or ``(B, N)``/``(B, N, 1)``.
* Output: a scalar for ``(N, D)`` inputs, a ``(B,)`` vector for batched ones. With
  ``potentials=True``, the pair ``(F, G)``: ``(B, N)``, ``(B, M)`` for batched inputs, and
  ``(1, N)``, ``(1, M)`` for plain ``(N, D)`` ones — not ``(N,)``: GeomLoss's documentation says
  "the shape of the weights", but its tensorized and online backends add a batch axis of 1 before
  ``F.view_as(α)``, and code written against GeomLoss sees ``(1, N)``; we return what it returns.
* ``"sinkhorn"``: fl.sinkhorn / fl.sinkhorn_potentials (cost |x - y|^p / p, eps = blur^p,
  rho = reach^p, ε-scaling from the diameter of all the points, debias, potentials
  (f_ba - f_aa, g_ab - g_bb) or (f_ba, g_ab)).
* ``"energy"``, ``"gaussian"``, ``"laplacian"``: the kernel norm ½|α - β|²_k =
  ½ αᵀK_xxα + ½ βᵀK_yyβ - αᵀK_xyβ with k(x, y) = -|x - y| (energy),
  exp(-|x - y|² / 2 blur²) (gaussian), exp(-|x - y| / blur) (laplacian). As GeomLoss's
  "tensorized" backend, the Euclidean distances under a square root are floored:
  |x - y| is computed as sqrt(max(|x - y|², 1e-8)) for energy and blur·sqrt(max(|x - y|²/blur², 1e-8))
  for laplacian, so coincident points count as 1e-4 apart (and have a zero gradient), not 0.
  (GeomLoss's "online" KeOps backend does not floor: its values differ from its own
  "tensorized" ones by ~1e-4·Σα_i²; we follow "tensorized" on every backend.) Potentials:
  (K_xxα - K_xyβ, K_yyβ - K_yxα). Gradients are the exact gradients of that value
  (GeomLoss's double-gradient trick computes the same thing for a symmetric kernel).

Backends (``backend=``), GeomLoss name -> fastlddmm:
  "auto"        -> "auto": dense while the problem is small, KeOps for large clouds (exact either
                  way; GeomLoss's own "auto" switches to its *approximate* "multiscale" scheme for
                  Sinkhorn with N·M > 10⁸, D <= 3, p = 2: there our values are the exact ones)
  "tensorized"  -> "reference" (dense PyTorch)
  "online"      -> "keops"
  "multiscale"  -> "keops" only where GeomLoss's multiscale is itself exact (kernel losses with
                  ``truncate=None``, and the energy distance, which is never truncated); otherwise
                  (Sinkhorn's coarse-to-fine iterations on cluster centroids, kernel truncation)
                  an error: we do not reproduce that approximation.
  fastlddmm's own names ("reference", "keops", "triton", and any backend of the soft-min op in
  fastlddmm/dispatch.py) are accepted too.

``"hausdorff"`` — works here, not in GeomLoss: GeomLoss 0.2/0.3 documents it ("Weighted Hausdorff
distance, which interpolates between the ICP loss (blur=0) and a kernel distance (blur=+∞)") but its
routine table sends it to the kernel loss with no kernel, and every call raises ``KeyError: None``
(jeanfeydy/geomloss#70, open). So there are no GeomLoss values to match; we implement the authors'
definition H_eps(α, β) = ½ <α - β, ∇F_eps(α) - ∇F_eps(β)>, F_eps(α) = -½ OT_eps(α, α) (formula, sources,
limits and gradient in fastlddmm.compat.hausdorff), with GeomLoss's p, blur (eps = blur^p), scaling and
diameter (both only steer the ε-scaling towards the converged potentials: the value does not depend on
them), on every soft-min backend. ``reach`` and ``potentials=True`` raise for it; ``debias`` and
``truncate`` do not apply to it and are ignored, as GeomLoss ignores them outside "sinkhorn"/multiscale.

Not supported, each raising ``NotImplementedError`` that names the option (never a silent
substitute): a custom ``cost`` (formula string or callable), a custom ``kernel``, ``cluster_scale``,
cluster labels (the six-argument call form), ``diameter`` for "sinkhorn" (it changes the
ε-scaling start; fl.sinkhorn derives it from the data), ``truncate`` other than 5 or None where it
could matter (``backend="multiscale"``, or "auto" with "sinkhorn": GeomLoss ignores it elsewhere),
``backend="multiscale"`` for "sinkhorn" and "hausdorff", and ``reach`` / ``potentials=True`` for "hausdorff".
``verbose`` only printed multiscale diagnostics in GeomLoss: accepted, prints nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..distances import sinkhorn as _fl_sinkhorn
from ..distances import sinkhorn_potentials as _fl_sinkhorn_potentials
from .. import dispatch
from ..ops import kernel_sum as _kernel_sum
from ..ops.kernel_sum import KERNELS as KERNEL_LOSSES
from ..ops.softmin import softmin_for
from . import hausdorff as _hausdorff

LOSSES = ("sinkhorn", "hausdorff", "energy", "gaussian", "laplacian")
GEOMLOSS_BACKENDS = ("auto", "tensorized", "online", "multiscale")
# GeomLoss's names, then fastlddmm's own backends of the soft-min and kernel-sum ops, passed on as they are
# (fastlddmm.dispatch says whether they can run here; "triton": the streaming soft-min kernels, CUDA or
# TRITON_INTERPRET=1). A soft-min backend added to the table is accepted here with no change.
_FL_NAMES = tuple(dict.fromkeys((*dispatch.backends_for("softmin"), *dispatch.backends_for("kernel_sum"))))
_BACKEND_MAP = {"auto": "auto", "tensorized": "reference", "online": "keops", **{name: name for name in _FL_NAMES}}

_DEFAULT_TRUNCATE = 5


# ------------------------------------------------------------------------------------------------
# Kernel norms, on the kernel_sum op (fastlddmm/ops/kernel_sum)
# ------------------------------------------------------------------------------------------------


def _half_with_double_grad(t: Tensor) -> Tensor:
    """Value t/2, gradient that of t: the half of a symmetric quadratic form αᵀK(x, x̄)α whose
    right-hand copies (x̄, α) were detached: its exact gradient is twice the one-sided one."""
    return t - 0.5 * t.detach()


def kernel_loss(
    name: str,
    a: Tensor,  # (B, N)
    x: Tensor,  # (B, N, D)
    b: Tensor,  # (B, M)
    y: Tensor,  # (B, M, D)
    blur: float,
    backend: str = "auto",
) -> Tensor:  # (B,)
    """½ αᵀK_xxα + ½ βᵀK_yyβ - αᵀK_xyβ, GeomLoss's kernel norm, on the kernel_sum backend of ``backend``."""
    impl = _kernel_sum.implementation(backend, x, y)
    apply = impl.kernel_sum
    a_x = apply(name, x, x.detach(), a.detach(), blur)  # (B, N)
    b_y = apply(name, y, y.detach(), b.detach(), blur)  # (B, M)
    xx = _half_with_double_grad((a * a_x).sum(-1))
    yy = _half_with_double_grad((b * b_y).sum(-1))
    if impl.DIFFERENTIATES_Y:
        return xx + yy - (a * apply(name, x, y, b, blur)).sum(-1)
    # KeOps: αᵀK(x, y)β differentiated through its "i" variable only, once from each side, so that
    # every gradient is the one compiled formula d/dx_i (a gradient in y_j would be a second one).
    xy = (a * apply(name, x, y.detach(), b.detach(), blur)).sum(-1)  # value; gradient in x and α
    yx = (b * apply(name, y, x.detach(), a.detach(), blur)).sum(-1)  # gradient in y and β
    return xx + yy - (xy + (yx - yx.detach()))


def kernel_potentials(
    name: str,
    a: Tensor,  # (B, N)
    x: Tensor,  # (B, N, D)
    b: Tensor,  # (B, M)
    y: Tensor,  # (B, M, D)
    blur: float,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # (B, N), (B, M)
    """GeomLoss's kernel "potentials": (K_xxα - K_xyβ, K_yyβ - K_yxα), the gradients in α and β."""
    apply = _kernel_sum.implementation(backend, x, y).kernel_sum
    f = apply(name, x, x, a, blur) - apply(name, x, y, b, blur)
    g = apply(name, y, y, b, blur) - apply(name, y, x, a, blur)
    return f, g


# ------------------------------------------------------------------------------------------------
# SamplesLoss
# ------------------------------------------------------------------------------------------------


class SamplesLoss(torch.nn.Module):
    """Drop-in for ``geomloss.SamplesLoss``: same arguments, call forms, values and gradients.

    See the module docstring for the conventions, the backend mapping and the options that raise.
    """

    def __init__(
        self,
        loss: str = "sinkhorn",
        p: int = 2,
        blur: float = 0.05,
        reach: float | None = None,
        diameter: float | None = None,
        scaling: float = 0.5,
        truncate: float | None = 5,
        cost=None,
        kernel=None,
        cluster_scale: float | None = None,
        debias: bool = True,
        potentials: bool = False,
        verbose: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if loss == "hausdorff" and reach is not None:
            raise NotImplementedError(
                f"reach={reach!r} is not supported for loss='hausdorff': the Hausdorff divergence implemented here is "
                "the balanced one of Feydy et al. (AISTATS 2019); leave reach=None"
            )
        if loss == "hausdorff" and potentials:
            raise NotImplementedError(
                "potentials=True is not supported for loss='hausdorff': GeomLoss never defined its Hausdorff "
                "potentials (its SamplesLoss('hausdorff') does not run, jeanfeydy/geomloss#70); differentiate the "
                "value with respect to the weights instead"
            )
        if cost is not None:
            raise NotImplementedError(
                f"cost={cost!r} is not supported by fastlddmm.compat.SamplesLoss: only GeomLoss's default cost "
                "|x - y|^p / p (p = 1 or 2) is implemented; leave cost=None"
            )
        if kernel is not None:
            raise NotImplementedError(
                "kernel=... is not supported by fastlddmm.compat.SamplesLoss: only the built-in kernels of "
                f"loss={KERNEL_LOSSES} are implemented; leave kernel=None"
            )
        if cluster_scale is not None:
            raise NotImplementedError(
                f"cluster_scale={cluster_scale!r} is not supported: it tunes GeomLoss's approximate 'multiscale' "
                "backend, which fastlddmm does not reproduce; leave cluster_scale=None"
            )
        if backend not in _BACKEND_MAP and backend != "multiscale":
            raise ValueError(f"backend must be one of {GEOMLOSS_BACKENDS} (or fastlddmm's {_FL_NAMES}), got {backend!r}")
        exact_multiscale = loss == "energy" or (loss in KERNEL_LOSSES and truncate is None)
        if backend == "multiscale" and not exact_multiscale:
            raise NotImplementedError(
                f'backend="multiscale" is not supported for loss={loss!r}{"" if loss in ("sinkhorn", "hausdorff") else f" with truncate={truncate!r}"}: '
                "GeomLoss's multiscale scheme clusters the points and truncates the kernel (an approximation that "
                'fastlddmm does not reproduce); use backend="auto" or "online" for the exact values on KeOps'
            )
        # Truncation only acts inside GeomLoss's multiscale routines: named, or picked by its "auto" for
        # large Sinkhorn problems. Elsewhere GeomLoss ignores it, and so do we.
        could_truncate = backend == "multiscale" or (backend == "auto" and loss == "sinkhorn")
        if could_truncate and truncate not in (_DEFAULT_TRUNCATE, None):
            raise NotImplementedError(
                f"truncate={truncate!r} is not supported: kernel truncation belongs to GeomLoss's approximate "
                "'multiscale' backend, which fastlddmm does not reproduce (its values are always exact); leave "
                f"truncate={_DEFAULT_TRUNCATE} or None"
            )
        if diameter is not None and loss == "sinkhorn":
            raise NotImplementedError(
                f"diameter={diameter!r} is not supported for loss='sinkhorn': fastlddmm starts the ε-scaling at the "
                "diameter of the data, as GeomLoss does with diameter=None; leave diameter=None"
            )
        if loss in ("sinkhorn", "hausdorff") and p not in (1, 2):
            raise ValueError(f"p must be 1 or 2 for loss={loss!r}, got {p!r}")
        self.loss = loss
        self.p = p
        self.blur = blur
        self.reach = reach
        self.diameter = diameter
        self.scaling = scaling
        self.truncate = truncate
        self.cost = cost
        self.kernel = kernel
        self.cluster_scale = cluster_scale
        self.debias = debias
        self.potentials = potentials
        self.verbose = verbose
        self.backend = backend

    def extra_repr(self) -> str:
        return f"loss={self.loss!r}, p={self.p}, blur={self.blur}, reach={self.reach}, backend={self.backend!r}"

    # -- arguments ------------------------------------------------------------------------------

    @staticmethod
    def _uniform(x: Tensor) -> Tensor:  # (N, D) -> (N,), (B, N, D) -> (B, N)
        return x.new_full(x.shape[:-1], 1.0 / x.shape[-2])

    def _process_args(self, args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if len(args) == 6:
            raise NotImplementedError(
                "the six-argument form L(l_x, α, x, l_y, β, y) (cluster labels) is not supported: labels drive "
                "GeomLoss's approximate 'multiscale' backend; call L(α, x, β, y)"
            )
        if len(args) == 4:
            a, x, b, y = args
        elif len(args) == 2:
            x, y = args
            if not isinstance(x, Tensor) or not isinstance(y, Tensor):
                raise TypeError("x and y must be torch.Tensor")
            a, b = self._uniform(x), self._uniform(y)
        else:
            raise ValueError("SamplesLoss accepts two (x, y) or four (α, x, β, y) arguments")
        for t, name in ((a, "α"), (x, "x"), (b, "β"), (y, "y")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() not in (2, 3) or y.dim() != x.dim():
            raise ValueError(f"x and y must both be (N, D) or both be (B, N, D), got {tuple(x.shape)} and {tuple(y.shape)}")
        # GeomLoss also takes (N, 1) / (B, N, 1) weights.
        a = a.squeeze(-1) if a.dim() == x.dim() and a.shape[-1] == 1 else a
        b = b.squeeze(-1) if b.dim() == y.dim() and b.shape[-1] == 1 else b
        if a.shape != x.shape[:-1]:
            raise ValueError(f"α must have shape {tuple(x.shape[:-1])} (or with a trailing 1), got {tuple(a.shape)}")
        if b.shape != y.shape[:-1]:
            raise ValueError(f"β must have shape {tuple(y.shape[:-1])} (or with a trailing 1), got {tuple(b.shape)}")
        return a, x, b, y

    def _fl_backend(self, x: Tensor, y: Tensor) -> str:
        if self.backend == "multiscale":  # only reached where multiscale is exact (see __init__)
            return "keops"
        return _BACKEND_MAP[self.backend]  # "auto": fastlddmm.dispatch decides, for every loss

    # -- forward --------------------------------------------------------------------------------

    def forward(self, *args):
        a, x, b, y = self._process_args(args)
        backend = self._fl_backend(x, y)
        if self.loss == "sinkhorn":
            kw = dict(a=a, b=b, blur=self.blur, p=self.p, scaling=self.scaling, reach=self.reach,
                      debias=self.debias, backend=backend)
            if self.potentials:
                f, g = _fl_sinkhorn_potentials(x, y, **kw)
                return (f, g) if x.dim() == 3 else (f.unsqueeze(0), g.unsqueeze(0))  # GeomLoss: (1, N)
            return _fl_sinkhorn(x, y, **kw)

        if self.loss != "hausdorff" and backend not in ("auto", "reference", "keops"):
            raise ValueError(f"backend {backend!r} has no kernel loss; use 'auto', 'tensorized' or 'online'")
        if x.dtype != y.dtype or a.dtype != x.dtype or b.dtype != y.dtype:
            raise TypeError(f"α, x, β, y must share one dtype, got {a.dtype}, {x.dtype}, {b.dtype}, {y.dtype}")
        if x.shape[-1] != y.shape[-1]:
            raise ValueError(f"x and y must have the same point dimension D, got {x.shape[-1]} and {y.shape[-1]}")
        batched = x.dim() == 3
        if not batched:
            a, x, b, y = a.unsqueeze(0), x.unsqueeze(0), b.unsqueeze(0), y.unsqueeze(0)
        elif x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}")
        if self.loss == "hausdorff":  # on the soft-min op: every soft-min backend runs it
            softmin = softmin_for(backend, x, y, self.p)
            value = _hausdorff.divergence(softmin, x, y, a, b, self.blur, self.p, self.scaling, self.diameter)
            return value if batched else value[0]
        if self.potentials:
            return kernel_potentials(self.loss, a, x, b, y, self.blur, backend)  # (B, N), (B, M); B = 1 if not batched
        value = kernel_loss(self.loss, a, x, b, y, self.blur, backend)
        return value if batched else value[0]
