"""Multistep registration: each step sees the moving image warped by the previous steps; maps compose.

(The module is ``steps`` so that the builder function ``multistep`` does not shadow its module.)

``TwoStep(a, b)(A, B)``: phi = a(A, B); psi = b(A ∘ phi, B); return phi ∘ psi, so that
``A ∘ (phi ∘ psi) = (A ∘ phi) ∘ psi`` (b refines what a left). ``a`` and ``b`` are any modules
with ``forward(moving, fixed) -> Transform``, TwoStep included: k steps are nested TwoSteps
(:func:`multistep`). The warped image a later step sees is always the *original* moving image
resampled once by the composed map, never a resampling of a resampled image.

``multistep(net, steps=K)`` applies ONE network K times (shared weights: it must learn one step
that, iterated, registers); ``multistep([net_1, ..., net_K])`` gives each step its own network.

Training needs no ground-truth transforms: :func:`registration_loss` is
``similarity(A ∘ phi, B) + lam · regulariser(phi)`` on image pairs alone, and :func:`train`
minimises it with Adam on random pairs drawn from a set of images.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from . import losses
from .transforms import Compose, Transform, warp

SIMILARITIES = ("ssd", "lncc")
REGULARISERS = ("diffusion", "inverse_consistency")


class TwoStep(nn.Module):
    """Two registration modules in sequence: the second registers the first's warped image."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, moving: Tensor,  # (B, C, *spatial)
                fixed: Tensor,  # (B, C, *spatial)
                ) -> Transform:
        return step_transforms(self, moving, fixed)[-1]


def multistep(nets, steps: int | None = None) -> nn.Module:
    """K registration steps as nested TwoSteps: TwoStep(TwoStep(net_1, net_2), net_3)...

    ``multistep(net, steps=K)``: the one module ``net`` applied K times, each application seeing the
    image warped by the previous ones (shared weights, as icon_registration's multistep experiment:
    ``n2 = inner_net; for _ in range(K - 1): n2 = TwoStepRegistration(n2, inner_net)``).
    ``multistep([net_1, ..., net_K])``: one module per step (independent weights); ``steps`` must
    then be None or K. One network and steps=None (or 1) is the network itself.
    """
    if isinstance(nets, nn.Module):
        nets = [nets] * (1 if steps is None else _positive(steps, "steps"))
    else:
        nets = list(nets)
        if not nets:
            raise ValueError("multistep needs at least one network")
        if not all(isinstance(n, nn.Module) for n in nets):
            raise TypeError("multistep takes an nn.Module (applied `steps` times) or a list of nn.Modules")
        if steps is not None and _positive(steps, "steps") != len(nets):
            raise ValueError(f"steps={steps} but {len(nets)} networks were given: pass one network to repeat it, "
                             f"or a list with one network per step")
    model = nets[0]
    for net in nets[1:]:
        model = TwoStep(model, net)
    return model


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def step_networks(model: nn.Module) -> list[nn.Module]:
    """The network applied at each step of a (nested) TwoStep, in order: K entries for K steps.

    With shared weights every entry is the same object; with independent networks all differ.
    """
    if not isinstance(model, TwoStep):
        return [model]
    return step_networks(model.first) + step_networks(model.second)


def step_transforms(model: nn.Module, moving: Tensor, fixed: Tensor) -> list[Transform]:
    """The cumulative maps after each step of a (nested) TwoStep: [phi_1, phi_1 ∘ phi_2, ...].

    For a plain network, the one map it predicts. The last entry is model(moving, fixed).
    """
    if not isinstance(model, TwoStep):
        return [model(moving, fixed)]
    first = step_transforms(model.first, moving, fixed)
    phi = first[-1]
    warped = warp(moving, phi)
    return first + [Compose(phi, psi) for psi in step_transforms(model.second, warped, fixed)]


def similarity(name: str, warped: Tensor, fixed: Tensor, *, reduction: str = "mean") -> Tensor:
    if name == "ssd":
        return losses.ssd(warped, fixed, reduction=reduction)
    if name == "lncc":
        return losses.lncc(warped, fixed, reduction=reduction)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {name!r}")


