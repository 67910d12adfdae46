"""One registration from files to files, and the built-in demo: the workflow behind ``fastlddmm register``,
``fastlddmm demo`` and ``fastlddmm batch`` (and any other front-end: a notebook, a cluster runner).

    run_pair(SOURCE, TARGET, OUTDIR, options=...) reads the two files, runs fl.register, and writes into
    OUTDIR: warped.<ext> (the warped source in the input's format; a mesh keeps its faces), trajectory.npy,
    registration.pt, summary.json and, with matplotlib, flow.gif, filmstrip.png, losses.png, registration.png.
    For a mesh, summary.json (and the picture's title) says how many triangles flip (fastlddmm.mesh), and
    a warning is logged when more than 0.1% do.

Errors a front-end reports in one line: InputError (a file or an option the user can fix) and
PairFailed (the work itself failed, e.g. the registration diverged; the last finite state is saved).
Every file is written atomically (fastlddmm._atomic).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ._atomic import atomic_write, write_text
from .registration import DEFAULTS

OUTPUT_NAMES = ("warped", "trajectory.npy", "flow.gif", "filmstrip.png", "losses.png", "registration.png",
                "registration.pt", "summary.json")
# The options run_pair passes on to fl.register, with their defaults.
REGISTER_OPTIONS = {**DEFAULTS.__dict__, "device": None}


class InputError(Exception):
    """Something the user can fix (a file, an option): reported in one line."""


class PairFailed(Exception):
    """The work itself failed (e.g. the registration diverged): reported in one line."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    return text.splitlines()[0] if text else type(err).__name__


def check_outdir(outdir: Path, *, force: bool, resume: bool) -> None:
    """An output folder may be new, empty, or reused with force (overwrite) / resume (continue)."""
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"output {str(outdir)!r} exists and is not a directory")
    if outdir.is_dir() and any(outdir.iterdir()) and not (force or resume):
        raise InputError(f"output directory {str(outdir)!r} exists and is not empty: pass --force to overwrite "
                         f"its results, or --resume to continue an interrupted run")


def have_pictures() -> bool:
    """Whether matplotlib and pillow are installed (the viz extra)."""
    return importlib.util.find_spec("matplotlib") is not None and importlib.util.find_spec("PIL") is not None


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as tmp:
        np.save(tmp, array, allow_pickle=False)


def save_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def _quiet(message: str) -> None:
    pass


def picture_up(path: Path) -> str:
    """Which axis pictures draw upwards for a file: "y" for OBJ / PLY (the convention of scans and most
    modelling tools), else "auto" (the shape's principal axis)."""
    return "y" if Path(path).suffix.lower() in (".obj", ".ply") else "auto"


