"""Public distances between point clouds: fl.chamfer, fl.nearest, fl.sinkhorn (+ potentials, projection).

Inputs are (N, D) or batched (B, N, D) float32/float64 tensors on any device; all outputs are
differentiable with respect to the points (and the Sinkhorn weights), except nearest-neighbour indices.

Backends (``backend=``):
  "reference"  dense PyTorch (fastlddmm.reference): the ground truth, memory O(N·M)
  "keops"      pykeops LazyTensor reductions, memory O(N + M) (``pip install 'fastlddmm[keops]'``)
  "triton"     streaming Triton kernels (kernels/nearest.py, kernels/softmin.py), memory O(N + M):
               CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (slow; for tests)
  "auto"       picks per device and size (see _auto_nearest / _auto_sinkhorn), falls back to the
               reference with no error; it may also use scipy's exact cKDTree for large CPU clouds
               in D <= 3, or a chunked dense search.

Nearest neighbours, Chamfer: every fast path only *finds* the index j* = argmin_j |x_i - y_j|²; the
squared distance is then recomputed in PyTorch as |x_i - y_{j*}|², with the reference's formula, so
values and gradients (to x and y) are those of the reference whenever the same neighbour is found.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch
from torch import Tensor

from . import _backend
from ._validation import check_lengths, check_pair, check_points, check_positive, check_weights
from .reference import distances as _ref

# The module, not the function fastlddmm.reference.sinkhorn that shadows it as a package attribute.
_ref_sinkhorn = importlib.import_module("fastlddmm.reference.sinkhorn")

# ------------------------------------------------------------------------------------------------
# Nearest-neighbour index finders: (x (N, D), y (M, D)) -> (N,) int64, no gradient.
# ------------------------------------------------------------------------------------------------

# Bytes of the (chunk, M, D) difference block of the chunked dense search.
_CHUNK_BYTES = 32 * 2**20


def _index_reference(x: Tensor, y: Tensor) -> Tensor:  # (N, D), (M, D) -> (N,)
    return _ref.nearest(x.detach(), y.detach())[1]


def _index_chunked(x: Tensor, y: Tensor) -> Tensor:  # (N, D), (M, D) -> (N,)
    """The reference's dense argmin, a block of rows of x at a time: O(chunk·M) memory."""
    x, y = x.detach(), y.detach()
    rows = max(1, _CHUNK_BYTES // max(1, y.shape[0] * y.shape[1] * y.element_size()))
    return torch.cat([_ref.nearest(x[i : i + rows], y)[1] for i in range(0, x.shape[0], rows)])


def _index_kdtree(x: Tensor, y: Tensor) -> Tensor:  # (N, D), (M, D) -> (N,)
    """Exact search with scipy's cKDTree (float64 coordinates), all CPU cores."""
    from scipy.spatial import cKDTree

    xs = x.detach().cpu().to(torch.float64).numpy()
    ys = y.detach().cpu().to(torch.float64).numpy()
    _, index = cKDTree(ys).query(xs, k=1, workers=-1)
    return torch.from_numpy(index).to(device=x.device, dtype=torch.int64)


def _index_keops(x: Tensor, y: Tensor) -> Tensor:  # (N, D), (M, D) -> (N,)
    from .keops.chamfer import nearest_index

    return nearest_index(x, y)


def _index_triton(x: Tensor, y: Tensor) -> Tensor:  # (N, D), (M, D) -> (N,)
    from .triton_ops.nearest import nearest_index

    return nearest_index(x, y)


# Named backends with a nearest-neighbour search.
_NEAREST_INDEX: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "reference": _index_reference,
    "keops": _index_keops,
    "triton": _index_triton,
}


@functools.lru_cache(maxsize=None)
def _has_scipy() -> bool:
    import importlib.util

    return importlib.util.find_spec("scipy") is not None


