"""Multistep MLP registration on the UCI handwritten digits that scikit-learn ships (no download).

The experiment of icon_registration's multistep example: ONE fully connected network applied K = 9
times with shared weights, each application registering the image warped by the previous ones
(``multistep(MLP(...), steps=9)``); ``shared=False`` gives each step its own network instead.

``run([5], [5, 7], out)`` trains on random pairs of 5s and evaluates on held-out pairs of each eval
digit: it writes ``metrics.json`` ({"5": {"ssd_before", "ssd_after", "folds_fraction"}, ...}),
``train_log.json`` (settings, loss history, the classifier's held-out accuracy), ``per_step.json``
(per eval digit and for k = 0..K applications: the mean SSD of the moving image warped by the
first k applications to the fixed image and to each digit's mean image, and the fraction of those
warped images that a digit classifier calls each digit) and one figure ``digits_<d>.png`` per eval
digit.

Data: ``sklearn.datasets.load_digits`` (1797 images of 8×8, intensities 0..16). Each image is
scaled to [0, 1], upsampled bilinearly to 20×20 and zero-padded to 28×28, the layout of MNIST
(digit in the central 20×20, empty margin where it can be deformed into). Each digit class is split
once, by ``seed``, into 70 % training and 30 % held-out images; evaluation pairs come only from
the held-out part, and the classifier is trained inside the run on the training parts of all ten
classes (so it has never seen an image that is evaluated).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pathlib
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from torch import nn

from .._atomic import atomic_write, write_text
from . import losses
from .steps import SCHEDULES, multistep, step_networks, step_transforms
from .steps import train as train_registration  # run() has a parameter named train
from .networks import MLP
from .transforms import warp

SIZE = 28
DIGIT_SIZE = 20
TRAIN_FRACTION = 0.7
COMPOSED_STEPS = 9  # applications of the network, as in the experiment (1 + 8 TwoSteps)
HIDDEN = (200, 200)  # FCNet's 8000/3000 costs ~2.6 s an iteration on 2 cores; 200/200 ~0.05 s
BATCH_SIZE = 64  # per second of CPU, more small batches beat fewer of 128 (measured, README)
DEFAULT_ITERATIONS = 1000  # ~55 s on 2 idle CPU cores at batch 64
ICON_LMBDA = 0.05  # the experiment's DiffusionRegularizedNet(..., lmbda=0.05)
LAM = losses.icon_diffusion_weight(ICON_LMBDA, (SIZE, SIZE))  # the same objective in our units: ~0.0134
CLASSIFIER_HIDDEN = 32
CLASSIFIER_ITERATIONS = 100  # ~97 % right on held-out digits; more steps do not help


@functools.lru_cache(maxsize=1)
def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'fastlddmm[image]'") from err
    data = _sk_load_digits()
    return data.images, data.target


def load_digits(digit: int | None = None, *, size: int = SIZE, digit_size: int = DIGIT_SIZE,
                dtype=torch.float32) -> Tensor:  # (N, 1, size, size)
    """The scikit-learn digits (of one class, or all) as (N, 1, size, size) images in [0, 1]."""
    if not 8 <= digit_size <= size:
        raise ValueError(f"digit_size must lie in [8, size={size}], got {digit_size}")
    raw, target = _sklearn_digits()
    images = torch.as_tensor(raw, dtype=dtype)
    if digit is not None:
        if digit not in range(10):
            raise ValueError(f"digit must be an integer 0..9, got {digit!r}")
        images = images[torch.as_tensor(target) == digit]
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


def build_model(*, shape=(SIZE, SIZE), composed_steps: int = COMPOSED_STEPS, hidden=HIDDEN,
                shared: bool = True) -> nn.Module:
    """The multistep registration: K = ``composed_steps`` applications of an MLP (zero last layer).

    shared=True: ONE MLP applied K times (the experiment); shared=False: K independent MLPs.
    """
    if shared:
        return multistep(MLP(shape, channels=1, hidden=hidden), steps=composed_steps)
    return multistep([MLP(shape, channels=1, hidden=hidden) for _ in range(composed_steps)])


def train_classifier(images: Tensor,  # (N, 1, H, W)
                     labels: Tensor,  # (N,) integers 0..9
                     *, hidden: int = CLASSIFIER_HIDDEN, iterations: int = CLASSIFIER_ITERATIONS, lr: float = 1e-2,
                     seed: int = 0) -> nn.Module:
    """A small digit classifier (flattened image -> ``hidden`` ReLU units -> 10 logits), full-batch
    Adam on cross-entropy. Deterministic for a seed; leaves the global random state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = nn.Sequential(nn.Flatten(), nn.Linear(images[0].numel(), hidden), nn.ReLU(), nn.Linear(hidden, 10))
    clf = clf.to(images.device)
    optimiser = torch.optim.Adam(clf.parameters(), lr=lr, weight_decay=1e-4)
    labels = labels.to(images.device)
    for _ in range(iterations):
        loss = F.cross_entropy(clf(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return clf.eval()


@torch.no_grad()
def classify(clf: nn.Module, images: Tensor) -> Tensor:  # (N, 1, H, W) -> (N,) predicted digits
    return clf(images).argmax(1)


@torch.no_grad()
def evaluate(model, moving: Tensor, fixed: Tensor) -> dict:
    """Mean SSD before / after and the mean fraction of folded cells over the pairs."""
    phi = model(moving, fixed).on_grid(moving.shape[2:], batch=moving.shape[0], dtype=moving.dtype,
                                       device=moving.device)
    return {"ssd_before": float(losses.ssd(moving, fixed)),
            "ssd_after": float(losses.ssd(warp(moving, phi), fixed)),
            "folds_fraction": float(losses.folds_fraction(phi))}


@torch.no_grad()
def per_step(model, moving: Tensor, fixed: Tensor, templates: dict, classifier: nn.Module | None = None) -> dict:
    """After k applications (k = 0 .. K, so K + 1 entries in each list): mean SSD of the moving image
    warped by the first k to the fixed image and to each template (the mean image of a digit class),
    and ``classified_as``: for each of the ten digits, the fraction of the warped images that
    ``classifier`` calls that digit (the ten fractions after k applications sum to 1). Does a step
    turn a 7 into a 5?"""
    shape, batch = moving.shape[2:], moving.shape[0]
    warped = [moving] + [warp(moving, t.on_grid(shape, batch=batch, dtype=moving.dtype, device=moving.device))
                         for t in step_transforms(model, moving, fixed)]
    out = {"ssd_to_fixed": [float(losses.ssd(w, fixed)) for w in warped],
           "ssd_to_mean": {str(d): [float(losses.ssd(w, tmpl.expand_as(w))) for w in warped]
                           for d, tmpl in templates.items()}}
    if classifier is not None:
        predicted = [classify(classifier, w) for w in warped]
        counts = [torch.bincount(p, minlength=10).tolist() for p in predicted]
        out["classified_as"] = {str(c): [n[c] / batch for n in counts] for c in range(10)}
    return out


@torch.no_grad()
def figure(model, moving: Tensor, fixed: Tensor, path: pathlib.Path, *, title: str = "") -> None:
    """Rows of examples: moving, fixed, warped, deformed grid over the warped image, then the moving
    image warped by the first k applications (k = 1 .. K-1), to see what each one does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape, batch = moving.shape[2:], moving.shape[0]
    maps = [t.on_grid(shape, batch=batch, dtype=moving.dtype, device=moving.device)
            for t in step_transforms(model, moving, fixed)]
    warped = [warp(moving, m).cpu() for m in maps]
    phi = maps[-1].cpu()
    inter = warped[:-1]
    heads = ["moving", "fixed", "warped", "grid on warped"] + [f"after {k + 1}" for k in range(len(inter))]
    cols, (h, w), gap = len(heads), shape, 3
    # One mosaic image on one axes (a grid of 6 × 12 subplots took ~4 s to build and lay out).
    canvas = torch.full((batch * (h + gap) - gap, cols * (w + gap) - gap), float("nan"))
    for r in range(batch):
        panels = [moving[r, 0].cpu(), fixed[r, 0].cpu(), warped[-1][r, 0], warped[-1][r, 0]] + [x[r, 0] for x in inter]
        for c, img in enumerate(panels):
            canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = img
    fig, ax = plt.subplots(figsize=(1.2 * cols, 1.2 * batch + 0.6))
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    ax.imshow(canvas.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    levels = torch.linspace(0, 1, 15).tolist()
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for r in range(batch):
        # Lines of constant moving-image coordinate, drawn in the fixed frame: the moving image's
        # square grid as phi deforms it.
        x0, y0 = 3 * (w + gap), r * (h + gap)
        for i, colour in ((0, "tab:orange"), (1, "tab:cyan")):
            ax.contour((xs + x0).numpy(), (ys + y0).numpy(), phi[r, i].numpy(), levels=levels, colors=colour,
                       linewidths=0.5)
    for c, head in enumerate(heads):
        ax.text(c * (w + gap) + (w - 1) / 2, -1.5, head, ha="center", va="bottom", fontsize=7)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9, pad=14)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def idle_threads(limit: int | None = None) -> int:
    """Intra-op threads worth using now: torch's count (or ``limit``, at most the cores), or 1 when
    the 1-minute load average says other processes keep every core busy (load ≥ cores + 1).

    This workload is hundreds of small ops an iteration (28×28 grid_samples, 64-row matmuls), each
    ending at a thread barrier. Measured on 2 cores (README): 2 threads beat 1 by 1.8× when idle and
    1.4× at load 2.7, but lose by 7× at load 7 and by 15× at load 4.6, where every barrier waits for
    a thread the scheduler has put aside.
    """
    cores = os.cpu_count() or 1
    limit = min(torch.get_num_threads() if limit is None else limit, cores)
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - no load average on this platform
        return limit
    return 1 if busy >= cores + 1 else max(1, limit)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(train: list[int], eval: list[int], out_dir: pathlib.Path, *, seed: int = 0, progress: bool = True,
        steps: int | None = None, seconds: float | None = None, composed_steps: int = COMPOSED_STEPS,
        shared: bool = True, hidden=HIDDEN, lam: float = LAM, batch_size: int = BATCH_SIZE, lr: float = 1e-3,
        schedule: str = "cosine", eval_pairs_per_digit: int = 100, figure_rows: int = 6, device=None,
        threads: int | None = None) -> dict:
    """Train a multistep MLP registration on pairs of the ``train`` digits, evaluate on ``eval`` digits.

    Args:
        train: digit classes whose training images form the training pairs (pairs within one class).
        eval: digit classes to evaluate on (held-out images only).
        out_dir: where metrics.json, per_step.json, train_log.json and digits_<d>.png go (created).
        seed: seeds the data split, the pairs, and the network initialisation.
        progress: print the training loss as it goes.
        steps: training iterations (Adam steps); None -> DEFAULT_ITERATIONS, or no iteration limit
            when ``seconds`` is given.
        seconds: train for this many seconds (the learning-rate schedule follows the time); with
            ``steps`` too, training stops at whichever limit comes first.
        composed_steps: K, the number of applications of the network (of networks if not shared).
        shared: one network applied K times (True, the experiment) or K independent networks.
        hidden: widths of the MLP's hidden layers.
        lam: weight of the diffusion regulariser (default: icon's lmbda = 0.05 in our units).
        schedule: "cosine" (learning rate lr -> 0 over the run) or "constant".
        device: torch device; None -> CUDA when available, else CPU.
        threads: intra-op CPU threads for the run (restored afterwards); None -> :func:`idle_threads`.

    Returns the metrics written to metrics.json: {"<d>": {"ssd_before", "ssd_after", "folds_fraction"}}.
    """
    train_digits, eval_digits = [int(d) for d in train], [int(d) for d in eval]
    if not train_digits or not eval_digits:
        raise ValueError("train and eval must each name at least one digit")
    for d in train_digits + eval_digits:
        if d not in range(10):
            raise ValueError(f"digits must be integers 0..9, got {d}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be a non-negative integer or None, got {steps!r}")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not math.isfinite(seconds) or seconds <= 0):
        raise ValueError(f"seconds must be a positive number or None, got {seconds!r}")
    if isinstance(composed_steps, bool) or not isinstance(composed_steps, int) or composed_steps < 1:
        raise ValueError(f"composed_steps must be a positive integer, got {composed_steps!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    with _threads(idle_threads() if threads is None else threads):
        return _run(train_digits, eval_digits, out_dir, seed=seed, progress=progress, steps=steps, seconds=seconds,
                    composed_steps=composed_steps, shared=shared, hidden=hidden, lam=lam, batch_size=batch_size,
                    lr=lr, schedule=schedule, eval_pairs_per_digit=eval_pairs_per_digit, figure_rows=figure_rows,
                    device=device)


def _run(train_digits, eval_digits, out_dir, *, seed, progress, steps, seconds, composed_steps, shared, hidden, lam,
         batch_size, lr, schedule, eval_pairs_per_digit, figure_rows, device) -> dict:
    iterations = DEFAULT_ITERATIONS if steps is None and seconds is None else steps
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Every class is split (the classifier trains on all ten training parts); the split of class d
    # depends on (seed, d) only, so adding a class never changes another's held-out images.
    splits = {d: split(load_digits(d), seed=seed + d) for d in range(10)}
    torch.manual_seed(seed)
    model = build_model(composed_steps=composed_steps, hidden=hidden, shared=shared).to(device)
    parameters = sum(p.numel() for p in model.parameters())  # shared parameters counted once
    groups = [splits[d][0].to(device) for d in train_digits]
    if progress:
        kind = (f"one MLP {tuple(hidden)} applied {composed_steps} times (shared weights)" if shared
                else f"{composed_steps} independent MLPs {tuple(hidden)}")
        limit = " and ".join(x for x in (f"{iterations} iterations" if iterations is not None else "",
                                          f"{seconds:g} s" if seconds is not None else "") if x)
        print(f"training {kind}, {parameters} parameters, on pairs of digit(s) {train_digits} "
              f"({sum(g.shape[0] for g in groups)} images) for {limit} on {device} "
              f"({torch.get_num_threads()} threads)", flush=True)
    log_every = max(1, iterations // 10) if iterations else 100
    start = time.perf_counter()
    history = train_registration(model, groups, iterations=iterations, seconds=seconds, batch_size=batch_size,
                                 lr=lr, schedule=schedule, lam=lam, seed=seed, progress=progress,
                                 log_every=log_every)
    train_seconds = time.perf_counter() - start

    # A classifier of the ten digits, trained here on the training splits only.
    clf_images = torch.cat([splits[d][0] for d in range(10)]).to(device)
    clf_labels = torch.cat([torch.full((splits[d][0].shape[0],), d) for d in range(10)])
    classifier = train_classifier(clf_images, clf_labels, seed=seed)
    held_images = torch.cat([splits[d][1] for d in range(10)]).to(device)
    held_labels = torch.cat([torch.full((splits[d][1].shape[0],), d) for d in range(10)]).to(device)
    clf_accuracy = float((classify(classifier, held_images) == held_labels).float().mean())
    if progress:
        print(f"trained in {train_seconds:.1f} s ({history[-1]['iteration'] + 1 if history else 0} iterations); "
              f"digit classifier: {100 * clf_accuracy:.1f} % right on the held-out images of all ten digits",
              flush=True)

    metrics, steps_log = {}, {}
    # Mean image of each class's training part (after none of our warps): the "prototype" digits.
    templates = {d: splits[d][0].mean(0, keepdim=True).to(device) for d in sorted(set(train_digits + eval_digits))}
    for d in eval_digits:
        held_out = splits[d][1].to(device)
        moving, fixed = eval_pairs(held_out, eval_pairs_per_digit, seed=seed + 100 + d)
        metrics[str(d)] = evaluate(model, moving, fixed)
        steps_log[str(d)] = per_step(model, moving, fixed, templates, classifier)
        rows = min(figure_rows, moving.shape[0])
        figure(model, moving[:rows], fixed[:rows], out_dir / f"digits_{d}.png",
               title=f"held-out {d}s, trained on {'/'.join(map(str, train_digits))}s "
                     f"({'one MLP applied' if shared else 'independent MLPs,'} {composed_steps}"
                     f"{' times' if shared else ' steps'}, SSD + {lam:.4g}·diffusion)")
        if progress:
            m = metrics[str(d)]
            print(f"digit {d}: ssd {m['ssd_before']:.4f} -> {m['ssd_after']:.4f} "
                  f"(ratio {m['ssd_after'] / m['ssd_before']:.3f}), folds {100 * m['folds_fraction']:.3f} %",
                  flush=True)
            st = steps_log[str(d)]
            print("  after k applications, k = 0..K: ssd to fixed "
                  + " ".join(f"{v:.4f}" for v in st["ssd_to_fixed"]), flush=True)
            for t, values in st["ssd_to_mean"].items():
                print(f"  ssd to the mean {t}: " + " ".join(f"{v:.4f}" for v in values), flush=True)
            shown = sorted(set(train_digits) | {d})  # the other digits' fractions summed as "other"
            for c in shown:
                print(f"  classified as {c}: " + " ".join(f"{v:.2f}" for v in st["classified_as"][str(c)]), flush=True)
            other = [1.0 - sum(st["classified_as"][str(c)][k] for c in shown) for k in range(len(st["ssd_to_fixed"]))]
            print("  classified as another digit: " + " ".join(f"{v:.2f}" for v in other), flush=True)
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    write_text(out_dir / "per_step.json", json.dumps(steps_log, indent=2))
    log = {"train": train_digits, "eval": eval_digits, "seed": seed, "iterations": iterations, "seconds": seconds,
           "iterations_run": history[-1]["iteration"] + 1 if history else 0,
           "composed_steps": composed_steps, "shared": shared, "hidden": list(hidden), "parameters": parameters,
           "distinct_step_networks": len({id(n) for n in step_networks(model)}),
           "lam": lam, "icon_lmbda_equivalent": lam / losses.icon_diffusion_weight(1.0, (SIZE, SIZE)),
           "batch_size": batch_size, "lr": lr, "schedule": schedule, "device": str(device),
           "threads": torch.get_num_threads(), "train_seconds": train_seconds,
           "classifier": {"network": f"{SIZE * SIZE}-{CLASSIFIER_HIDDEN}-10 MLP, {CLASSIFIER_ITERATIONS} full-batch Adam steps",
                          "trained_on": "the training split of all ten digits (this run)",
                          "held_out_accuracy": clf_accuracy},
           "history": history}
    write_text(out_dir / "train_log.json", json.dumps(log, indent=2))
    return metrics
