"""Multistep MLP registration on the UCI handwritten digits that scikit-learn ships (no download).

``run([5], [5, 7], out)`` trains on random pairs of 5s and evaluates on held-out pairs of each eval
digit: it writes ``metrics.json`` ({"5": {"ssd_before", "ssd_after", "folds_fraction"}, ...}),
``train_log.json`` (settings and loss history), ``per_step.json`` (per eval digit, the mean SSD of the
moving image warped by the first k steps to the fixed image and to each digit's mean image, k = 0..K)
and one figure ``digits_<d>.png`` per eval digit.

Data: ``sklearn.datasets.load_digits`` (1797 images of 8×8, intensities 0..16). Each image is
scaled to [0, 1], upsampled bilinearly to 20×20 and zero-padded to 28×28, the layout of MNIST
(digit in the central 20×20, empty margin where it can be deformed into). Each digit class is split
once, by ``seed``, into 70 % training and 30 % held-out images; evaluation pairs come only from
the held-out part.
"""

from __future__ import annotations

import json
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from . import losses
from .multistep import multistep, step_transforms
from .multistep import train as train_registration  # run() has a parameter named train
from .networks import MLP
from .transforms import warp

SIZE = 28
DIGIT_SIZE = 20
TRAIN_FRACTION = 0.7
DEFAULT_ITERATIONS = 300  # ~1 min on 2 CPU cores; the training loss is flat after ~200
COMPOSED_STEPS = 8
LAM = 0.05


def load_digits(digit: int | None = None, *, size: int = SIZE, digit_size: int = DIGIT_SIZE,
                dtype=torch.float32) -> Tensor:  # (N, 1, size, size)
    """The scikit-learn digits (of one class, or all) as (N, 1, size, size) images in [0, 1]."""
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'fastlddmm[image]'") from err
    if not 8 <= digit_size <= size:
        raise ValueError(f"digit_size must lie in [8, size={size}], got {digit_size}")
    data = _sk_load_digits()
    images = torch.as_tensor(data.images, dtype=dtype)
    if digit is not None:
        if digit not in range(10):
            raise ValueError(f"digit must be an integer 0..9, got {digit!r}")
        images = images[torch.as_tensor(data.target) == digit]
    images = F.interpolate(images[:, None] / 16.0, size=(digit_size, digit_size), mode="bilinear",
                           align_corners=False)
    lo = (size - digit_size) // 2
    return F.pad(images, (lo, size - digit_size - lo, lo, size - digit_size - lo)).clamp(0.0, 1.0)


def split(images: Tensor, *, seed: int = 0, fraction: float = TRAIN_FRACTION) -> tuple[Tensor, Tensor]:
    """A fixed random split of images (N, ...) into (train, held_out)."""
    perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))
    k = int(round(fraction * images.shape[0]))
    return images[perm[:k]], images[perm[k:]]


