"""Point-sharded distances and registration on torch.distributed (one huge cloud, several processes).

Each rank holds a contiguous shard of the source cloud and one of the target cloud; the flow's
parameters are replicated. The flow acts point by point, so its forward and backward passes are local
and only the parameter gradients are summed across ranks (one all-reduce of L·(2·H·D + H + D) numbers
per evaluation). The data terms are computed *exactly* across shards:

* Chamfer: every rank finds, for all the query points (every rank's shard, gathered at each call; a
  cloud that does not change, such as a registration's target, can be gathered once: gather_cloud),
  the nearest point of its own shard; a MIN all-reduce gives the global nearest distance, and a second
  one (over rank numbers) names the rank that owns the minimum: only that rank lets the gradient
  through, so it reaches the owner of the minimiser exactly as in the one-process computation.
* Sinkhorn: every soft-min f_i = -ε log Σ_j exp(h_j - C(x_i, y_j)/ε) is a log-sum-exp over j; each
  rank reduces over its own shard of j, then a MAX all-reduce and a SUM all-reduce of the shifted
  exponentials combine the partials (log-sum-exp of log-sum-exps). The ε-scaling loop, debiasing,
  ``reach`` and the taped last step are those of ``fastlddmm.sinkhorn_solver`` (the same ``solve``, run with
  a soft-min that reduces across ranks: ShardedSoftmin), so the result equals the one-process value up to
  rounding.

The query side is replicated on every rank (O((N + M)·D) memory per rank: 1.2 GB for 10^8 points in
3-D float32); the work per rank is O(N·M / P). See docs/scaling.md for what is sent per iteration.

Usage (under ``torchrun --nproc-per-node P``)::

    import fastlddmm as fl
    from fastlddmm import distributed as fld
    device = fld.init()                                   # gloo on CPU, nccl on GPUs
    src, tgt = fld.shard(source).to(device), fld.shard(target).to(device)
    reg = fl.register(src, tgt, data_term="sinkhorn", distributed=True)

Every rank must call these functions together, with shards of the same clouds (non-empty ones).
Gradients with respect to the Sinkhorn weights ``a``, ``b`` are not propagated across ranks.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from . import sinkhorn_solver
from ._validation import check_pair, check_points
from .ops import nearest as _nearest
from .ops.softmin import Softmin, softmin_for


# ------------------------------------------------------------------------------------------------
# Process group helpers
# ------------------------------------------------------------------------------------------------


def is_active() -> bool:
    """True when torch.distributed is available and initialised."""
    return dist.is_available() and dist.is_initialized()


def _require(group=None) -> tuple[int, int]:
    if not is_active():
        raise RuntimeError(
            "fastlddmm.distributed needs an initialised torch.distributed process group: start the script "
            "with `torchrun --nproc-per-node P script.py` and call fastlddmm.distributed.init() (or "
            "torch.distributed.init_process_group) first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _collective_device(group=None) -> torch.device:
    """Where small bookkeeping tensors must live for this group's backend (nccl: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(check: Callable[[], None], *, same: dict[str, int] | None = None, group=None) -> None:
    """Runs the input check ``check`` on every rank and makes every rank fail if any rank's check fails,
    or if the integers in ``same`` (point dimension, ...) differ between ranks: a bad shard on one rank
    then raises everywhere instead of leaving the other ranks waiting in a collective for ever."""
    rank, world = _require(group)
    error: Exception | None = None
    try:
        check()
    except (TypeError, ValueError) as err:
        error = err
    device = _collective_device(group)
    names = list(same or {})
    values = torch.tensor([same[k] for k in names], dtype=torch.int64, device=device)
    state = torch.cat([torch.tensor([rank if error is not None else world], device=device), values, -values])
    dist.all_reduce(state, op=dist.ReduceOp.MIN, group=group)  # first failing rank, min and -max of each value
    if error is not None:
        raise error
    if int(state[0]) < world:
        raise ValueError(f"rank {int(state[0])} rejected its input (its own error message says why)")
    for k, name in enumerate(names):
        low, high = int(state[1 + k]), -int(state[1 + len(names) + k])
        if low != high:
            raise ValueError(f"every rank must have the same {name}, got values from {low} to {high}")


