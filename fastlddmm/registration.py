"""fl.register: fit a ResNet-LDDMM flow that carries a source cloud onto a target cloud.

    loss(θ) = D(φ_θ(source), target) / (2σ²)  +  ½ Σ_l Δ · mean_i |v_l(x_i^l)|²

The optimisation runs in normalised coordinates: both clouds are centred on their joint centroid and
scaled so that the farthest point lies at distance 1. σ and Sinkhorn's blur are therefore relative to the
size of the shapes, and the same defaults work for a face in pixels and a femur in millimetres.
The returned Registration maps points given in the original coordinates.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import dispatch
from ._atomic import atomic_write
from ._validation import check_choice, check_pair, check_points, check_positive
from .flow import ResNetFlow
from .mesh import FLIP_WARNING, FoldBarrier, FoldWarning, check_faces
from .ops.flow.reference import ACTIVATIONS

DATA_TERMS = ("sinkhorn", "chamfer", "l2")
OPTIMIZERS = ("adam", "lbfgs")
_FORMAT_VERSION = 1


QUALITIES = ("fast", "balanced", "best")


@dataclass(frozen=True)
class RegisterDefaults:
    """register()'s defaults, in one place: the command line reads them too (and its choices come from
    DATA_TERMS, OPTIMIZERS, ACTIVATIONS, QUALITIES and fastlddmm.dispatch.BACKENDS). The settings marked
    "preset" are None here: a None argument takes the value of the quality preset (PRESETS)."""

    quality: str = "fast"
    data_term: str = "sinkhorn"
    sigma: float | None = None  # preset
    width: int | None = None  # preset
    layers: int | None = None  # preset
    steps: int | None = None  # preset
    lr: float | None = None  # 5e-3 for Adam, 1.0 for L-BFGS
    optimizer: str = "adam"
    activation: str = "relu"
    blur: float = 0.02
    fold_penalty: float | None = None  # preset (meshes only)
    seed: int = 0
    backend: str = "auto"
    checkpoint_every: int = 50


DEFAULTS = RegisterDefaults()
DEFAULT_LR = {"adam": 5e-3, "lbfgs": 1.0}


@dataclass(frozen=True)
class Stage:
    """One stage of a registration's schedule: ``steps`` optimiser steps with these settings.

    None means register()'s own value (its ``data_term``, ``sigma``, ``blur``, ``optimizer``, ``lr``).
    ``points``: optimise on a fixed random subset of at most this many source and target points (the same
    subset for the whole stage, drawn from the seed and the stage's index; None: every point). Coarse stages
    on a few thousand points cost a fraction of a full step and see the same large-scale shape.
    The optimiser starts afresh at each stage (Adam's moments, L-BFGS's memory).
    """

    steps: int
    data_term: str | None = None
    sigma: float | None = None
    blur: float | None = None
    optimizer: str | None = None
    lr: float | None = None
    points: int | None = None


@dataclass(frozen=True)
class Preset:
    """A quality preset: the flow's size, the final σ and a schedule written relative to ``steps`` and σ.

    ``stages``: (fraction of steps, σ factor, blur factor, points or None) for each Adam (or ``optimizer``)
    stage, coarse to fine; the last factors should be 1 (the fit ends at the σ and blur asked for).
    ``refine``: L-BFGS steps added at the end, at the final σ and blur, on every point (0: none).
    """

    width: int
    layers: int
    steps: int
    sigma: float
    stages: tuple[tuple[float, float, float, int | None], ...]
    refine: int = 0
    fold_penalty: float = 0.0  # FoldBarrier's weight when register() is given faces


# Chosen from runs of benchmarks/articulated.py (an articulated figure of 10^4 vertices, Chamfer data term;
# figures in benchmarks/results/articulated.md and the README, "Registration quality"). "fast" is register()'s
# behaviour from before presets existed (500 Adam steps, width 128, 10 layers, every point): ~1% Chamfer
# ratio in ~8 s there, a few flipped triangles. "balanced" first fits a smoother map (σ x 3, a weaker data
# term) on a 3000-point subset, then the full problem, then 10 L-BFGS steps, which gain most per second
# (300 Adam + 10 L-BFGS: 0.59% in 8.7 s; 800 Adam, no L-BFGS: 1.2% in 13 s); on meshes the fold barrier
# keeps the triangles from turning over (weight 100: 0 flipped where 1 and 10 left 1-3, 0 left 17-31).
# "best": a wider, deeper flow (the paper's direction), 2000 Adam + 50 L-BFGS steps: ~0.35% in ~100 s.
_COARSE_TO_FINE = ((0.3, 3.0, 2.5, 3000), (0.7, 1.0, 1.0, None))
PRESETS = {
    "fast": Preset(width=128, layers=10, steps=500, sigma=0.1, stages=((1.0, 1.0, 1.0, None),)),
    "balanced": Preset(width=128, layers=10, steps=300, sigma=0.1, stages=_COARSE_TO_FINE, refine=10,
                       fold_penalty=100.0),
    "best": Preset(width=256, layers=20, steps=2000, sigma=0.1, stages=_COARSE_TO_FINE, refine=50,
                   fold_penalty=100.0),
}


class RegistrationDiverged(RuntimeError):
    """The loss or its gradient stopped being finite; ``partial`` holds the last finite Registration."""

    def __init__(self, message: str, step: int, partial: "Registration"):
        super().__init__(message)
        self.step = step
        self.partial = partial


def _atomic_torch_save(obj, path: Path) -> None:
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def data_term_value(kind: str, moved: Tensor, target: Tensor, *, blur: float, backend: str) -> Tensor:
    """D(moved, target) for the data term called ``kind`` (points in normalised coordinates)."""
    if kind == "l2":
        return ((moved - target) ** 2).sum(-1).mean()
    from . import distances  # late import: distances pulls in the optional KeOps / Triton paths

    if kind == "chamfer":
        return distances.chamfer(moved, target, backend=backend)
    return distances.sinkhorn(moved, target, blur=blur, backend=backend)


class Registration:
    """A fitted flow, with the normalisation that maps original coordinates to the flow's.

    Attributes:
        flow: the ResNetFlow (acting in normalised coordinates).
        center: (D,) and scale: float, with normalised = (x - center) / scale.
        config: the arguments of register() (plain dict).
        history: {"loss", "data", "energy", "stage"}: one value per optimisation step ("stage": the index
            of the schedule's stage the step belongs to, config["schedule"][stage]).
        source, target: the clouds it was fitted on (original coordinates, CPU tensors).
        faces: (F, 3) int64 triangles of the source when it is a mesh, else None.
    """

    def __init__(self, flow: ResNetFlow, center: Tensor, scale: float, config: dict, history: dict,
                 source: Tensor | None = None, target: Tensor | None = None, faces: Tensor | None = None):
        self.flow = flow
        self.center = center
        self.scale = float(scale)
        self.config = dict(config)
        self.history = {k: list(v) for k, v in history.items()}
        self.source = source
        self.target = target
        self.faces = faces

    def __repr__(self) -> str:
        steps = len(self.history.get("loss", []))
        return f"Registration(dim={self.flow.dim}, data_term={self.config.get('data_term')!r}, steps={steps})"

    # -- coordinates -------------------------------------------------------------------------------
    def _to_flow(self, points) -> tuple[Tensor, Callable]:
        """Points → normalised tensor on the flow's device/dtype, and a function mapping results back."""
        is_numpy = isinstance(points, np.ndarray)
        t = torch.as_tensor(points) if is_numpy else points
        check_points(t, "points", allow_batch=False, allow_empty=True)
        if t.shape[-1] != self.flow.dim:
            raise ValueError(f"points must have {self.flow.dim} coordinates, got shape {tuple(t.shape)}")
        p = self.flow.weight1
        z = (t.to(device=p.device, dtype=p.dtype) - self.center.to(p)) / self.scale

        def back(out: Tensor, *, positions: bool = True):
            if positions:
                out = out * self.scale + self.center.to(out)
            out = out.detach()
            return out.cpu().numpy() if is_numpy else out.to(device=t.device, dtype=t.dtype)

        return z, back

    def transform(self, points):  # (K, D) -> (K, D)
        """φ_1(points): the points carried along the whole flow (original coordinates)."""
        z, back = self._to_flow(points)
        with torch.no_grad():
            return back(self.flow(z) if z.shape[0] else z)

    def trajectory(self, points):  # (K, D) -> (layers + 1, K, D)
        """The points at every time l/L, l = 0 .. L (original coordinates)."""
        z, back = self._to_flow(points)
        with torch.no_grad():
            return back(self.flow.trajectory(z))

    def inverse(self, points, *, iterations: int = 50):  # (K, D) -> (K, D)
        """φ_1^{-1}(points): each Euler step undone by a fixed-point solve, last step first."""
        z, back = self._to_flow(points)
        return back(self.flow.inverse(z, iterations=iterations))

    def jacobian_determinant(self, points):  # (K, D) -> (K,)
        """det Dφ_1 at each point (the normalisation is a similarity, so it cancels). > 0: no fold."""
        z, back = self._to_flow(points)
        return back(self.flow.jacobian_determinant(z), positions=False)

    def jacobian(self, points):  # (K, D) -> (K, D, D)
        """Dφ_1 at each point (the normalisation is a similarity: the scales cancel)."""
        z, back = self._to_flow(points)
        return back(self.flow.jacobian(z), positions=False)

    def fold_report(self, faces=None, points=None) -> dict:
        """How much φ folds the source: the smallest det Dφ at its points and how many points have det ≤ 0;
        for a mesh (``faces`` (F, 3), default self.faces), how many triangles flip (fastlddmm.mesh.flipped:
        the warped normal against the one Dφ carries, or det Dφ ≤ 0 at the triangle).

        Returns {"points", "min_jacobian_determinant", "folded_points"} and, with faces, {"triangles",
        "flipped_triangles", "flipped_fraction"} (plain Python numbers)."""
        points = self.source if points is None else points
        if points is None:
            raise ValueError("this registration keeps no source (a distributed shard): pass points=")
        pts = torch.as_tensor(points)
        det = self.jacobian_determinant(pts).double()
        report = {"points": int(pts.shape[0]), "min_jacobian_determinant": float(det.min()) if det.numel() else None,
                  "folded_points": int((det <= 0).sum())}
        faces = self.faces if faces is None else faces
        if faces is not None:
            flips = self.flipped_triangles(faces, pts)
            report.update(triangles=int(faces.shape[0]), flipped_triangles=int(flips.sum()),
                          flipped_fraction=float(flips.double().mean()) if faces.shape[0] else 0.0)
        return report

    def flipped_triangles(self, faces=None, points=None) -> Tensor:  # -> (F,) bool
        """Which triangles of the mesh (points, faces; default the source and self.faces) flip under φ."""
        from . import mesh

        pts = torch.as_tensor(self.source if points is None else points)
        faces = mesh.check_faces(self.faces if faces is None else faces, pts.shape[0])
        return mesh.flipped(pts.double(), self.transform(pts).double(),
                            self.jacobian(mesh.centroids(pts, faces)).double(), faces)

    # -- files ---------------------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to rebuild this registration: tensors and plain Python values only."""
        return {
            "format": "fastlddmm.Registration",
            "version": _FORMAT_VERSION,
            "config": self.config,
            "flow": {k: v.detach().cpu() for k, v in self.flow.state_dict().items()},
            "center": self.center.detach().cpu(),
            "scale": self.scale,
            "history": self.history,
            "source": None if self.source is None else self.source.detach().cpu(),
            "target": None if self.target is None else self.target.detach().cpu(),
            "faces": None if self.faces is None else self.faces.detach().cpu(),
        }

    def save(self, path) -> None:
        """One file with the config, the weights, the normalisation and the history (written atomically)."""
        _atomic_torch_save(self.state(), Path(path))

    @classmethod
    def from_state(cls, state: dict, *, device=None) -> "Registration":
        if not isinstance(state, dict) or state.get("format") != "fastlddmm.Registration":
            raise ValueError("not a fastlddmm registration file")
        if state.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported registration file version {state.get('version')!r}")
        cfg = state["config"]
        weights = state["flow"]
        flow = ResNetFlow(dim=int(cfg["dim"]), width=int(cfg["width"]), layers=int(cfg["layers"]),
                          activation=cfg["activation"], backend=cfg.get("backend", "auto"))
        flow = flow.to(dtype=weights["weight1"].dtype)
        flow.load_state_dict(weights)
        if device is not None:
            flow = flow.to(device)
        return cls(flow, state["center"], state["scale"], cfg, state["history"], state.get("source"),
                   state.get("target"), state.get("faces"))

    @classmethod
    def load(cls, path, *, device=None) -> "Registration":
        """Loads a file written by save(). Only tensors and plain values are read (weights_only=True):
        no code from the file is executed."""
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch raises several types for a corrupt or foreign file
            raise ValueError(f"cannot read registration file {str(path)!r}: {err.__class__.__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return cls.from_state(state, device=device)




def normalisation(source: Tensor, target: Tensor) -> tuple[Tensor, float]:  # (N, D), (M, D)
    """Joint centroid and radius of both clouds: normalised = (x - center) / scale."""
    both = torch.cat([source, target], dim=0)
    center = both.mean(0)
    scale = float((both - center).norm(dim=-1).max())
    return center, (scale if scale > 0 else 1.0)


class Sharding:
    """How a registration's points are split between processes; this one: not at all (one process).

    register() runs one optimisation loop and asks this object everything sharding changes: the input
    checks (agreed on by every rank), the normalisation, the target (gathered once), the objective's
    terms (per-rank shares of whole-cloud means, collectives in the data terms), the parameter gradients
    (summed over ranks), who shows progress and writes files. fastlddmm.distributed.PointSharding is the
    point-sharded version.
    """

    rank = 0
    world_size = 1

    @property
    def writes(self) -> bool:
        """Whether this process shows progress and writes checkpoints."""
        return self.rank == 0

    def check(self, validate: Callable[[], None], source) -> None:
        validate()

    def normalisation(self, source: Tensor, target: Tensor) -> tuple[Tensor, float]:
        return normalisation(source, target)

    def total_points(self, count: int) -> int:
        """Points of the whole source cloud (the per-point means run over all of them)."""
        return count

    def prepare_target(self, data_term: str, target: Tensor):
        return target

    def start(self, params: list[Tensor]) -> None:
        """Makes every process start from the same parameters."""

    def objective(self, data_term: str, moved: Tensor, target, energy: Tensor, *, weight: float, blur: float,
                  backend: str, total: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(this process's differentiable share of the loss, the whole loss and its terms, detached)."""
        data = data_term_value(data_term, moved, target, blur=blur, backend=backend)
        loss = weight * data + energy
        return loss, {"loss": loss.detach(), "data": data.detach(), "energy": energy.detach()}

    def reduce_gradients(self, params: list[Tensor]) -> None:
        """Sums the parameters' gradients over processes."""

    def config(self) -> dict:
        return {}

    def keeps_clouds(self) -> bool:
        """Whether the result can hold the whole source and target (a shard cannot)."""
        return True


def _validate(source, target, *, data_term, optimizer, activation, sigma, blur, width, layers, steps,
              checkpoint_every, lr, dtype, deterministic, quality, faces, fold_penalty) -> None:
    check_points(source, "source", allow_batch=False)
    check_points(target, "target", allow_batch=False)
    if source.shape[-1] != target.shape[-1]:
        raise ValueError(f"source and target must have the same point dimension, got {source.shape[-1]} and {target.shape[-1]}")
    check_choice(quality, "quality", QUALITIES)
    check_choice(data_term, "data_term", DATA_TERMS)
    check_choice(optimizer, "optimizer", OPTIMIZERS)
    check_choice(activation, "activation", ACTIVATIONS)
    check_positive(sigma, "sigma", allow_none=True)
    check_positive(blur, "blur")
    check_positive(width, "width", integer=True, allow_none=True)
    check_positive(layers, "layers", integer=True, allow_none=True)
    check_positive(steps, "steps", integer=True, allow_none=True)
    check_positive(checkpoint_every, "checkpoint_every", integer=True)
    check_positive(lr, "lr", allow_none=True)
    if data_term == "l2" and source.shape[0] != target.shape[0]:
        raise ValueError(f"data_term='l2' needs one target point per source point, got {source.shape[0]} and {target.shape[0]}")
    if dtype not in (None, torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be True or False, got {deterministic!r}")
    if faces is not None:
        check_faces(faces, source.shape[0])
        if source.shape[-1] not in (2, 3):
            raise ValueError(f"faces need 2-D or 3-D points, got {source.shape[-1]}-D")
    if isinstance(fold_penalty, bool) or not isinstance(fold_penalty, (int, float)) or not fold_penalty >= 0 \
            or not math.isfinite(fold_penalty):
        raise ValueError(f"fold_penalty must be a finite number >= 0, got {fold_penalty!r}")
    if fold_penalty > 0 and faces is None:
        raise ValueError("fold_penalty needs the source's triangles: pass faces=")


def plan(quality: str = DEFAULTS.quality, *, data_term: str = DEFAULTS.data_term, sigma: float | None = None,
         blur: float = DEFAULTS.blur, steps: int | None = None, optimizer: str = DEFAULTS.optimizer,
         lr: float | None = None, schedule=None) -> list[Stage]:
    """The stages register() runs, every field filled in: ``schedule`` (Stages or dicts of Stage's fields,
    None fields taken from the other arguments) when given, else the ``quality`` preset's, scaled to
    ``steps`` and ``sigma`` (None: the preset's)."""
    check_choice(quality, "quality", QUALITIES)
    preset = PRESETS[quality]
    sigma = preset.sigma if sigma is None else sigma

    def filled(stage: Stage, i: int) -> Stage:
        opt = stage.optimizer or optimizer
        check_choice(opt, f"schedule[{i}].optimizer", OPTIMIZERS)
        return Stage(steps=stage.steps, data_term=stage.data_term or data_term,
                     sigma=float(stage.sigma if stage.sigma is not None else sigma),
                     blur=float(stage.blur if stage.blur is not None else blur), optimizer=opt,
                     lr=float(stage.lr if stage.lr is not None else (lr if lr is not None and opt == optimizer
                                                                     else DEFAULT_LR[opt])),
                     points=stage.points)

    if schedule is not None:
        if isinstance(schedule, (Stage, dict)) or not hasattr(schedule, "__iter__"):
            raise TypeError("schedule must be a list of Stage (or dicts of Stage's fields)")
        stages = []
        for i, stage in enumerate(schedule):
            if isinstance(stage, dict):
                unknown = set(stage) - set(Stage.__dataclass_fields__)
                if unknown:
                    raise ValueError(f"schedule[{i}] has unknown field(s) {', '.join(sorted(unknown))}; a stage has "
                                     f"{', '.join(Stage.__dataclass_fields__)}")
                stage = Stage(**stage)
            if not isinstance(stage, Stage):
                raise TypeError(f"schedule[{i}] must be a Stage or a dict, got {type(stage).__name__}")
            stages.append(filled(stage, i))
        if not stages:
            raise ValueError("schedule is empty")
        if steps is not None and steps != sum(st.steps for st in stages):
            raise ValueError(f"steps={steps} but the schedule's stages add up to {sum(st.steps for st in stages)} "
                             f"steps: give one or the other")
    else:
        total = preset.steps if steps is None else steps
        stages, used = [], 0
        for k, (fraction, sigma_factor, blur_factor, points) in enumerate(preset.stages):
            n = total - used if k == len(preset.stages) - 1 else max(1, round(fraction * total))
            n = min(n, total - used)
            if n <= 0:
                continue
            used += n
            stages.append(filled(Stage(n, sigma=sigma * sigma_factor, blur=blur * blur_factor, points=points), k))
        if preset.refine:
            stages.append(filled(Stage(preset.refine, optimizer="lbfgs"), len(stages)))
    for i, st in enumerate(stages):
        where = f"schedule[{i}]"
        check_positive(st.steps, f"{where}.steps", integer=True)
        check_choice(st.data_term, f"{where}.data_term", DATA_TERMS)
        check_choice(st.optimizer, f"{where}.optimizer", OPTIMIZERS)
        check_positive(st.sigma, f"{where}.sigma")
        check_positive(st.blur, f"{where}.blur")
        check_positive(st.lr, f"{where}.lr")
        check_positive(st.points, f"{where}.points", integer=True, allow_none=True)
    return stages


def _make_optimizer(name: str, params: list[Tensor], lr: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.LBFGS(params, lr=lr, max_iter=20, history_size=20, line_search_fn="strong_wolfe")


def _state_dict_copy(flow: ResNetFlow) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in flow.state_dict().items()}


def _subset(count: int, total: int, points: int | None, seed: int, stage: int, device) -> Tensor | None:
    """Indices (sorted) of this process's share of a fixed random subset of ``points`` of ``total`` points,
    or None for all of them. ``count`` of the ``total`` are here (all of them in one process)."""
    if points is None or points >= total:
        return None
    keep = min(count, max(1, round(points * count / total)))
    gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + stage)  # a stream per (seed, stage)
    return torch.randperm(count, generator=gen)[:keep].sort().values.to(device)


def _resume_differences(saved: dict, config: dict) -> set[str]:
    """Settings that differ between a checkpoint's config and this run's (the length of the run may)."""
    differ = {k for k in config if k not in ("steps", "world_size", "schedule") and saved.get(k) != config[k]}
    strip = lambda stages: [{k: v for k, v in st.items() if k != "steps"} for st in stages or []]  # noqa: E731
    if strip(saved.get("schedule"))[: len(config["schedule"])] != strip(config["schedule"])[: len(saved.get("schedule") or [])]:
        differ.add("schedule")
    return differ


def register(
    source: Tensor,  # (N, D)
    target: Tensor,  # (M, D); M == N for data_term="l2" (target[i] corresponds to source[i])
    *,
    quality: str = DEFAULTS.quality,
    data_term: str = DEFAULTS.data_term,
    sigma: float | None = DEFAULTS.sigma,
    width: int | None = DEFAULTS.width,
    layers: int | None = DEFAULTS.layers,
    steps: int | None = DEFAULTS.steps,
    lr: float | None = DEFAULTS.lr,
    optimizer: str = DEFAULTS.optimizer,
    activation: str = DEFAULTS.activation,
    blur: float = DEFAULTS.blur,
    schedule=None,
    faces=None,  # (F, 3) int: triangles of the source (a mesh), for the fold report
    fold_penalty: float | None = DEFAULTS.fold_penalty,
    device=None,
    dtype: torch.dtype | None = None,
    seed: int = DEFAULTS.seed,
    progress: bool = True,
    backend: str = DEFAULTS.backend,
    checkpoint=None,
    checkpoint_every: int = DEFAULTS.checkpoint_every,
    resume: bool = False,
    callback: Callable[[int, dict], None] | None = None,
    deterministic: bool = False,
    distributed: bool = False,
) -> Registration:
    """Registers ``source`` onto ``target`` with a ResNet-LDDMM flow.

    Args:
        source, target: point clouds (N, D) and (M, D) as tensors or numpy arrays, D = 2 or 3 (any D works).
        quality: "fast" (default), "balanced" or "best": a preset for the flow's size, σ and the schedule
            (coarse-to-fine stages, L-BFGS at the end); see PRESETS and the README for what each costs and
            reaches. An argument given explicitly (width, layers, steps, sigma, schedule) wins over the preset.
        data_term: "sinkhorn" (debiased Sinkhorn divergence, GeomLoss conventions, p = 2), "chamfer",
            or "l2" (known correspondences: target[i] is where source[i] should go).
        sigma: data-term weight 1/(2σ²) at the end of the schedule, in normalised units (shapes scaled to
            radius 1); coarse stages use multiples of it. None: the preset's (0.1).
        width, layers: hidden units per block and number of blocks / Euler steps (None: the preset's).
        steps: optimiser iterations of the preset's schedule, all stages together (Adam steps, or L-BFGS
            outer iterations of up to 20 evaluations); the preset's L-BFGS refinement comes on top.
        lr: learning rate (default 5e-3 for Adam, 1.0 for L-BFGS).
        activation: "relu" (the paper's) or a smooth one: "tanh", "softplus".
        blur: Sinkhorn blur (ε = blur²) at the end of the schedule, normalised units.
        schedule: the stages to run instead of the preset's: a list of Stage (or dicts of its fields); fields
            left None take the arguments above. E.g. [Stage(200, sigma=0.4, points=2000), Stage(300),
            Stage(20, optimizer="lbfgs")].
        faces: triangles of the source (F, 3), when it is a mesh: the result keeps them (r.faces), and
            r.fold_report() counts the flipped ones; a FoldWarning is issued when more than
            fastlddmm.mesh.FLIP_WARNING (0.1%) of them flip.
        fold_penalty: weight of fastlddmm.mesh.FoldBarrier (a penalty on triangles turning over among their
            neighbours) added to the loss in the stages that use every point; needs ``faces``. None: the
            preset's when faces are given, else 0.
        device, dtype: where and in what precision to optimise (default: the source's device,
            float32 unless the source is float64).
        seed: seeds the flow's initialisation and the stages' point subsets (same seed and inputs → same result).
        progress: show a progress bar.
        backend: backend for the flow and data-term ops ("auto": fastlddmm.dispatch picks the fastest available).
        checkpoint: file to write a checkpoint to every ``checkpoint_every`` steps (atomically);
            with resume=True, optimisation continues from it when it exists (in the stage it was in).
        callback: called as callback(step, {"loss", "data", "energy", "stage"}) after each step.
        deterministic: bitwise-reproducible runs (same seed, inputs and machine → same result): turns on
            torch.use_deterministic_algorithms for the run and keeps backend="auto" off kernels that sum
            with atomics (the CUDA flow). The CPU paths are deterministic whatever the thread count.
        distributed: point-sharded registration on torch.distributed (see fastlddmm.distributed): every
            rank calls register() with its own shard of source and target (non-empty; for "l2" shards that
            correspond), and all get the same flow, fitted to the whole clouds with exact data terms. Only
            rank 0 shows progress and writes checkpoints; ``source``/``target`` of the result are None.

    Raises:
        RegistrationDiverged: the loss or gradient became NaN/Inf; ``err.partial`` is the last finite state.
    """
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if isinstance(target, np.ndarray):
        target = torch.from_numpy(target)
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be True or False, got {distributed!r}")
    if distributed:
        from .distributed import PointSharding

        sharding = PointSharding()
    else:
        sharding = Sharding()
    sharding.check(lambda: _validate(
        source, target, data_term=data_term, optimizer=optimizer, activation=activation, sigma=sigma, blur=blur,
        width=width, layers=layers, steps=steps, checkpoint_every=checkpoint_every, lr=lr, dtype=dtype,
        deterministic=deterministic, quality=quality, faces=faces,
        fold_penalty=0.0 if fold_penalty is None else fold_penalty), source)
    dispatch.check_name(backend)
    if faces is not None and distributed:
        raise ValueError("faces (the fold report) are for one-process registrations: a shard has no whole mesh; "
                         "call fastlddmm.mesh on rank 0 with the whole clouds instead")
    preset = PRESETS[quality]
    if fold_penalty is None:
        fold_penalty = preset.fold_penalty if faces is not None else 0.0
    stages = plan(quality, data_term=data_term, sigma=sigma, blur=blur, steps=steps, optimizer=optimizer, lr=lr,
                  schedule=schedule)
    width = preset.width if width is None else width
    layers = preset.layers if layers is None else layers
    total_steps = sum(st.steps for st in stages)
    stage_of = [k for k, st in enumerate(stages) for _ in range(st.steps)]  # stage index of each step
    if dtype is None:
        dtype = torch.float64 if source.dtype == torch.float64 else torch.float32
    device = torch.device(device) if device is not None else source.device
    src = source.to(device=device, dtype=dtype)
    tgt = target.to(device=device, dtype=dtype)
    check_pair(src, tgt, "source", "target")
    faces_t = None if faces is None else check_faces(faces, source.shape[0])

    center, scale = sharding.normalisation(src, tgt)
    src_n = (src - center) / scale
    tgt_n = (tgt - center) / scale
    barrier = FoldBarrier(src_n, faces_t.to(device)) if fold_penalty > 0 else None
    total = sharding.total_points(src.shape[0])
    total_target = total if data_term == "l2" and all(st.data_term == "l2" for st in stages) else \
        sharding.total_points(tgt.shape[0])
    last_stage = stages[-1]
    config = dict(quality=quality, data_term=last_stage.data_term, sigma=last_stage.sigma, width=width,
                  layers=layers, steps=total_steps, lr=last_stage.lr, optimizer=last_stage.optimizer,
                  activation=activation, blur=last_stage.blur, seed=seed, backend=backend,
                  schedule=[asdict(st) for st in stages], fold_penalty=float(fold_penalty), dim=int(src.shape[-1]),
                  dtype=str(dtype).replace("torch.", ""), **sharding.config())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        flow = ResNetFlow(dim=src.shape[-1], width=width, layers=layers, activation=activation, backend=backend,
                          deterministic=deterministic)
    flow = flow.to(device=device, dtype=dtype)
    params = list(flow.parameters())
    sharding.start(params)

    history: dict[str, list[float]] = {"loss": [], "data": [], "energy": [], "stage": []}
    start_step = 0
    saved_optimizer = None  # (stage index, optimizer state) from a checkpoint
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        differ = _resume_differences(ckpt.get("config", {}), config)
        if differ:
            raise ValueError(f"cannot resume from {str(ckpt_path)!r}: it was made with other settings ({', '.join(sorted(differ))})")
        flow.load_state_dict(ckpt["flow"])
        history = {k: list(v) for k, v in ckpt["history"].items()}
        history.setdefault("stage", [0] * len(history["loss"]))
        start_step = int(ckpt["step"])
        saved_optimizer = (int(ckpt.get("stage", 0)), ckpt["optimizer"])

    # What the current stage changes: set by enter() when the loop crosses into a stage.
    current: dict = {"index": None}

    def enter(k: int) -> None:
        st = stages[k]
        keep_src = _subset(src_n.shape[0], total, st.points, seed, k, device)
        if st.data_term == "l2":
            keep_tgt = keep_src
        else:
            keep_tgt = _subset(tgt_n.shape[0], total_target, st.points, seed + 7919, k, device)
        x = src_n if keep_src is None else src_n[keep_src]
        y = tgt_n if keep_tgt is None else tgt_n[keep_tgt]
        opt = _make_optimizer(st.optimizer, params, st.lr)
        if saved_optimizer is not None and saved_optimizer[0] == k:
            opt.load_state_dict(saved_optimizer[1])
        current.update(index=k, stage=st, x=x, target=sharding.prepare_target(st.data_term, y),
                       barrier=barrier if keep_src is None else None,  # it needs every vertex
                       total=total if keep_src is None else sharding.total_points(x.shape[0]),
                       weight=1.0 / (2.0 * st.sigma**2), opt=opt)

    last: dict[str, Tensor] = {}

    def closure() -> Tensor:
        c = current
        c["opt"].zero_grad(set_to_none=True)
        moved, energy = flow.forward_with_energy(c["x"])
        share, last_values = sharding.objective(c["stage"].data_term, moved, c["target"], energy, weight=c["weight"],
                                                blur=c["stage"].blur, backend=backend, total=c["total"])
        if c["barrier"] is not None:  # one process only (faces are refused with distributed=True)
            penalty = fold_penalty * c["barrier"](moved)
            share = share + penalty
            last_values = {**last_values, "loss": last_values["loss"] + penalty.detach()}
        share.backward()
        sharding.reduce_gradients(params)
        last.update(last_values)
        return last["loss"]  # the whole objective (L-BFGS's line search reads it)

    def snapshot() -> Registration:
        clouds = (source.detach().cpu(), target.detach().cpu()) if sharding.keeps_clouds() else (None, None)
        return Registration(flow, center.detach().cpu(), scale, config, history, *clouds,
                            faces=None if faces_t is None else faces_t.cpu())

    def save_checkpoint(step: int) -> None:
        if ckpt_path is not None and sharding.writes:
            _atomic_torch_save({"config": config, "flow": flow.state_dict(), "optimizer": current["opt"].state_dict(),
                                "stage": current["index"], "history": history, "step": step}, ckpt_path)

    bar = None
    if progress and sharding.writes:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc=f"register ({data_term}, {quality})", unit="step",
                   leave=True)
    restore_deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    previous = None  # Adam: the parameters before the last update (small: L·H·D·2 numbers)
    try:
        for step in range(start_step, total_steps):
            if stage_of[step] != current["index"]:
                enter(stage_of[step])
            opt = current["opt"]
            if current["stage"].optimizer == "adam":
                closure()
                grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
                if not (bool(torch.isfinite(last["loss"])) and grads_finite):
                    if previous is not None:  # back to the parameters whose (finite) loss was recorded last
                        flow.load_state_dict(previous)
                    raise RegistrationDiverged(
                        f"registration diverged at step {step}: the {'loss' if grads_finite else 'gradient'} is "
                        f"not finite (try a larger sigma, a smaller lr, or check the inputs)", step, snapshot())
                previous = _state_dict_copy(flow)
                opt.step()
            else:
                good = _state_dict_copy(flow)
                opt.step(closure)
                if not all(bool(torch.isfinite(p).all()) for p in params) or not bool(torch.isfinite(last["loss"])):
                    flow.load_state_dict(good)
                    raise RegistrationDiverged(
                        f"registration diverged at step {step}: L-BFGS produced non-finite values "
                        f"(try a smaller lr or Adam)", step, snapshot())
            record = {k: float(last[k]) for k in ("loss", "data", "energy")}
            record["stage"] = current["index"]
            for k, v in record.items():
                history[k].append(v)
            if (step + 1) % checkpoint_every == 0:  # before the callback: what it sees is on disk
                save_checkpoint(step + 1)
            if callback is not None:
                callback(step, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(stage=f"{current['index'] + 1}/{len(stages)}", loss=f"{record['loss']:.4g}",
                                data=f"{record['data']:.3g}", energy=f"{record['energy']:.3g}", refresh=False)
    except RegistrationDiverged as err:
        if ckpt_path is not None and sharding.writes:
            err.partial.save(ckpt_path.with_name(ckpt_path.stem + ".partial.pt"))
        raise
    finally:
        torch.use_deterministic_algorithms(restore_deterministic)
        if bar is not None:
            bar.close()
    result = snapshot()
    result.config["seconds"] = time.perf_counter() - t0
    if current["index"] is not None:
        save_checkpoint(total_steps)
    if faces_t is not None and sharding.writes:
        report = result.fold_report()
        if report["flipped_fraction"] > FLIP_WARNING:
            warnings.warn(f"{report['flipped_triangles']} of {report['triangles']} triangles "
                          f"({100 * report['flipped_fraction']:.2f}%) flip under the registration (min det Dφ at the "
                          f"vertices {report['min_jacobian_determinant']:.3g}): try quality='balanced' or 'best', "
                          f"or a larger sigma", FoldWarning, stacklevel=2)
    return result
