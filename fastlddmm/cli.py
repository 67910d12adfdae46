"""The ``fastlddmm`` command line.

    fastlddmm register SOURCE TARGET -o OUTDIR [options]    register two point clouds / meshes
    torchrun --nproc-per-node P -m fastlddmm register ... --distributed
                                                             the same, points sharded over P processes
    fastlddmm demo [-o OUTDIR]                               the built-in examples, end to end
    fastlddmm digits --train 5 --eval 5 7 -o OUTDIR          image registration on handwritten digits
    fastlddmm bench                                          quick timing of each backend vs the reference
    fastlddmm batch MANIFEST.csv -o OUTDIR                   many pairs, in parallel on Ray (resumable)
    fastlddmm backends                                       which backends are usable here, and why not

A user error (unreadable file, bad option value, existing output folder) prints one line,
``fastlddmm: error: ...``, on stderr and exits with status 2. A registration that diverges exits
with status 1, an interruption (Ctrl-C) with 130. FASTLDDMM_DEBUG=1 shows full tracebacks instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

OUTPUT_NAMES = ("warped", "trajectory.npy", "flow.gif", "losses.png", "registration.png", "registration.pt",
                "summary.json")


class UserError(Exception):
    """Something the user can fix (a file, an option): one line, exit status 2."""


class Failed(Exception):
    """The work itself failed (e.g. the registration diverged): one line, exit status 1."""


def _debug() -> bool:
    return os.environ.get("FASTLDDMM_DEBUG", "") not in ("", "0")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line prefixed ``fastlddmm: error:`` (exit status 2)."""

    def error(self, message):
        hint = f" (see: {self.prog} --help)"
        sys.stderr.write(f"fastlddmm: error: {message}{hint}\n")
        sys.exit(EXIT_USAGE)


# -- option types: a bad value is a usage error naming the option -------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _device(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (try cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: torch sees no CUDA GPU here (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    return str(dev)


def _digit(text: str) -> int:
    if text not in tuple("0123456789"):
        raise argparse.ArgumentTypeError(f"expected a digit 0-9, got {text!r}")
    return int(text)


# -- messages ----------------------------------------------------------------------------------------

class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = str(err.args[0])
    return text.splitlines()[0] if text else type(err).__name__


# -- one registration, shared by register / demo / batch ---------------------------------------------

REGISTER_DEFAULTS = dict(data_term="sinkhorn", sigma=0.1, width=128, layers=10, steps=500, lr=None,
                         optimizer="adam", activation="relu", blur=0.02, device=None, seed=0, backend="auto",
                         checkpoint_every=50)


def _check_outdir(outdir: Path, *, force: bool, resume: bool) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"output {str(outdir)!r} exists and is not a directory")
    if outdir.is_dir() and any(outdir.iterdir()) and not (force or resume):
        raise UserError(f"output directory {str(outdir)!r} exists and is not empty: pass --force to overwrite "
                        f"its results, or --resume to continue an interrupted run")


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save, atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npy")
    try:
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _save_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _have_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None and importlib.util.find_spec("PIL") is not None