def init(backend: str | None = None) -> torch.device:
    """Initialises the default process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR,
    ...) and returns this rank's device: cuda:LOCAL_RANK with the nccl backend when GPUs are visible,
    else the CPU with gloo. Does nothing to an already initialised group."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("fastlddmm.distributed.init() expects torchrun's environment (RANK, WORLD_SIZE, "
                               "MASTER_ADDR, MASTER_PORT): start with `torchrun --nproc-per-node P ...`")
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return device


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous block when ``count`` items are split over world_size ranks
    (block sizes differ by at most one)."""
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(points: Tensor, *, group=None) -> Tensor:  # (N, ...) -> (n_rank, ...)
    """This rank's contiguous block of ``points`` (a view). Shards of a source and its corresponding
    target (data_term="l2") line up, since the split depends only on N and the number of ranks."""
    rank, world = _require(group)
    if points.shape[0] < world:
        raise ValueError(f"cannot split {points.shape[0]} points over {world} ranks: every shard must be non-empty")
    start, stop = shard_bounds(points.shape[0], rank, world)
    return points[start:stop]


def shard_sizes(count: int, *, device=None, group=None) -> list[int]:
    """The number of points of every rank's shard (rank order); every rank gets the same list."""
    _, world = _require(group)
    local = torch.tensor([count], dtype=torch.int64, device=device if device is not None else _collective_device(group))
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s) for s in sizes]


def all_reduce_(t: Tensor, op=dist.ReduceOp.SUM, group=None) -> Tensor:
    """In-place all-reduce (a no-op outside a process group); returns ``t``."""
    if is_active():
        dist.all_reduce(t, op=op, group=group)
    return t


# ------------------------------------------------------------------------------------------------
# Differentiable collectives
# ------------------------------------------------------------------------------------------------


# torch 2.13 renamed reduce_scatter_tensor to reduce_scatter_single (the old name warns).
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
# Set when the process group's backend turned out to have no reduce-scatter (older gloo builds).
_REDUCE_SCATTER_MISSING: set[str] = set()


def _sum_and_scatter(grad: Tensor, sizes: list[int], rank: int, group) -> Tensor:  # (N, ...) -> (n_rank, ...)
    """Σ over ranks of ``grad``, rows of this rank's shard only: a reduce-scatter over shards padded to
    one width ((P-1)/P · N rows on the wire per rank), else an all-reduce (twice that)."""
    backend = str(dist.get_backend(group))
    if backend not in _REDUCE_SCATTER_MISSING:
        width = max(sizes)
        padded = grad.new_zeros((len(sizes) * width,) + tuple(grad.shape[1:]))
        for r, part in enumerate(grad.split(sizes)):
            padded[r * width : r * width + part.shape[0]] = part
        mine = grad.new_empty((width,) + tuple(grad.shape[1:]))
        try:
            _reduce_scatter(mine, padded, op=dist.ReduceOp.SUM, group=group)
            return mine[: sizes[rank]]
        except (RuntimeError, NotImplementedError):  # the same on every rank: same backend and torch
            _REDUCE_SCATTER_MISSING.add(backend)
    total = grad.contiguous().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    start = sum(sizes[:rank])
    return total[start : start + sizes[rank]]


class _AllGatherPoints(torch.autograd.Function):
    """Concatenates every rank's shard (rank order). Backward: the gradient of the gathered cloud is
    summed over ranks (each rank holds the share of it that flowed through its own reductions), and
    each rank keeps the rows of its own shard."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):  # x: (n_rank, D) -> (N, D)
        width = max(sizes)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad):  # (N, D) -> (n_rank, D)
        return _sum_and_scatter(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


def _gather(x: Tensor, group) -> tuple[Tensor, tuple[int, int]]:  # (n_rank, D) -> (N, D), [start, stop)
    """The gathered cloud and the rows [start, stop) of this rank's shard in it."""
    rank, _ = _require(group)
    sizes = shard_sizes(x.shape[0], device=x.device, group=group)
    if min(sizes) == 0:
        raise ValueError(f"every rank needs a non-empty shard, got shard sizes {sizes}")
    start = sum(sizes[:rank])
    return _AllGatherPoints.apply(x, sizes, rank, group), (start, start + sizes[rank])


def all_gather_points(x: Tensor, *, group=None) -> Tensor:  # (n_rank, D) -> (N, D)
    """Every rank's shard, concatenated in rank order (differentiable: see _AllGatherPoints)."""
    return _gather(x, group)[0]