def registration_loss(model: nn.Module,
                      moving: Tensor,  # (B, C, *spatial)
                      fixed: Tensor,  # (B, C, *spatial)
                      *, lam: float = 0.05, similarity_name: str = "ssd",
                      regulariser: str = "diffusion") -> dict:
    """similarity(moving ∘ phi, fixed) + lam · regulariser, with phi = model(moving, fixed).

    regulariser "diffusion": mean |∇(phi - id)|² (losses.diffusion).
    regulariser "inverse_consistency" (ICON): the model also registers fixed to moving, the
    similarity is averaged over both directions and the penalty is |Φ[A,B] ∘ Φ[B,A] - id|²
    averaged over both orders.

    Returns a dict: loss, similarity, regulariser (scalars), phi (the Transform), map (phi on the
    grid, (B, dim, *spatial)) and warped (moving ∘ phi).
    """
    if regulariser not in REGULARISERS:
        raise ValueError(f"regulariser must be one of {REGULARISERS}, got {regulariser!r}")
    if similarity_name not in SIMILARITIES:
        raise ValueError(f"similarity_name must be one of {SIMILARITIES}, got {similarity_name!r}")
    if moving.shape != fixed.shape:
        raise ValueError(f"moving and fixed must have the same shape, got {tuple(moving.shape)} and {tuple(fixed.shape)}")
    shape, batch = moving.shape[2:], moving.shape[0]
    phi = model(moving, fixed)
    grid_map = phi.on_grid(shape, batch=batch, dtype=moving.dtype, device=moving.device)
    warped = warp(moving, grid_map)
    sim = similarity(similarity_name, warped, fixed)
    if regulariser == "diffusion":
        reg = losses.diffusion(grid_map)
    else:
        phi_ba = model(fixed, moving)
        sim = 0.5 * (sim + similarity(similarity_name, warp(fixed, phi_ba), moving))
        kw = dict(batch=batch, dtype=moving.dtype, device=moving.device)
        reg = 0.5 * (losses.inverse_consistency(phi, phi_ba, shape, **kw)
                     + losses.inverse_consistency(phi_ba, phi, shape, **kw))
    return {"loss": sim + lam * reg, "similarity": sim, "regulariser": reg, "phi": phi,
            "map": grid_map, "warped": warped}


SCHEDULES = ("constant", "cosine")


def train(model: nn.Module,
          images,  # (N, C, *spatial), or a list of such groups: pairs are drawn within one group
          *, iterations: int | None = 1000, seconds: float | None = None, batch_size: int = 64,
          lr: float = 1e-3, schedule: str = "constant", lam: float = 0.05, similarity_name: str = "ssd",
          regulariser: str = "diffusion", seed: int = 0, progress: bool = False,
          log_every: int = 100) -> list[dict]:
    """Adam on random (moving, fixed) pairs of distinct images; returns the logged history.

    Training stops after ``iterations`` Adam steps or once ``seconds`` of training have passed,
    whichever comes first (give at least one; None means no such limit). ``schedule`` "cosine"
    lowers the learning rate from ``lr`` to 0 along a half cosine of the progress, the larger of
    iteration / iterations and elapsed / seconds; "constant" keeps ``lr``.

    With a list of groups (e.g. one per digit class), each batch comes from one group picked at
    random, so pairs never mix groups. The model and images must be on the same device. Each
    history entry has iteration, loss, similarity, regulariser, lr (floats) and seconds since the
    start; the last entry is the last iteration run.
    """
    groups = list(images) if isinstance(images, (list, tuple)) else [images]
    for g in groups:
        if not isinstance(g, Tensor) or g.dim() < 4:
            raise ValueError("images must be a tensor (N, C, *spatial) or a list of them")
        if g.shape[0] < 2:
            raise ValueError(f"each image group must hold at least 2 images to draw pairs from, got {g.shape[0]}")
    if not groups:
        raise ValueError("images is an empty list")
    if iterations is None and seconds is None:
        raise ValueError("give iterations or seconds (or both): training needs a limit")
    for name, value, low in (("iterations", iterations, 0), ("batch_size", batch_size, 1), ("log_every", log_every, 1)):
        if value is None and name == "iterations":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not math.isfinite(seconds) or seconds <= 0):
        raise ValueError(f"seconds must be a positive number of seconds or None, got {seconds!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    history, start = [], time.perf_counter()
    model.train()
    it, out, logged = 0, None, -1

    def log(it, out, rate):
        entry = {"iteration": it, "loss": out["loss"].item(), "similarity": out["similarity"].item(),
                 "regulariser": out["regulariser"].item(), "lr": rate, "seconds": time.perf_counter() - start}
        history.append(entry)
        if progress:
            print(f"  it {it:5d}  loss {entry['loss']:.5f}  sim {entry['similarity']:.5f}  "
                  f"reg {entry['regulariser']:.4f}  lr {rate:.2e}  ({entry['seconds']:.1f} s)", flush=True)

    while True:
        elapsed = time.perf_counter() - start
        progress_fraction = max(0.0 if iterations is None else it / max(iterations, 1),
                                0.0 if seconds is None else elapsed / seconds)
        if (iterations is not None and it >= iterations) or progress_fraction >= 1.0:
            break
        rate = lr if schedule == "constant" else 0.5 * lr * (1.0 + math.cos(math.pi * progress_fraction))
        for group in optimiser.param_groups:
            group["lr"] = rate
        group = groups[int(torch.randint(len(groups), (1,), generator=gen))]
        n = group.shape[0]
        i = torch.randint(n, (batch_size,), generator=gen)
        j = (i + torch.randint(1, n, (batch_size,), generator=gen)) % n  # j != i
        i, j = i.to(group.device), j.to(group.device)
        out = registration_loss(model, group[i], group[j], lam=lam, similarity_name=similarity_name,
                                regulariser=regulariser)
        optimiser.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimiser.step()
        if it % log_every == 0 or (iterations is not None and it == iterations - 1):
            log(it, out, rate)
            logged = it
        it += 1
    if out is not None and logged != it - 1:
        log(it - 1, out, rate)  # a time budget ended the run between two logged iterations
    model.eval()
    return history