def run_pair(source_path, target_path, outdir: Path, *, options: dict, resume: bool = False, progress: bool = True,
             log: Callable[[str], None] | None = None, edges=None, target_edges=None, name: str | None = None,
             pictures: bool = True, distributed: bool = False, up=None) -> dict | None:
    """Registers the files ``source_path`` -> ``target_path`` and writes every output into ``outdir``.

    ``up``: the axis 3-D pictures draw upwards (see fastlddmm.viz; None: picture_up(source_path)).

    ``options`` are fl.register's (keys of REGISTER_OPTIONS; None or absent: the default). Returns the summary
    (also written to outdir/summary.json). Raises InputError for bad inputs or options, PairFailed when the
    registration diverges. With ``distributed`` (under torchrun, process group initialised), every rank reads
    the files and registers its shard; rank 0 writes the outputs and returns the summary, the others None.
    """
    import torch

    import fastlddmm as fl
    from fastlddmm import io as flio
    from fastlddmm import mesh as flmesh

    log = log or _quiet
    unknown = set(options) - set(REGISTER_OPTIONS)
    if unknown:
        raise InputError(f"unknown registration option(s): {', '.join(sorted(unknown))}")
    source_path, target_path = Path(source_path), Path(target_path)
    try:
        src_np, src_info = flio.read_points(source_path)
        tgt_np, tgt_info = flio.read_points(target_path, dim=src_np.shape[1] if target_path.suffix.lower()
                                     in flio.MESH_EXTENSIONS and src_np.shape[1] <= 3 else None)
    except flio.PointFileError as err:
        raise InputError(str(err)) from None
    if src_np.shape[1] != tgt_np.shape[1]:
        raise InputError(f"source {str(source_path)!r} has {src_np.shape[1]}-D points but target "
                         f"{str(target_path)!r} has {tgt_np.shape[1]}-D points")
    if edges is None:
        edges = src_info.edges()
    faces, target_faces = src_info.triangles(), tgt_info.triangles()
    up = picture_up(source_path) if up is None else up
    opts = {**REGISTER_OPTIONS, **{k: v for k, v in options.items() if v is not None}}
    outdir.mkdir(parents=True, exist_ok=True)
    source = torch.from_numpy(src_np).float()
    target = torch.from_numpy(tgt_np).float()
    label = name or source_path.stem
    from fastlddmm.registration import PRESETS, plan

    try:
        stages = plan(opts["quality"], data_term=opts["data_term"], sigma=opts["sigma"], blur=opts["blur"],
                      steps=opts["steps"], optimizer=opts["optimizer"], lr=opts["lr"])
    except (ValueError, TypeError) as err:
        raise InputError(first_line(err)) from None
    preset = PRESETS[opts["quality"]]
    log(f"[{label}] {source.shape[0]} source and {target.shape[0]} target points in {source.shape[1]}-D"
        f"{f', {len(faces)} triangles' if faces is not None else ''}; data term {opts['data_term']}, quality "
        f"{opts['quality']}: {sum(st.steps for st in stages)} steps in {len(stages)} stage(s), width "
        f"{opts['width'] or preset.width}, {opts['layers'] or preset.layers} layers")
    reg_source, reg_target, rank = source, target, 0
    if distributed:
        from fastlddmm import distributed as fld

        rank = torch.distributed.get_rank()
        if opts["data_term"] == "l2" and source.shape[0] != target.shape[0]:
            raise InputError(f"data term l2 needs one target point per source point, got {source.shape[0]} "
                             f"and {target.shape[0]}")
        try:
            reg_source, reg_target = fld.shard(source), fld.shard(target)
        except ValueError as err:
            raise InputError(str(err)) from None
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():  # the fold report below says it, in the log
            warnings.simplefilter("ignore", flmesh.FoldWarning)
            reg = fl.register(reg_source, reg_target, distributed=distributed, progress=progress,
                              checkpoint=outdir / "checkpoint.pt", resume=resume,
                              faces=None if distributed else faces, **opts)
    except fl.RegistrationDiverged as err:
        partial = outdir / "registration.partial.pt"
        with contextlib.suppress(Exception):
            err.partial.save(partial)
        raise PairFailed(f"{first_line(err)}; the last finite state is in {str(partial)!r}") from None
    except (ValueError, TypeError, fl.BackendUnavailableError) as err:
        raise InputError(first_line(err)) from None
    seconds_registration = time.perf_counter() - t0
    if rank != 0:  # rank 0 writes the outputs
        return None
    if distributed:  # the result knows only this rank's shard: give it the whole clouds for the pictures
        reg.source, reg.target = source, target
        reg.faces = None if faces is None else torch.from_numpy(faces)

    outputs = {}
    out = outdir / f"warped{source_path.suffix.lower()}"
    try:
        flio.write_points(out, reg.transform(source).numpy().astype(np.float64), like=src_info)
    except flio.PointFileError as err:
        raise InputError(str(err)) from None
    outputs["warped"] = out.name
    trajectory = reg.trajectory(source).numpy()
    save_npy(outdir / "trajectory.npy", trajectory)
    outputs["trajectory"] = "trajectory.npy"
    reg.save(outdir / "registration.pt")
    outputs["registration"] = "registration.pt"
    folds = reg.fold_report()
    if folds.get("flipped_fraction", 0.0) > flmesh.FLIP_WARNING:
        log(f"[{label}] warning: {folds['flipped_triangles']} of {folds['triangles']} triangles "
            f"({100 * folds['flipped_fraction']:.2f}%) flip (min det Dφ {folds['min_jacobian_determinant']:.3g}); "
            f"try --quality balanced or best, or a larger --sigma")
    history = reg.history
    final = {k: (history[k][-1] if history.get(k) else None) for k in ("loss", "data", "energy")}

    dim = source.shape[1]
    if pictures and dim in (2, 3) and have_pictures():
        from fastlddmm import viz

        log(f"[{label}] drawing flow.gif, filmstrip.png, losses.png and registration.png")
        flipped = reg.flipped_triangles() if faces is not None and dim == 3 else None
        shapes = dict(faces=faces, target_faces=target_faces, up=up) if dim == 3 else {}
        viz.animate_flow(trajectory, src_np, tgt_np, outdir / "flow.gif", edges=edges, target_edges=target_edges,
                         title=f"{label}: source → target", flipped=flipped, **shapes)
        viz.plot_filmstrip(trajectory, outdir / "filmstrip.png", target=tgt_np, edges=edges,
                           target_edges=target_edges, flipped=flipped, title=f"{label}: the flow", **shapes)
        viz.plot_losses(history, outdir / "losses.png", sigma=reg.config["sigma"])
        viz.plot_registration(reg, outdir / "registration.png", edges=edges, target_edges=target_edges,
                              flipped=flipped, title=label, **shapes)
        outputs.update(gif="flow.gif", filmstrip="filmstrip.png", losses="losses.png", picture="registration.png")
    elif pictures and dim in (2, 3):
        log(f"[{label}] pictures skipped: pip install 'fastlddmm[viz]' (matplotlib, pillow) to get flow.gif")

    summary = {
        "name": label,
        "source": str(source_path),
        "target": str(target_path),
        "points": {"source": int(source.shape[0]), "target": int(target.shape[0]), "dim": int(dim)},
        "final": final,
        "steps": len(history.get("loss", [])),
        "min_jacobian_determinant": folds["min_jacobian_determinant"],
        "folds": folds["folded_points"],
        "triangles": folds.get("triangles"),
        "flipped_triangles": folds.get("flipped_triangles"),
        "flipped_fraction": folds.get("flipped_fraction"),
        "seconds": {"registration": seconds_registration, "total": time.perf_counter() - t0},
        "config": {k: v for k, v in reg.config.items() if k != "seconds"},
        "outputs": outputs,
        "fastlddmm_version": fl.__version__,
    }
    save_json(outdir / "summary.json", summary)
    outputs["summary"] = "summary.json"
    return summary