class GatheredCloud(NamedTuple):
    """This rank's shard of a cloud with the whole cloud already gathered (see gather_cloud)."""

    shard: Tensor  # (m_rank, D)
    full: Tensor  # (M, D), every rank's shard in rank order
    span: tuple[int, int]  # rows [start, stop) of shard in full


def gather_cloud(y: Tensor, *, group=None) -> GatheredCloud:  # (m_rank, D)
    """Gathers a cloud that stays the same over many calls (a registration's target) once, so that
    chamfer / sinkhorn do not send it again at every call. Detached: no gradient reaches it."""
    check_points(y, "y", allow_batch=False)
    full, span = _gather(y.detach(), group)
    return GatheredCloud(y.detach(), full, span)


def _shard_of(y: Tensor | GatheredCloud) -> Tensor:
    return y.shard if isinstance(y, GatheredCloud) else y


def _gathered(y: Tensor | GatheredCloud, group) -> GatheredCloud:
    if isinstance(y, GatheredCloud):
        return y
    full, span = _gather(y, group)
    return GatheredCloud(y, full, span)


class _MinAcrossRanks(torch.autograd.Function):
    """min over ranks of per-rank minima d_r (all ranks get it). The gradient goes to the lowest rank
    that attains the minimum only (the one-process argmin's tie-break, with contiguous shards)."""

    @staticmethod
    def forward(ctx, d_local, rank, world, group):  # (K,) -> (K,)
        d = d_local.clone()
        dist.all_reduce(d, op=dist.ReduceOp.MIN, group=group)
        # MIN returns one of the inputs bit for bit, so == finds the ranks that attain it.
        owner = torch.where(d_local == d, rank, world).to(torch.int32)
        dist.all_reduce(owner, op=dist.ReduceOp.MIN, group=group)
        ctx.save_for_backward(owner == rank)
        return d

    @staticmethod
    def backward(ctx, grad):
        (mine,) = ctx.saved_tensors
        return grad * mine, None, None, None


class _SoftminAcrossRanks(torch.autograd.Function):
    """f = -ε log Σ_r exp(-f_r / ε): the soft-min over all j from per-rank soft-mins over their own j.
    Backward: ∂f/∂f_r = exp((f - f_r) / ε), the share of rank r's points in the soft-min."""

    @staticmethod
    def forward(ctx, f_local, eps, group):  # (B, K) -> (B, K)
        z = -f_local / eps
        top = z.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        total = (z - top).exp()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        f = -eps * (top + total.log())
        ctx.save_for_backward(f_local, f)
        ctx.eps = eps
        return f

    @staticmethod
    def backward(ctx, grad):
        f_local, f = ctx.saved_tensors
        return grad * ((f - f_local) / ctx.eps).exp(), None, None


# ------------------------------------------------------------------------------------------------
# Sharded Chamfer
# ------------------------------------------------------------------------------------------------


def _check_shards(x: Tensor, y: Tensor | GatheredCloud, group, more: Callable[[], None] | None = None) -> None:
    """The input checks of a sharded distance, agreed on by every rank (see agree)."""
    pre_gathered = isinstance(y, GatheredCloud)
    y = _shard_of(y)

    def check() -> None:
        check_points(x, "x", allow_batch=False)
        check_points(y, "y", allow_batch=False)
        check_pair(x, y)
        if more is not None:
            more()

    described = isinstance(x, Tensor) and x.dim() > 0
    # A gathered y on some ranks and not on others would pair different collectives: refuse it.
    agree(check, same={"point dimension": x.shape[-1] if described else -1,
                       "dtype (1: float64)": int(described and x.dtype == torch.float64),
                       "kind of y (1: GatheredCloud)": int(pre_gathered)}, group=group)


def _nearest_sq_dist(query: Tensor, ref: Tensor, backend: str) -> Tensor:  # (K, D), (R, D) -> (K,)
    """min_j |query_k - ref_j|², differentiable in both (through the found index): fl.nearest's op."""
    q, r = query[None], ref[None]
    index = _nearest.knn_index(q, r, backend=backend)  # (1, K, 1)
    return _nearest.gather_distances(q, r, index)[0, :, 0]


