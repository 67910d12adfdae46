"""Registration energy as a distance between shapes: fl.shape_distances.

The ResNet-LDDMM registration of shape i onto shape j minimises
    L(i -> j) = ½ Σ_l Δ · mean |v_l|²  +  D(φ_1 · i, j) / (2 σ²),
the kinetic energy of the deformation plus the residual data term. Its final value says how much
deformation it takes to bring i onto j: a dissimilarity that, unlike Chamfer or Sinkhorn on the raw
clouds, pays for *how* points must move (smoothly, diffeomorphically), not only for where they end.
It is not symmetric, so every pair is registered in both directions and
    d(i, j) = d(j, i) = ½ (L(i -> j) + L(j -> i)),    d(i, i) = 0.

Pairs are independent: they run in a process pool (one torch thread per process), or in this
process with ``workers=1``.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from torch import Tensor

from ._validation import check_positive


def _register_pair(job: tuple) -> tuple[int, int, float, float, float]:
    """Registers shapes[i] onto shapes[j]; returns (i, j, loss, energy, data) at the last step."""
    from .registration import register

    i, j, source, target, kwargs = job
    r = register(source, target, progress=False, **kwargs)
    h = r.history
    return i, j, h["loss"][-1], h["energy"][-1], h["data"][-1]


def _init_worker() -> None:
    torch.set_num_threads(1)  # the pool is the parallelism: one thread per process avoids oversubscription


def shape_distances(
    shapes,  # sequence of K clouds (N_k, D), tensors or numpy arrays, D equal for all
    *,
    data_term: str = "sinkhorn",
    sigma: float = 0.1,
    width: int = 32,
    layers: int = 5,
    steps: int = 100,
    lr: float | None = None,
    blur: float = 0.05,
    seed: int = 0,
    workers: int | None = None,
    backend: str = "auto",
    return_directed: bool = False,
):
    """The symmetric (K, K) float64 matrix of registration losses d(i, j) = ½ (L(i -> j) + L(j -> i)).

    Every ordered pair i != j is registered with ``fl.register(shapes[i], shapes[j], data_term=...,
    sigma=..., width=..., layers=..., steps=..., lr=..., blur=..., seed=...)`` (same seed for every
    pair: the distances depend on the shapes only), L being the loss at its last step.
    ``workers``: processes for the K(K - 1) registrations (None: all CPU cores; 1: this process).
    With ``return_directed``, also returns a dict of (K, K) matrices "loss", "energy", "data" of the
    directed registrations (row i -> column j, zero diagonal).
    """
    clouds = [torch.as_tensor(np.asarray(s) if not isinstance(s, Tensor) else s) for s in shapes]
    if len(clouds) < 2:
        raise ValueError(f"shapes must hold at least two clouds, got {len(clouds)}")
    for k, c in enumerate(clouds):
        if c.dim() != 2 or c.shape[0] == 0:
            raise ValueError(f"shapes[{k}] must be a non-empty (N, D) cloud, got shape {tuple(c.shape)}")
        if c.shape[1] != clouds[0].shape[1]:
            raise ValueError(f"all shapes must have the same dimension D; shapes[{k}] has {c.shape[1]}, shapes[0] {clouds[0].shape[1]}")
    if workers is not None:
        check_positive(workers, "workers", integer=True)
    clouds = [c.detach().cpu().to(torch.float64 if c.dtype == torch.float64 else torch.float32) for c in clouds]
    kwargs = dict(data_term=data_term, sigma=sigma, width=width, layers=layers, steps=steps, lr=lr, blur=blur,
                  seed=seed, backend=backend)
    K = len(clouds)
    jobs = [(i, j, clouds[i], clouds[j], kwargs) for i in range(K) for j in range(K) if i != j]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers == 1:
        results = [_register_pair(job) for job in jobs]
    else:
        # "spawn": fresh interpreters, no fork of a parent whose torch thread pools may already be running.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
            results = list(pool.map(_register_pair, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    directed = {name: torch.zeros(K, K, dtype=torch.float64) for name in ("loss", "energy", "data")}
    for i, j, loss, energy, data in results:
        directed["loss"][i, j], directed["energy"][i, j], directed["data"][i, j] = loss, energy, data
    d = 0.5 * (directed["loss"] + directed["loss"].T)
    return (d, directed) if return_directed else d