def eval_pairs(images: Tensor, count: int, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``count`` random (moving, fixed) pairs of distinct images."""
    gen = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    i = torch.randint(n, (count,), generator=gen)
    j = (i + torch.randint(1, n, (count,), generator=gen)) % n
    return images[i], images[j]


def build_model(*, shape=(SIZE, SIZE), composed_steps: int = COMPOSED_STEPS, hidden=(50, 50)):
    """``composed_steps`` MLPs (two hidden layers of 50, zero last layer) as nested TwoSteps."""
    return multistep([MLP(shape, channels=1, hidden=hidden) for _ in range(composed_steps)])


@torch.no_grad()
def evaluate(model, moving: Tensor, fixed: Tensor) -> dict:
    """Mean SSD before / after and the mean fraction of folded cells over the pairs."""
    phi = model(moving, fixed).on_grid(moving.shape[2:], batch=moving.shape[0], dtype=moving.dtype,
                                       device=moving.device)
    return {"ssd_before": float(losses.ssd(moving, fixed)),
            "ssd_after": float(losses.ssd(warp(moving, phi), fixed)),
            "folds_fraction": float(losses.folds_fraction(phi))}


@torch.no_grad()
def per_step(model, moving: Tensor, fixed: Tensor, templates: dict) -> dict:
    """Mean SSD of the moving image warped by the first k steps (k = 0 .. K) to the fixed image and
    to each template (the mean image of a digit class): does a step pull a 7 towards a 5?"""
    shape, batch = moving.shape[2:], moving.shape[0]
    warped = [moving] + [warp(moving, t.on_grid(shape, batch=batch, dtype=moving.dtype, device=moving.device))
                         for t in step_transforms(model, moving, fixed)]
    return {"ssd_to_fixed": [float(losses.ssd(w, fixed)) for w in warped],
            "ssd_to_mean": {str(d): [float(losses.ssd(w, tmpl.expand_as(w))) for w in warped]
                            for d, tmpl in templates.items()}}


@torch.no_grad()
def figure(model, moving: Tensor, fixed: Tensor, path: pathlib.Path, *, title: str = "") -> None:
    """Rows of examples: moving, fixed, warped, deformed grid over the warped image, then the moving
    image warped by the first k steps (k = 1 .. K-1), to see what each step does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape, batch = moving.shape[2:], moving.shape[0]
    maps = [t.on_grid(shape, batch=batch, dtype=moving.dtype, device=moving.device)
            for t in step_transforms(model, moving, fixed)]
    warped = [warp(moving, m).cpu() for m in maps]
    phi = maps[-1].cpu()
    inter = warped[:-1]
    cols = 4 + len(inter)
    fig, axes = plt.subplots(batch, cols, figsize=(1.35 * cols, 1.4 * batch + 0.5), squeeze=False)
    heads = ["moving", "fixed", "warped", "grid on warped"] + [f"after step {k + 1}" for k in range(len(inter))]
    levels = torch.linspace(0, 1, 15).tolist()
    for r in range(batch):
        panels = [moving[r, 0].cpu(), fixed[r, 0].cpu(), warped[-1][r, 0], warped[-1][r, 0]] + [w[r, 0] for w in inter]
        for c, img in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if c == 3:
                # Lines of constant moving-image coordinate, drawn in the fixed frame: the moving
                # image's square grid as phi deforms it.
                ax.contour(phi[r, 0].numpy(), levels=levels, colors="tab:orange", linewidths=0.5)
                ax.contour(phi[r, 1].numpy(), levels=levels, colors="tab:cyan", linewidths=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heads[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(train: list[int], eval: list[int], out_dir: pathlib.Path, *, seed: int = 0, progress: bool = True,
        steps: int | None = None, composed_steps: int = COMPOSED_STEPS, lam: float = LAM,
        batch_size: int = 64, lr: float = 1e-3, eval_pairs_per_digit: int = 100, figure_rows: int = 6,
        device=None) -> dict:
    """Train a multistep MLP registration on pairs of the ``train`` digits, evaluate on ``eval`` digits.

    Args:
        train: digit classes whose training images form the training pairs (pairs within one class).
        eval: digit classes to evaluate on (held-out images only).
        out_dir: where metrics.json, per_step.json, train_log.json and digits_<d>.png go (created).
        seed: seeds the data split, the pairs, and the network initialisation.
        progress: print the training loss as it goes.
        steps: training iterations (Adam steps); None -> DEFAULT_ITERATIONS.
        composed_steps: K, the number of composed registration steps (networks).
        lam: weight of the diffusion regulariser.
        device: torch device; None -> CUDA when available, else CPU.

    Returns the metrics written to metrics.json: {"<d>": {"ssd_before", "ssd_after", "folds_fraction"}}.
    """
    train_digits, eval_digits = [int(d) for d in train], [int(d) for d in eval]
    if not train_digits or not eval_digits:
        raise ValueError("train and eval must each name at least one digit")
    for d in train_digits + eval_digits:
        if d not in range(10):
            raise ValueError(f"digits must be integers 0..9, got {d}")
    iterations = DEFAULT_ITERATIONS if steps is None else steps
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"steps must be a non-negative integer or None, got {steps!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    splits = {d: split(load_digits(d), seed=seed + d) for d in sorted(set(train_digits + eval_digits))}
    torch.manual_seed(seed)
    model = build_model(composed_steps=composed_steps).to(device)
    groups = [splits[d][0].to(device) for d in train_digits]
    if progress:
        print(f"training a {composed_steps}-step MLP registration on pairs of digit(s) {train_digits} "
              f"({sum(g.shape[0] for g in groups)} images) for {iterations} iterations on {device}", flush=True)
    start = time.perf_counter()
    history = train_registration(model, groups, iterations=iterations, batch_size=batch_size, lr=lr, lam=lam,
                                 seed=seed, progress=progress, log_every=max(1, iterations // 10))
    seconds = time.perf_counter() - start

    metrics, steps_log = {}, {}
    # Mean image of each class's training part (after none of our warps): the "prototype" digits.
    templates = {d: splits[d][0].mean(0, keepdim=True).to(device) for d in sorted(set(train_digits + eval_digits))}
    for d in eval_digits:
        held_out = splits[d][1].to(device)
        moving, fixed = eval_pairs(held_out, eval_pairs_per_digit, seed=seed + 100 + d)
        metrics[str(d)] = evaluate(model, moving, fixed)
        steps_log[str(d)] = per_step(model, moving, fixed, templates)
        rows = min(figure_rows, moving.shape[0])
        figure(model, moving[:rows], fixed[:rows], out_dir / f"digits_{d}.png",
               title=f"held-out {d}s, model trained on {'/'.join(map(str, train_digits))}s "
                     f"({composed_steps} steps, SSD + {lam}·diffusion)")
        if progress:
            m = metrics[str(d)]
            print(f"digit {d}: ssd {m['ssd_before']:.4f} -> {m['ssd_after']:.4f}, "
                  f"folds {100 * m['folds_fraction']:.3f} %", flush=True)
            st = steps_log[str(d)]
            print("  after k steps, k = 0..K: ssd to fixed " + " ".join(f"{v:.4f}" for v in st["ssd_to_fixed"]),
                  flush=True)
            for t, values in st["ssd_to_mean"].items():
                print(f"  ssd to the mean {t}: " + " ".join(f"{v:.4f}" for v in values), flush=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out_dir / "per_step.json").write_text(json.dumps(steps_log, indent=2))
    log = {"train": train_digits, "eval": eval_digits, "seed": seed, "iterations": iterations,
           "composed_steps": composed_steps, "lam": lam, "batch_size": batch_size, "lr": lr,
           "device": str(device), "train_seconds": seconds, "history": history}
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=2))
    return metrics