def chamfer(
    x: Tensor,  # (n_rank, D) this rank's shard of x
    y: Tensor | GatheredCloud,  # (m_rank, D) this rank's shard of y, or gather_cloud(it)
    *,
    backend: str = "auto",
    group=None,
) -> Tensor:  # () the same value on every rank
    """fl.chamfer of the whole clouds (every rank's shard together), from shards: mean_i min_j |x_i - y_j|²
    + mean_j min_i |x_i - y_j|². Backward (called on every rank) gives each rank the exact gradient
    with respect to its own shards. ``backend`` is the local nearest-neighbour search (as fl.nearest)."""
    _check_shards(x, y, group)
    rank, world = _require(group)
    x_all = all_gather_points(x, group=group)  # (N, D) queries of the x -> y term
    y, y_all, _ = _gathered(y, group)  # (M, D) queries of the y -> x term
    d_xy = _MinAcrossRanks.apply(_nearest_sq_dist(x_all, y, backend), rank, world, group)  # (N,)
    d_yx = _MinAcrossRanks.apply(_nearest_sq_dist(y_all, x, backend), rank, world, group)  # (M,)
    return d_xy.mean() + d_yx.mean()


# ------------------------------------------------------------------------------------------------
# Sharded Sinkhorn
# ------------------------------------------------------------------------------------------------


class Shard(NamedTuple):
    """What one rank reduces over: its own points and their rows [start, stop) in the gathered cloud."""

    points: Tensor  # (1, m_rank, D), detached
    span: tuple[int, int]


class ShardedSoftmin(Softmin):
    """The soft-min over every rank's points, for the shared solver: each rank reduces over its own shard
    with the local backend's soft-min (any backend), then the partials are combined across ranks."""

    def __init__(self, local: Softmin, group):
        super().__init__(local.p)
        self.local, self.group = local, group

    def cost(self, x: Tensor, ref: Shard):  # x: (1, K, D) gathered queries
        return self.local.cost(x, ref.points), ref.span

    def __call__(self, eps: float, cost, h: Tensor) -> Tensor:  # h: (1, total) -> (1, K)
        local_cost, (start, stop) = cost
        return _SoftminAcrossRanks.apply(self.local(eps, local_cost, h[:, start:stop]), eps, self.group)


def _gathered_weights(w: Tensor | None, like: Tensor, total: int, group) -> Tensor:  # -> (1, total)
    if w is None:
        return like.new_full((1, total), 1.0 / total)
    return all_gather_points(w.detach().reshape(-1, 1), group=group).reshape(1, -1)


def sinkhorn(
    x: Tensor,  # (n_rank, D) this rank's shard of x
    y: Tensor | GatheredCloud,  # (m_rank, D) this rank's shard of y, or gather_cloud(it)
    *,
    a: Tensor | None = None,  # (n_rank,) weights of this rank's x; None: uniform 1/N over all of x
    b: Tensor | None = None,  # (m_rank,) weights of this rank's y; None: uniform 1/M
    blur: float = 0.05,
    p: int = 2,
    scaling: float = 0.5,
    reach: float | None = None,
    debias: bool = True,
    backend: str = "auto",
    group=None,
) -> Tensor:  # () the same value on every rank
    """fl.sinkhorn of the whole clouds from shards (GeomLoss conventions, same loop). Every soft-min is
    reduced over the local shard by ``backend`` (as fl.sinkhorn's), then combined across ranks."""
    from .distances import check_sinkhorn_args

    _check_shards(x, y, group,
                  lambda: check_sinkhorn_args(x, _shard_of(y), a, b, blur, p, scaling, reach, debias))
    x_all, x_span = _gather(x, group)  # (N, D), this rank's rows in it
    y, y_all, y_span = _gathered(y, group)  # (M, D)
    a_all = _gathered_weights(a, x, x_all.shape[0], group)  # (1, N)
    b_all = _gathered_weights(b, y, y_all.shape[0], group)  # (1, M)
    softmin = ShardedSoftmin(softmin_for(backend, x_all, y, p), group)
    # Queries: the gathered clouds (differentiable); references: this rank's shard, detached as in GeomLoss.
    pot = sinkhorn_solver.solve(softmin, x_all[None], y_all[None], a_all, b_all, blur, p, scaling, reach, debias,
                                x_ref=Shard(x.detach()[None], x_span), y_ref=Shard(y.detach()[None], y_span))
    return sinkhorn_solver.sinkhorn_cost(pot.eps, pot.rho, a_all, b_all, pot.f_aa, pot.g_bb, pot.g_ab, pot.f_ba,
                                         debias)[0]