def run_pair(source_path, target_path, outdir: Path, *, options: dict, resume: bool = False, progress: bool = True,
             log=None, edges=None, target_edges=None, name: str | None = None, pictures: bool = True,
             distributed: bool = False) -> dict | None:
    """Registers the files ``source_path`` -> ``target_path`` and writes every output into ``outdir``.

    Returns the summary (also written to outdir/summary.json). Raises UserError for bad inputs or
    options, Failed when the registration diverges. With ``distributed`` (under torchrun, process group
    initialised), every rank reads the files and registers its shard; rank 0 writes the outputs and
    returns the summary, the other ranks return None.
    """
    import torch

    import fastlddmm as fl
    from fastlddmm import io as flio

    log = log or _Log(quiet=True)
    source_path, target_path = Path(source_path), Path(target_path)
    try:
        src_np, src_info = flio.read_points(source_path)
        tgt_np, _ = flio.read_points(target_path, dim=src_np.shape[1] if target_path.suffix.lower()
                                     in flio.MESH_EXTENSIONS and src_np.shape[1] <= 3 else None)
    except flio.PointFileError as err:
        raise UserError(str(err)) from None
    if src_np.shape[1] != tgt_np.shape[1]:
        raise UserError(f"source {str(source_path)!r} has {src_np.shape[1]}-D points but target "
                        f"{str(target_path)!r} has {tgt_np.shape[1]}-D points")
    if edges is None:
        edges = src_info.edges()
    opts = {**REGISTER_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    outdir.mkdir(parents=True, exist_ok=True)
    source = torch.from_numpy(src_np).float()
    target = torch.from_numpy(tgt_np).float()
    label = name or source_path.stem
    log(f"[{label}] {source.shape[0]} source and {target.shape[0]} target points in {source.shape[1]}-D; "
        f"data term {opts['data_term']}, {opts['steps']} steps, width {opts['width']}, {opts['layers']} layers")
    checkpoint = outdir / "checkpoint.pt"
    reg_source, reg_target, rank = source, target, 0
    if distributed:
        from fastlddmm import distributed as fld

        rank = torch.distributed.get_rank()
        try:
            reg_source, reg_target = fld.shard(source), fld.shard(target)
        except ValueError as err:
            raise UserError(str(err)) from None
        if opts["data_term"] == "l2" and source.shape[0] != target.shape[0]:
            raise UserError(f"data term l2 needs one target point per source point, got {source.shape[0]} "
                            f"and {target.shape[0]}")
    t0 = time.perf_counter()
    try:
        reg = fl.register(
            reg_source, reg_target, distributed=distributed, data_term=opts["data_term"], sigma=opts["sigma"], width=opts["width"],
            layers=opts["layers"], steps=opts["steps"], lr=opts["lr"], optimizer=opts["optimizer"],
            activation=opts["activation"], blur=opts["blur"], device=opts["device"], seed=opts["seed"],
            progress=progress, backend=opts["backend"], checkpoint=checkpoint,
            checkpoint_every=opts["checkpoint_every"], resume=resume)
    except fl.RegistrationDiverged as err:
        partial = outdir / "registration.partial.pt"
        with contextlib.suppress(Exception):
            err.partial.save(partial)
        raise Failed(f"{_first_line(err)}; the last finite state is in {str(partial)!r}") from None
    except (ValueError, TypeError, fl.BackendUnavailableError) as err:
        raise UserError(_first_line(err)) from None
    seconds_registration = time.perf_counter() - t0
    if rank != 0:  # rank 0 writes the outputs
        return None
    if distributed:  # the result knows only this rank's shard: give it the whole clouds for the pictures
        reg.source, reg.target = source, target

    outputs = {}
    ext = source_path.suffix.lower()
    warped = reg.transform(source)
    out = outdir / f"warped{ext}"
    try:
        flio.write_points(out, warped.numpy().astype(np.float64), like=src_info)
    except flio.PointFileError as err:
        raise UserError(str(err)) from None
    outputs["warped"] = out.name
    trajectory = reg.trajectory(source).numpy()
    _save_npy(outdir / "trajectory.npy", trajectory)
    outputs["trajectory"] = "trajectory.npy"
    reg.save(outdir / "registration.pt")
    outputs["registration"] = "registration.pt"
    det = reg.jacobian_determinant(source).double()
    history = reg.history
    final = {k: (history[k][-1] if history.get(k) else None) for k in ("loss", "data", "energy")}

    dim = source.shape[1]
    if pictures and dim in (2, 3) and _have_matplotlib():
        from fastlddmm import viz

        log(f"[{label}] drawing flow.gif, losses.png and registration.png")
        viz.animate_flow(trajectory, src_np, tgt_np, outdir / "flow.gif", edges=edges, target_edges=target_edges,
                         title=f"{label}: source → target")
        viz.plot_losses(history, outdir / "losses.png", sigma=opts["sigma"])
        viz.plot_registration(reg, outdir / "registration.png", edges=edges, target_edges=target_edges,
                              title=label)
        outputs.update(gif="flow.gif", losses="losses.png", picture="registration.png")
    elif pictures and dim in (2, 3):
        log(f"[{label}] pictures skipped: pip install 'fastlddmm[viz]' (matplotlib, pillow) to get flow.gif")

    summary = {
        "name": label,
        "source": str(source_path),
        "target": str(target_path),
        "points": {"source": int(source.shape[0]), "target": int(target.shape[0]), "dim": int(dim)},
        "final": final,
        "steps": len(history.get("loss", [])),
        "min_jacobian_determinant": float(det.min()),
        "folds": int((det <= 0).sum()),
        "seconds": {"registration": seconds_registration, "total": time.perf_counter() - t0},
        "config": {k: v for k, v in reg.config.items() if k != "seconds"},
        "outputs": outputs,
        "fastlddmm_version": fl.__version__,
    }
    _save_json(outdir / "summary.json", summary)
    outputs["summary"] = "summary.json"
    return summary


def _options(args) -> dict:
    return {k: getattr(args, k) for k in REGISTER_DEFAULTS if hasattr(args, k)}


# -- subcommands --------------------------------------------------------------------------------------

def cmd_register(args) -> int:
    if args.distributed:
        return _register_distributed(args)
    log = _Log(args.quiet)
    outdir = Path(args.output)
    _check_outdir(outdir, force=args.force, resume=args.resume)
    if args.resume and not (outdir / "checkpoint.pt").exists():
        log(f"no checkpoint in {str(outdir)!r}: starting from the beginning")
    summary = run_pair(args.source, args.target, outdir, options=_options(args), resume=args.resume,
                       progress=not args.quiet, log=log, pictures=not args.no_pictures)
    _print_summary(summary, outdir, quiet=args.quiet)
    return 0


def _register_distributed(args) -> int:
    """`register --distributed` on every rank of a torchrun job: the points are sharded over the ranks,
    rank 0 reports and writes the outputs."""
    import torch.distributed as dist

    from fastlddmm import distributed as fld

    if args.device is not None:
        raise UserError("--distributed picks each rank's device itself (cuda:LOCAL_RANK with nccl when GPUs are "
                        "visible, else the CPU with gloo): leave out --device")
    try:
        device = fld.init()
    except (RuntimeError, ValueError) as err:
        raise UserError(_first_line(err)) from None
    try:
        rank = dist.get_rank()
        log = _Log(args.quiet or rank != 0)
        outdir = Path(args.output)
        # Every rank checks before any rank writes (else rank 1 could see rank 0's new files).
        _check_outdir(outdir, force=args.force, resume=args.resume)
        dist.barrier()
        if args.resume and not (outdir / "checkpoint.pt").exists():
            log(f"no checkpoint in {str(outdir)!r}: starting from the beginning")
        log(f"{dist.get_world_size()} ranks ({dist.get_backend()}), this one on {device}")
        options = {**_options(args), "device": str(device)}
        summary = run_pair(args.source, args.target, outdir, options=options, resume=args.resume,
                           progress=not args.quiet, log=log, pictures=not args.no_pictures, distributed=True)
        if summary is not None:
            _print_summary(summary, outdir, quiet=args.quiet)
        return 0
    finally:
        dist.destroy_process_group()


def _print_summary(summary: dict, outdir: Path, *, quiet: bool) -> None:
    f = summary["final"]
    if quiet:
        print(outdir)
        return
    print(f"{summary['name']}: loss {f['loss']:.4g} (data {f['data']:.3g}, energy {f['energy']:.3g}) after "
          f"{summary['steps']} steps in {summary['seconds']['registration']:.1f} s; "
          f"min det Dφ = {summary['min_jacobian_determinant']:.3g}, folds: {summary['folds']}")
    print(f"  outputs in {outdir}/: " + ", ".join(summary["outputs"].values()))


DEMO_SETTINGS = {
    # Chosen so that both examples finish in well under a minute each on 2 CPU cores: Chamfer costs
    # ~0.03 s (face) / ~0.07 s (blob) of CPU per step there, Sinkhorn 10-40x more (try --data-term sinkhorn).
    # The face's small features (eyes opening, mouth corners) need a tight fit: L-BFGS gets there in 30
    # outer steps (~20 s) where 300 Adam steps leave the eyes half open.
    "face": dict(data_term="chamfer", sigma=0.02, width=64, layers=10, steps=30, optimizer="lbfgs"),
    "blob": dict(data_term="chamfer", sigma=0.05, width=64, layers=10, steps=300, lr=1e-2),
}
DEMO_MARKER = ".fastlddmm-demo"


def cmd_demo(args) -> int:
    from fastlddmm import io as flio
    from fastlddmm.data import list_examples, load_example

    log = _Log(args.quiet)
    outdir = Path(args.output)
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / DEMO_MARKER).exists() and not args.force:
        raise UserError(f"output directory {str(outdir)!r} exists, is not empty and is not an earlier demo: "
                        f"pass --force, or choose another folder with -o")
    _check_outdir(outdir, force=True, resume=False)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / DEMO_MARKER).write_text("made by `fastlddmm demo`\n")
    names = args.only or list(DEMO_SETTINGS)
    have_meshio = _has("meshio")
    done = []
    for name in names:
        ex = load_example(name)
        settings = dict(DEMO_SETTINGS[name])
        if args.steps is not None:
            settings["steps"] = args.steps
        if args.width is not None:
            settings["width"] = args.width
        if args.data_term is not None:
            settings["data_term"] = args.data_term
        settings["device"] = args.device
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
        summary = run_pair(src_file, tgt_file, sub, options=settings, progress=not args.quiet, log=log,
                           edges=ex["edges"], target_edges=ex["target_edges"], name=name,
                           pictures=not args.no_pictures)
        _print_summary(summary, sub, quiet=args.quiet)
        done.append(sub)
    if not args.quiet and args.no_pictures:
        print(f"demo outputs in {outdir}/: " + ", ".join(f"{d.name}/" for d in done))
    elif not args.quiet:
        print(f"demo outputs in {outdir}/: " + ", ".join(f"{d.name}/flow.gif" for d in done)
              + " (animations), registration.png (before/after), summary.json (numbers)")
    return 0


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def cmd_digits(args) -> int:
    try:
        from fastlddmm.image import digits
    except ImportError as err:
        raise UserError(f"the digits example needs the image extra: pip install 'fastlddmm[image]' "
                        f"({_first_line(err)})") from None
    outdir = Path(args.output)
    _check_outdir(outdir, force=args.force, resume=False)
    kwargs = {}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.device is not None:
        kwargs["device"] = args.device
    try:
        result = digits.run(train=list(args.train), eval=list(args.eval), out_dir=outdir, seed=args.seed,
                            progress=not args.quiet, **kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(_first_line(err)) from None
    if not args.quiet and isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    print(f"digits outputs in {outdir}/")
    return 0


def _median_time(fn, repeats: int, warmup: int) -> float:
    """Median seconds of fn() over ``repeats`` runs after ``warmup`` untimed ones."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bench_cases(quick: bool):
    """(op name, size label, make inputs, call(backend, inputs)) for each benchmark."""
    import torch

    import fastlddmm as fl
    from fastlddmm import distances

    chamfer = getattr(fl, "chamfer", distances.chamfer)
    sinkhorn = getattr(fl, "sinkhorn", distances.sinkhorn)
    gen = torch.Generator().manual_seed(0)

    def flow_inputs(n, width=64, layers=10, dim=3):
        x = torch.randn(n, dim, generator=gen)
        params = [torch.randn(layers, width, dim, generator=gen) / math.sqrt(dim),
                  torch.randn(layers, width, generator=gen) * 0.1,
                  torch.randn(layers, dim, width, generator=gen) / math.sqrt(width),
                  torch.randn(layers, dim, generator=gen) * 0.1]
        return [x] + [p.requires_grad_(True) for p in params], 1.0 / layers

    def flow_call(backend, inputs):
        tensors, dt = inputs
        x, *params = tensors
        x = x.detach().requires_grad_(True)
        out, energy = fl.ops.euler_flow(x, *params, dt, "relu", backend=backend)
        (out.square().sum() + energy).backward()

    def pair(n):
        x = torch.randn(n, 3, generator=gen)
        return x, torch.randn(n + 7, 3, generator=gen) + 0.5

    def dist_call(fn):
        def call(backend, inputs):
            x, y = inputs
            x = x.detach().requires_grad_(True)
            fn(x, y, backend=backend).backward()
        return call

    flow_sizes = (1000, 5000) if quick else (2000, 20000)
    chamfer_sizes = (500, 2000) if quick else (1000, 4000)
    sinkhorn_sizes = (300, 1000) if quick else (500, 2000)
    cases = []
    for n in flow_sizes:
        cases.append(("euler_flow fwd+bwd", f"N={n} H=64 L=10", lambda n=n: flow_inputs(n), flow_call))
    for n in chamfer_sizes:
        cases.append(("chamfer fwd+bwd", f"N={n} M={n + 7}", lambda n=n: pair(n), dist_call(chamfer)))
    for n in sinkhorn_sizes:
        cases.append(("sinkhorn fwd+bwd", f"N={n} M={n + 7}", lambda n=n: pair(n), dist_call(sinkhorn)))
    return cases


def cmd_bench(args) -> int:
    import torch

    import fastlddmm as fl

    statuses = fl.backends()
    fast = [name for name, st in statuses.items() if name != "reference" and st.available]
    skipped = {name: st.reason for name, st in statuses.items() if name != "reference" and not st.available}
    if "triton" in fast and not torch.cuda.is_available():
        fast.remove("triton")
        skipped["triton"] = "runs in the CPU interpreter here (TRITON_INTERPRET=1): correct but not fast, not timed"
    print(f"fastlddmm {fl.__version__} bench: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
          f"median of {args.repeats} runs after {args.warmup} warm-up run(s), float32")
    for name, why in skipped.items():
        print(f"  not timed: {name}: {why}")
    if "keops" in fast:
        print("  note: keops compiles each formula on first use (cached afterwards); the warm-up absorbs it")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    header = f"{'op':<20} {'size':<18} {'backend':<10} {'median ms':>10} {'reference ms':>13} {'speed-up':>9}"
    print(header)
    print("-" * len(header))
    with warnings.catch_warnings():  # keep the table readable (e.g. KeOps' compile notices)
        warnings.simplefilter("ignore")
        _bench_table(args, fast, device)
    print("Full side-by-side comparison (eager and torch.compile, GeomLoss, scipy cKDTree, pykeops; other sizes; "
          "GPU): `python benchmarks/compare.py [--quick]` in a source checkout (asv suite: benchmarks/bench_*.py).")
    return 0


def _bench_table(args, fast: list[str], device: str) -> None:
    from fastlddmm import _backend

    for op, size, make, call in _bench_cases(args.quick):
        inputs = make()
        if device == "cuda":
            inputs = _to_device(inputs, device)
        try:
            ref = _median_time(lambda: call("reference", inputs), args.repeats, args.warmup)
        except (RuntimeError, MemoryError) as err:  # e.g. the dense reference running out of memory
            print(f"{op:<20} {size:<18} {'reference':<10} failed: {_first_line(err)}")
            continue
        print(f"{op:<20} {size:<18} {'reference':<10} {ref * 1e3:>10.2f} {ref * 1e3:>13.2f} {'1.00x':>9}")
        for backend in fast:
            try:
                t = _median_time(lambda: call(backend, inputs), args.repeats, args.warmup)
            except (_backend.BackendUnavailableError, NotImplementedError) as err:
                print(f"{op:<20} {size:<18} {backend:<10} {'n/a':>10}  ({_first_line(err).split(';')[0]})")
                continue
            print(f"{op:<20} {size:<18} {backend:<10} {t * 1e3:>10.2f} {ref * 1e3:>13.2f} {ref / t:>8.2f}x")
        sys.stdout.flush()


def _to_device(inputs, device):
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], float):
        tensors, dt = inputs
        return [t.detach().to(device).requires_grad_(t.requires_grad) for t in tensors], dt
    return tuple(t.to(device) for t in inputs)


def _gpu_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs between 0 and 1, got {text!r}") from None
    if not 0 <= value <= 1:  # one registration uses one device; a fraction lets pairs share a GPU
        raise argparse.ArgumentTypeError(f"expected a number of GPUs between 0 and 1, got {text!r}")
    return value


def _batch_engine(args, log) -> str:
    """The engine that runs the pairs, "ray" or "local"; a usage error when Ray is asked for and missing."""
    from fastlddmm import batch

    if args.engine == "local":
        if args.address:
            raise UserError("--address is for the Ray engine (drop --engine local)")
        if args.gpus_per_pair:
            raise UserError("--gpus-per-pair is for the Ray engine; the local engine uses --device cuda")
        return "local"
    if batch.have_ray():
        return "ray"
    if args.engine == "ray" or args.address:
        raise UserError(f"{'--engine ray' if args.engine == 'ray' else '--address'} needs Ray, which is not "
                        f"installed here: {batch.RAY_HINT}")
    log(f"Ray is not installed: registering the pairs one after the other ({batch.RAY_HINT} to run them in "
        f"parallel)")
    return "local"


def cmd_batch(args) -> int:
    from fastlddmm import batch

    log = _Log(args.quiet)
    pairs = batch.read_manifest(Path(args.manifest))
    engine = _batch_engine(args, log)
    options = _options(args)
    on_cuda = str(options.get("device") or "cpu").startswith("cuda")
    gpus = args.gpus_per_pair if args.gpus_per_pair is not None else (1.0 if on_cuda else 0.0)
    if gpus and options.get("device") == "cpu":
        raise UserError("--gpus-per-pair with --device cpu: drop one of them")
    outdir = Path(args.output)
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"output {str(outdir)!r} exists and is not a directory")
    outdir.mkdir(parents=True, exist_ok=True)
    common = dict(options=options, force=args.force, pictures=not args.no_pictures, quiet=args.quiet)
    try:
        if engine == "ray":
            rows = batch.run_ray(pairs, outdir, cpus_per_pair=args.cpus_per_pair or 1, gpus_per_pair=gpus,
                                 address=args.address, log=log, **common)
        else:
            rows = batch.run_local(pairs, outdir, threads=args.cpus_per_pair, **common)
    except KeyboardInterrupt:
        sys.stderr.write("\nfastlddmm: run the same command again to continue: finished pairs are skipped, "
                         "interrupted ones resume from their checkpoints\n")
        raise
    failed = sum(row["status"].startswith("error") for row in rows)
    log(f"{len(rows) - failed} of {len(rows)} pairs registered; table in {outdir / 'summary.csv'}")
    if not args.quiet:
        print(outdir / "summary.csv")
    return EXIT_FAILED if failed else 0


def cmd_backends(args) -> int:
    import fastlddmm as fl

    statuses = fl.backends()
    width = max(len(n) for n in statuses)
    for name, st in statuses.items():
        print(f"{name:<{width}}  {'usable' if st.available else 'no':<6}  {st.reason}")
    return 0


# -- parser ------------------------------------------------------------------------------------------

def _registration_options(p: argparse.ArgumentParser, *, defaults: dict = REGISTER_DEFAULTS) -> None:
    from fastlddmm.reference.flow import ACTIVATIONS

    g = p.add_argument_group("registration")
    g.add_argument("--data-term", choices=("sinkhorn", "chamfer", "l2"), default=defaults["data_term"],
                   help="distance between the warped source and the target (default: %(default)s; "
                        "l2 needs one target point per source point)")
    g.add_argument("--sigma", type=_positive_float, default=defaults["sigma"],
                   help="data-term weight 1/(2 sigma^2), relative to the shapes' size (default: %(default)s)")
    g.add_argument("--blur", type=_positive_float, default=defaults["blur"],
                   help="Sinkhorn blur, relative to the shapes' size (default: %(default)s)")
    g.add_argument("--steps", type=_positive_int, default=defaults["steps"], help="optimiser steps (default: %(default)s)")
    g.add_argument("--width", type=_positive_int, default=defaults["width"],
                   help="hidden units per residual block (default: %(default)s)")
    g.add_argument("--layers", type=_positive_int, default=defaults["layers"],
                   help="residual blocks = Euler steps of the flow (default: %(default)s)")
    g.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: 5e-3 for adam, 1.0 for lbfgs)")
    g.add_argument("--optimizer", choices=("adam", "lbfgs"), default=defaults["optimizer"],
                   help="(default: %(default)s)")
    g.add_argument("--activation", choices=ACTIVATIONS, default=defaults["activation"],
                   help="nonlinearity of the blocks (default: %(default)s)")
    g.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    g.add_argument("--seed", type=int, default=defaults["seed"], help="initialisation seed (default: %(default)s)")
    g.add_argument("--backend", choices=("auto", "reference", "cpu", "cuda", "triton", "keops"),
                   default=defaults["backend"], help="kernels to use (default: %(default)s; see: fastlddmm backends)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=defaults["checkpoint_every"], metavar="N",
                   help="write OUTDIR/checkpoint.pt every N steps (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    import fastlddmm as fl

    parser = _Parser(prog="fastlddmm", description="Diffeomorphic registration of point clouds (ResNet-LDDMM).",
                     epilog="FASTLDDMM_DEBUG=1 shows full tracebacks on errors.")
    parser.add_argument("--version", action="version", version=f"fastlddmm {fl.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("register", help="register SOURCE onto TARGET (point clouds or meshes)",
                       description="Registers SOURCE onto TARGET and writes into OUTDIR: warped.<ext> (the "
                                   "warped source, same format; a mesh keeps its faces), trajectory.npy, "
                                   "flow.gif, losses.png, registration.png, registration.pt and summary.json. "
                                   "Formats: .npy .txt .csv .xyz .ply .obj .vtk .off .stl")
    p.add_argument("source", help="the shape to deform")
    p.add_argument("target", help="the shape to reach")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    _registration_options(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTDIR/checkpoint.pt")
    p.add_argument("--force", action="store_true", help="overwrite the results in an existing OUTDIR")
    p.add_argument("--no-pictures", action="store_true", help="skip flow.gif, losses.png and registration.png")
    p.add_argument("--distributed", action="store_true",
                   help="shard the points over the processes of a torchrun job (`torchrun --nproc-per-node P "
                        "-m fastlddmm register ... --distributed`): exact data terms across shards, gloo on CPUs, "
                        "nccl on GPUs; rank 0 writes the outputs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("demo", help="run the built-in examples (2-D face, 3-D blob) end to end",
                       description="Registers the built-in examples (a smiling face onto a neutral one in 2-D, a "
                                   "three-lobed column onto a bent, twisted one in 3-D) and writes their outputs.")
    p.add_argument("-o", "--output", default="fastlddmm-demo", metavar="OUTDIR",
                   help="output folder (default: ./%(default)s)")
    p.add_argument("--only", nargs="+", choices=tuple(DEMO_SETTINGS), help="run only these examples")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimiser steps (default: per example)")
    p.add_argument("--width", type=_positive_int, default=None, help="hidden units (default: per example)")
    p.add_argument("--data-term", choices=("sinkhorn", "chamfer", "l2"), default=None,
                   help="(default: chamfer, the fastest on a CPU; l2 works for the face only)")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda ... (default: cpu)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUTDIR")
    p.add_argument("--no-pictures", action="store_true", help="skip the GIFs and PNGs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("digits", help="image registration on handwritten digits (multistep network)")
    p.add_argument("--train", nargs="+", type=_digit, required=True, metavar="DIGIT", help="digits to train on")
    p.add_argument("--eval", nargs="+", type=_digit, required=True, metavar="DIGIT", help="digits to evaluate on")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--steps", type=_positive_int, default=None, help="training iterations (default: the module's)")
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda ... (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUTDIR")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_digits)

    p = sub.add_parser("bench", help="quick timing of each usable backend against the reference",
                       description="Times fl.ops.euler_flow (forward + backward), chamfer and sinkhorn for each "
                                   "usable backend against the pure-PyTorch reference, in the same run. The full "
                                   "comparisons are in benchmarks/ (asv).")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per case (default: %(default)s)")
    p.add_argument("--warmup", type=_positive_int, default=2, help="untimed runs first (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("batch", help="register every pair of a CSV manifest (source,target[,name])",
                       description="Registers each row of MANIFEST.csv (columns source,target and optionally name; "
                                   "relative paths are relative to the manifest) into OUTDIR/<name>/, each pair a "
                                   "Ray task when Ray is installed (pip install 'fastlddmm[ray]'), else one after "
                                   "the other. Pairs with results already in OUTDIR are skipped, interrupted ones "
                                   "resume from their checkpoint. Writes OUTDIR/summary.csv (name, status, "
                                   "final_loss, data, energy, min_jacobian_det, folds, seconds, source, target).")
    p.add_argument("manifest", metavar="MANIFEST.csv")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    _registration_options(p)
    g = p.add_argument_group("scheduling")
    g.add_argument("--engine", choices=("auto", "ray", "local"), default="auto",
                   help="ray: one Ray task per pair, as many at once as there are resources; local: one pair "
                        "after the other in this process; auto: ray when it is installed (default)")
    g.add_argument("--address", default=None, metavar="ADDR",
                   help="Ray cluster to run on, e.g. ray://head:10001 or head:6379 (default: $RAY_ADDRESS, else "
                        "a Ray started on this machine for this run); OUTDIR and the inputs must be on a file "
                        "system every node sees")
    g.add_argument("--cpus-per-pair", type=_positive_int, default=None, metavar="K",
                   help="CPU cores (torch threads) per pair (default: 1 on Ray, torch's default with the local "
                        "engine)")
    g.add_argument("--gpus-per-pair", type=_gpu_share, default=None, metavar="G",
                   help="GPUs per pair on Ray: 1, or a fraction such as 0.5 to share one GPU between pairs "
                        "(default: 1 with --device cuda, else 0); the pair runs on the GPU Ray assigns")
    p.add_argument("--force", action="store_true", help="redo pairs that already have results")
    p.add_argument("--no-pictures", action="store_true", help="skip the GIF and PNGs of each pair")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("backends", help="which backends are built and usable here, and why not")
    p.set_defaults(func=cmd_backends)
    return parser


def _refuse_unsharded_torchrun(args) -> None:
    """Under torchrun with several processes, only `register --distributed` shares the work: any other
    command would run once per process, all writing the same files."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if world > 1 and not getattr(args, "distributed", False):
        what = "add --distributed to share one registration between them" if args.func is cmd_register else \
            "only `register --distributed` runs across processes"
        raise UserError(f"started as one of {world} processes (WORLD_SIZE={world}, torchrun?): {what}, "
                        f"or run without torchrun")


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 failed, 2 usage error, 130 interrupted)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else EXIT_USAGE)
    try:
        _refuse_unsharded_torchrun(args)
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\nfastlddmm: interrupted" + (" (rerun with --resume to continue)"
                                                      if getattr(args, "command", "") == "register" else "") + "\n")
        return EXIT_INTERRUPTED
    except UserError as err:
        if _debug():
            raise
        sys.stderr.write(f"fastlddmm: error: {err}\n")
        return EXIT_USAGE
    except Failed as err:
        if _debug():
            raise
        sys.stderr.write(f"fastlddmm: failed: {err}\n")
        return EXIT_FAILED
    except OSError as err:  # disk full, permission denied on the output folder ...
        if _debug():
            raise
        sys.stderr.write(f"fastlddmm: error: {err.strerror or _first_line(err)}"
                         f"{': ' + repr(err.filename) if err.filename else ''}\n")
        return EXIT_USAGE
    except Exception as err:
        if _debug():
            raise
        sys.stderr.write(f"fastlddmm: internal error: {type(err).__name__}: {_first_line(err)} "
                         f"(please report it; FASTLDDMM_DEBUG=1 shows the traceback)\n")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