# Crossovers measured on a 2-core x86 CPU, float32, D = 3, Chamfer forward + backward with one torch
# thread (benchmarks/compare_distances.py): N = M = 100: dense 1.0 ms, KeOps 1.9 ms, cKDTree 2.0 ms;
# 300: 3.7 / 2.1 / 2.4 ms; 1000: 52 / 5.8 / 4.4 ms; 3000: 930 / 82 / 9.6 ms. So: dense below ~5e4 pairs,
# then cKDTree in D <= 3 (cost ~ N log M against KeOps' N·M), KeOps in higher dimension.
_DENSE_MAX_PAIRS = 50_000
_KDTREE_MAX_DIM = 3


def _auto_nearest(x: Tensor, y: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Fastest exact index finder for one pair of clouds (N, D), (M, D) on their device."""
    pairs = x.shape[-2] * y.shape[-2]
    if x.device.type == "cpu":
        if pairs <= _DENSE_MAX_PAIRS:
            return _index_reference
        if x.shape[-1] <= _KDTREE_MAX_DIM and _has_scipy():
            return _index_kdtree
        if _backend.status("keops").available:
            return _index_keops
        return _index_chunked
    # GPU (not measured here, no GPU on the build machine): the streaming Triton search (O(N + M)
    # memory, no compilation step like KeOps'), else dense while small, KeOps beyond.
    if x.device.type == "cuda" and _backend.status("triton").available:
        return _index_triton
    if pairs <= 16 * _DENSE_MAX_PAIRS:
        return _index_reference
    if _backend.status("keops").available:
        return _index_keops
    return _index_chunked


def _index_finder(backend: str, device: torch.device, op: str) -> Callable[[Tensor, Tensor], Tensor] | None:
    """The index finder of a named backend (None for "auto"), or a clear BackendUnavailableError."""
    _backend.check_name(backend)
    if backend == "auto":
        return None
    _backend.require(backend, device=device)
    if backend not in _NEAREST_INDEX:
        raise _backend.BackendUnavailableError(
            f"backend {backend!r} has no {op} yet; use one of {tuple(_NEAREST_INDEX)} or 'auto'"
        )
    return _NEAREST_INDEX[backend]


def _gather_sq_dist(x: Tensor, y: Tensor, index: Tensor) -> Tensor:  # (N, D), (M, D), (N,) -> (N,)
    """|x_i - y_{index_i}|², differentiable in x and y, with the reference's arithmetic."""
    return (x - y[index]).pow(2).sum(-1)


# ------------------------------------------------------------------------------------------------
# Public nearest / chamfer
# ------------------------------------------------------------------------------------------------


def nearest(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # (N,) or (B, N) squared distances, same shape int64 indices
    """For each x_i: the squared distance to its nearest y_j and that j (int64, not differentiable).

    The squared distance is differentiable in x and y (the gradient flows to the nearest y_j).
    Ties between equidistant y_j may be broken differently by different backends.
    """
    check_points(x, "x")
    check_points(y, "y")
    check_pair(x, y)
    finder = _index_finder(backend, x.device, "nearest")
    if backend == "reference":
        sq_dist, index = _ref.nearest(x, y)
        return sq_dist, index
    xs, ys = (x, y) if x.dim() == 3 else (x.unsqueeze(0), y.unsqueeze(0))
    find = finder or _auto_nearest(xs[0], ys[0])
    index = torch.stack([find(xs[k], ys[k]) for k in range(xs.shape[0])])  # (B, N)
    sq_dist = torch.stack([_gather_sq_dist(xs[k], ys[k], index[k]) for k in range(xs.shape[0])])
    if x.dim() == 2:
        sq_dist, index = sq_dist[0], index[0]
    return sq_dist, index


def chamfer(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    x_lengths: Tensor | None = None,  # (B,) int, item b uses x[b, :x_lengths[b]]
    y_lengths: Tensor | None = None,  # (B,) int, item b uses y[b, :y_lengths[b]]
    backend: str = "auto",
) -> Tensor:  # () or (B,)
    """mean_i min_j |x_i - y_j|² + mean_j min_i |x_i - y_j|², per batch item."""
    check_points(x, "x")
    check_points(y, "y")
    check_pair(x, y)
    x_lengths = check_lengths(x_lengths, "x_lengths", x)
    y_lengths = check_lengths(y_lengths, "y_lengths", y)
    finder = _index_finder(backend, x.device, "chamfer")
    if backend == "reference":
        return _ref.chamfer(x, y, x_lengths, y_lengths)
    if x.dim() == 2:
        return _chamfer_items(x.unsqueeze(0), y.unsqueeze(0), None, None, finder)[0]
    return _chamfer_items(x, y, x_lengths, y_lengths, finder)


def _chamfer_items(
    x: Tensor,  # (B, N, D)
    y: Tensor,  # (B, M, D)
    x_lengths: Tensor | None,  # (B,)
    y_lengths: Tensor | None,  # (B,)
    finder: Callable[[Tensor, Tensor], Tensor] | None,
) -> Tensor:  # (B,)
    """Chamfer item by item: lengths become plain slices, and any index finder works unchanged."""
    xl = [x.shape[1]] * x.shape[0] if x_lengths is None else x_lengths.tolist()
    yl = [y.shape[1]] * y.shape[0] if y_lengths is None else y_lengths.tolist()
    values = []
    for k in range(x.shape[0]):
        xk, yk = x[k, : xl[k]], y[k, : yl[k]]
        find = finder or _auto_nearest(xk, yk)
        d_xy = _gather_sq_dist(xk, yk, find(xk, yk))
        d_yx = _gather_sq_dist(yk, xk, find(yk, xk))
        values.append(d_xy.mean() + d_yx.mean())
    return torch.stack(values)


# ------------------------------------------------------------------------------------------------
# Public Sinkhorn
# ------------------------------------------------------------------------------------------------


def _keops_sinkhorn():
    return importlib.import_module("fastlddmm.keops.sinkhorn")


def _triton_sinkhorn():
    return importlib.import_module("fastlddmm.triton_ops.sinkhorn")


# Named backends with a Sinkhorn solver: a module with softmin_parts(p) (its soft-min for the shared loop)
# and sinkhorn_projection.
_SINKHORN: dict[str, Callable[[], object]] = {
    "reference": lambda: _ref_sinkhorn,
    "keops": _keops_sinkhorn,
    "triton": _triton_sinkhorn,
}

# Dense or KeOps: on a 2-core x86 CPU the dense logsumexp beat KeOps at every size where it fits
# (float32, D = 3, forward + backward, one torch thread: N = M = 300: 0.13 s against 0.36 s; 2000: 7.7 s
# against 12.8 s), so "auto" stays dense while the four cost matrices are small (B·max(N, M)² entries
# up to 5000², ~0.4 GB in float32), then switches to KeOps for its O(N + M) memory. GeomLoss's "auto" uses
# the same 5000² bound (on N·M) for its "tensorized" backend.
_SINKHORN_DENSE_MAX_PAIRS = 5000**2


def _sinkhorn_solver(backend: str, x: Tensor, y: Tensor, op: str):
    _backend.check_name(backend)
    if backend == "auto":
        batch = x.shape[0] if x.dim() == 3 else 1
        big = batch * max(x.shape[-2], y.shape[-2]) ** 2 > _SINKHORN_DENSE_MAX_PAIRS
        # On CUDA tensors, the streaming Triton soft-min before KeOps (not timed: no GPU on the build
        # machine).
        if big and x.device.type == "cuda" and _backend.status("triton").available:
            backend = "triton"
        else:
            backend = "keops" if big and _backend.status("keops").available else "reference"
        return _SINKHORN[backend]()
    _backend.require(backend, device=x.device)
    if backend not in _SINKHORN:
        raise _backend.BackendUnavailableError(f"backend {backend!r} has no {op} yet; use one of {tuple(_SINKHORN)} or 'auto'")
    return _SINKHORN[backend]()


def _check_sinkhorn_args(x, y, a, b, blur, p, scaling, reach, debias) -> None:
    check_points(x, "x")
    check_points(y, "y")
    check_pair(x, y)
    check_weights(a, "a", x)
    check_weights(b, "b", y)
    check_positive(blur, "blur")
    check_positive(scaling, "scaling")
    if not scaling < 1:
        raise ValueError(f"scaling must lie in (0, 1), got {scaling!r}")
    check_positive(reach, "reach", allow_none=True)
    if isinstance(p, bool) or p not in _ref_sinkhorn.P_VALUES:
        raise ValueError(f"p must be one of {_ref_sinkhorn.P_VALUES}, got {p!r}")
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be True or False, got {debias!r}")


def sinkhorn(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    a: Tensor | None = None,  # (N,) or (B, N) non-negative weights; None: uniform 1/N
    b: Tensor | None = None,  # (M,) or (B, M); None: uniform 1/M
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    debias: bool = True,
    backend: str = "auto",
) -> Tensor:  # () or (B,)
    """The Sinkhorn divergence, equal to GeomLoss ``SamplesLoss("sinkhorn", p=p, blur=blur,
    scaling=scaling, reach=reach, debias=debias)(a, x, b, y)``.

    Cost |x - y|^p / p (p = 1 or 2), temperature eps = blur^p, ε-scaling from the diameter of the
    data down to blur with ratio ``scaling`` per step, marginal penalty rho = reach^p (None: balanced).
    With ``debias`` it is OT(a, b) - OT(a, a)/2 - OT(b, b)/2 (≥ 0, zero for equal measures); as blur
    → 0 it tends to W_p^p / p. Gradients follow GeomLoss: through the converged dual potentials.
    Zero weights remove points (how to batch clouds of different sizes).

    backend="auto" uses the dense reference up to B·max(N, M)² = 5000² cost entries, beyond it the
    streaming Triton kernels on CUDA tensors (when triton is installed), else KeOps (the dense
    reference at any size when neither can run: memory O(B·(N + M)²)). KeOps compiles its formulas
    on first use and caches them in ``pykeops.get_build_folder()``.
    """
    _check_sinkhorn_args(x, y, a, b, blur, p, scaling, reach, debias)
    solver = _sinkhorn_solver(backend, x, y, "sinkhorn")
    return _ref_sinkhorn.divergence_with(*solver.softmin_parts(p), x, y, a, b, blur, p, scaling, reach, debias)


def sinkhorn_potentials(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    a: Tensor | None = None,  # (N,) or (B, N)
    b: Tensor | None = None,  # (M,) or (B, M)
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    debias: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # (N,) or (B, N) on x, (M,) or (B, M) on y
    """The dual potentials (F on x, G on y) that GeomLoss returns with ``potentials=True``:
    the gradient of the divergence with respect to a and b."""
    _check_sinkhorn_args(x, y, a, b, blur, p, scaling, reach, debias)
    solver = _sinkhorn_solver(backend, x, y, "sinkhorn_potentials")
    return _ref_sinkhorn.potentials_with(*solver.softmin_parts(p), x, y, a, b, blur, p, scaling, reach, debias)


def sinkhorn_projection(
    x: Tensor,  # (N, D) or (B, N, D)
    y: Tensor,  # (M, D) or (B, M, D)
    *,
    a: Tensor | None = None,  # (N,) or (B, N)
    b: Tensor | None = None,  # (M,) or (B, M)
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    backend: str = "auto",
) -> Tensor:  # (N, D) or (B, N, D)
    """Barycentric projection of the entropic transport plan from (a, x) to (b, y): for each x_i,
    the π-weighted mean of the y_j it is sent to (a target for x_i in registration)."""
    _check_sinkhorn_args(x, y, a, b, blur, p, scaling, reach, True)
    solver = _sinkhorn_solver(backend, x, y, "sinkhorn_projection")
    return solver.sinkhorn_projection(x, y, a, b, blur=blur, p=p, scaling=scaling, reach=reach)