# ------------------------------------------------------------------------------------------------
# A sharded registration: fl.register(distributed=True) runs its one loop with PointSharding
# ------------------------------------------------------------------------------------------------


def _normalisation(source: Tensor, target: Tensor, group) -> tuple[Tensor, float]:  # (n, D), (m, D)
    """fl.register's normalisation of the whole clouds: joint centroid and radius, from shards."""
    both = torch.cat([source, target], dim=0)
    stats = torch.cat([both.sum(0), both.new_tensor([both.shape[0]])])
    all_reduce_(stats, group=group)
    center = stats[:-1] / stats[-1]
    radius = (both - center).norm(dim=-1).max().reshape(1)
    all_reduce_(radius, op=dist.ReduceOp.MAX, group=group)
    scale = float(radius)
    return center, (scale if scale > 0 else 1.0)


def _all_reduce_gradients(params, group) -> None:
    """Sums the parameters' gradients over ranks, in one flat all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_(flat, group=group)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


class PointSharding:
    """fl.register's Sharding (see fastlddmm.registration.Sharding) for point-sharded clouds: each rank
    holds a contiguous shard of the source and of the target, the flow is replicated, and

    * input checks are agreed on by every rank (a bad shard raises everywhere instead of hanging);
    * the normalisation is that of the whole clouds; the target is gathered once (gather_cloud);
    * the energy and "l2" are per-rank shares of whole-cloud means, Chamfer and Sinkhorn are exact
      across shards (chamfer / sinkhorn above); summing the shares' gradients over ranks (one flat
      all-reduce) gives the whole gradient;
    * rank 0 shows progress and writes files.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank, self.world_size = _require(group)

    @property
    def writes(self) -> bool:
        return self.rank == 0

    def check(self, validate: Callable[[], None], source) -> None:
        described = isinstance(source, Tensor) and source.dim() > 0
        agree(validate, same={"point dimension": source.shape[-1] if described else -1,
                              "dtype (1: float64)": int(described and source.dtype == torch.float64)},
              group=self.group)

    def normalisation(self, source: Tensor, target: Tensor) -> tuple[Tensor, float]:
        return _normalisation(source, target, self.group)

    def total_points(self, count: int) -> int:
        device = _collective_device(self.group)
        return sum(shard_sizes(count, device=device, group=self.group))

    def prepare_target(self, data_term: str, target: Tensor):
        # The target does not move: gather it once, not at every step ("l2" pairs shards instead).
        return target if data_term == "l2" else gather_cloud(target, group=self.group)

    def start(self, params) -> None:
        # The same seed gives the same start already; this makes it certain.
        for p in params:
            with torch.no_grad():
                dist.broadcast(p.data, src=0, group=self.group)

    def objective(self, data_term: str, moved: Tensor, target, energy: Tensor, *, weight: float, blur: float,
                  backend: str, total: int) -> tuple[Tensor, dict[str, Tensor]]:
        energy_share = energy * (moved.shape[0] / total)
        if data_term == "l2":
            data_share = ((moved - _shard_of(target)) ** 2).sum() / total
            data = all_reduce_(data_share.detach().clone(), group=self.group)
        else:
            fn = chamfer if data_term == "chamfer" else functools.partial(sinkhorn, blur=blur)
            # Every rank holds the whole value; its backward already routes to each rank its own share.
            data_share = fn(moved, target, backend=backend, group=self.group)
            data = data_share.detach()
        energy_total = all_reduce_(energy_share.detach().clone(), group=self.group)
        values = {"loss": weight * data + energy_total, "data": data, "energy": energy_total}
        return weight * data_share + energy_share, values

    def reduce_gradients(self, params) -> None:
        _all_reduce_gradients(params, self.group)

    def config(self) -> dict:
        return {"world_size": self.world_size}

    def keeps_clouds(self) -> bool:
        return False


__all__ = [
    "GatheredCloud", "PointSharding", "Shard", "ShardedSoftmin", "agree", "all_gather_points", "chamfer",
    "gather_cloud", "init", "is_active", "shard", "shard_bounds", "shard_sizes", "sinkhorn",
]