# -- the built-in demo --------------------------------------------------------------------------------

DEMO_SETTINGS = {
    # Chosen so that both examples finish in well under a minute each on 2 CPU cores: Chamfer costs
    # ~0.03 s (face) / ~0.07 s (blob) of CPU per step there, Sinkhorn 10-40x more (try --data-term sinkhorn).
    # The face's small features (eyes opening, mouth corners) need a tight fit: L-BFGS gets there in 30
    # outer steps (~20 s) where 300 Adam steps leave the eyes half open.
    "face": dict(data_term="chamfer", sigma=0.02, width=64, layers=10, steps=30, optimizer="lbfgs"),
    "blob": dict(data_term="chamfer", sigma=0.05, width=64, layers=10, steps=300, lr=1e-2),
}
DEMO_MARKER = ".fastlddmm-demo"
DEMO_UP = {"blob": "z"}  # the blob is modelled z-up (its .ply would otherwise be drawn y-up)


def run_demo(outdir: Path, *, only=None, overrides: dict | None = None, force: bool = False, progress: bool = True,
             pictures: bool = True, log: Callable[[str], None] | None = None,
             on_done: Callable[[dict, Path], None] | None = None) -> list[Path]:
    """Registers the built-in examples (fastlddmm.data) into outdir/<name>/ with run_pair and DEMO_SETTINGS
    (``overrides``: options that replace them, e.g. steps, width, data_term, device). Returns the folders."""
    from fastlddmm import io as flio
    from fastlddmm.data import list_examples, load_example

    log = log or _quiet
    outdir = Path(outdir)
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / DEMO_MARKER).exists() and not force:
        raise InputError(f"output directory {str(outdir)!r} exists, is not empty and is not an earlier demo: "
                         f"pass --force, or choose another folder with -o")
    check_outdir(outdir, force=True, resume=False)
    outdir.mkdir(parents=True, exist_ok=True)
    write_text(outdir / DEMO_MARKER, "made by `fastlddmm demo`\n")
    have_meshio = importlib.util.find_spec("meshio") is not None
    done = []
    for name in only or list(DEMO_SETTINGS):
        ex = load_example(name)
        settings = {**DEMO_SETTINGS[name], **{k: v for k, v in (overrides or {}).items() if v is not None}}
        inputs = outdir / "inputs"
        inputs.mkdir(exist_ok=True)
        if ex["faces"] is not None and have_meshio:  # a mesh in, a warped mesh (same faces) out
            info = flio.MeshInfo(".ply", ex["source"].shape[1], cells=[("triangle", ex["faces"])])
            src_file, tgt_file = inputs / f"{name}_source.ply", inputs / f"{name}_target.ply"
        else:
            info = None
            src_file, tgt_file = inputs / f"{name}_source.npy", inputs / f"{name}_target.npy"
        flio.write_points(src_file, ex["source"], like=info)
        flio.write_points(tgt_file, ex["target"])
        log(f"demo {name}: {list_examples()[name]}")
        sub = outdir / name
        if sub.exists():  # an earlier demo: start afresh
            for old in sub.iterdir():
                if old.is_file():
                    old.unlink()
        summary = run_pair(src_file, tgt_file, sub, options=settings, progress=progress, log=log,
                           edges=ex["edges"], target_edges=ex["target_edges"], name=name, pictures=pictures,
                           up=DEMO_UP.get(name))
        if on_done is not None:
            on_done(summary, sub)
        done.append(sub)
    return done
