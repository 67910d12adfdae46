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
import json
import math
import os
import sys
from pathlib import Path

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """Something the user can fix (a file, an option): one line, exit status 2."""


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


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
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


def _options(args) -> dict:
    from fastlddmm.pipeline import REGISTER_OPTIONS

    return {k: getattr(args, k) for k in REGISTER_OPTIONS if hasattr(args, k)}


# -- subcommands --------------------------------------------------------------------------------------

def cmd_register(args) -> int:
    from fastlddmm import pipeline

    if args.distributed:
        return _register_distributed(args)
    log = _Log(args.quiet)
    outdir = Path(args.output)
    pipeline.check_outdir(outdir, force=args.force, resume=args.resume)
    if args.resume and not (outdir / "checkpoint.pt").exists():
        log(f"no checkpoint in {str(outdir)!r}: starting from the beginning")
    summary = pipeline.run_pair(args.source, args.target, outdir, options=_options(args), resume=args.resume,
                                progress=not args.quiet, log=log, pictures=not args.no_pictures, up=args.up)
    _print_summary(summary, outdir, quiet=args.quiet)
    return 0


def _register_distributed(args) -> int:
    """`register --distributed` on every rank of a torchrun job: the points are sharded over the ranks,
    rank 0 reports and writes the outputs. Without --device: cuda:LOCAL_RANK with nccl when GPUs are
    visible, else the CPU with gloo; --device cpu forces gloo on the CPU, --device cuda nccl on GPUs."""
    import torch.distributed as dist

    from fastlddmm import distributed as fld
    from fastlddmm import pipeline

    if args.device is not None and args.device not in ("cpu", "cuda"):
        raise UserError(f"--distributed takes --device cpu or --device cuda (each rank uses cuda:LOCAL_RANK), "
                        f"got --device {args.device}")
    try:
        device = fld.init(None if args.device is None else ("gloo" if args.device == "cpu" else "nccl"))
    except (RuntimeError, ValueError) as err:
        raise UserError(pipeline.first_line(err)) from None
    try:
        rank = dist.get_rank()
        log = _Log(args.quiet or rank != 0)
        outdir = Path(args.output)
        # Every rank checks before any rank writes (else rank 1 could see rank 0's new files).
        pipeline.check_outdir(outdir, force=args.force, resume=args.resume)
        dist.barrier()
        if args.resume and not (outdir / "checkpoint.pt").exists():
            log(f"no checkpoint in {str(outdir)!r}: starting from the beginning")
        log(f"{dist.get_world_size()} ranks ({dist.get_backend()}), this one on {device}")
        options = {**_options(args), "device": str(device)}
        summary = pipeline.run_pair(args.source, args.target, outdir, options=options, resume=args.resume,
                                    progress=not args.quiet, log=log, pictures=not args.no_pictures,
                                    distributed=True, up=args.up)
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
          f"min det Dφ = {summary['min_jacobian_determinant']:.3g}, folds: {summary['folds']}"
          + (f", flipped triangles: {summary['flipped_triangles']} of {summary['triangles']} "
             f"({100 * summary['flipped_fraction']:.2f}%)" if summary.get("triangles") else ""))
    print(f"  outputs in {outdir}/: " + ", ".join(summary["outputs"].values()))


def cmd_demo(args) -> int:
    from fastlddmm import pipeline

    overrides = {"steps": args.steps, "width": args.width, "data_term": args.data_term, "device": args.device}
    done = pipeline.run_demo(Path(args.output), only=args.only, overrides=overrides, force=args.force,
                             progress=not args.quiet, pictures=not args.no_pictures, log=_Log(args.quiet),
                             on_done=lambda summary, sub: _print_summary(summary, sub, quiet=args.quiet))
    if not args.quiet and args.no_pictures:
        print(f"demo outputs in {args.output}/: " + ", ".join(f"{d.name}/" for d in done))
    elif not args.quiet:
        print(f"demo outputs in {args.output}/: " + ", ".join(f"{d.name}/flow.gif" for d in done)
              + " (animations), registration.png (before/after), summary.json (numbers)")
    return 0


def cmd_digits(args) -> int:
    from fastlddmm import pipeline

    try:
        from fastlddmm.image import digits
    except ImportError as err:
        raise UserError(f"the digits example needs the image extra: pip install 'fastlddmm[image]' "
                        f"({pipeline.first_line(err)})") from None
    outdir = Path(args.output)
    pipeline.check_outdir(outdir, force=args.force, resume=False)
    kwargs = {}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    if args.seconds is not None:
        kwargs["seconds"] = args.seconds
    if args.independent:
        kwargs["shared"] = False
    if args.threads is not None:
        kwargs["threads"] = args.threads
    if args.device is not None:
        kwargs["device"] = args.device
    try:
        result = digits.run(train=list(args.train), eval=list(args.eval), out_dir=outdir, seed=args.seed,
                            progress=not args.quiet, **kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(pipeline.first_line(err)) from None
    if not args.quiet and isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    print(f"digits outputs in {outdir}/")
    return 0


def cmd_bench(args) -> int:
    from fastlddmm import benchmark

    benchmark.run(repeats=args.repeats, warmup=args.warmup, quick=args.quick, out=sys.stdout)
    return 0


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
    from fastlddmm import dispatch

    statuses = dispatch.backends()
    width = max(len(n) for n in statuses)
    for name, st in statuses.items():
        print(f"{name:<{width}}  {'usable' if st.available else 'no':<6}  {st.reason}")
    print("\nops and their backends (fastlddmm/dispatch.py; * usable here on CPU float32 tensors):")
    probe = dispatch.Problem(device="cpu", dtype=__import__("torch").float32, dim=3)
    for op in dispatch.OPS:
        names = [f"{b}{'*' if dispatch.usable(op, b, probe) else ''}" for b in dispatch.backends_for(op)]
        print(f"  {op:<11} {', '.join(names)}")
    return 0


# -- parser ------------------------------------------------------------------------------------------

def _registration_options(p: argparse.ArgumentParser) -> None:
    from fastlddmm.dispatch import BACKENDS
    from fastlddmm.registration import ACTIVATIONS, DATA_TERMS, DEFAULT_LR, DEFAULTS, OPTIMIZERS, PRESETS, QUALITIES

    def preset(field: str) -> str:
        return "default: from --quality: " + ", ".join(f"{q} {getattr(PRESETS[q], field):g}" for q in QUALITIES)

    g = p.add_argument_group("registration")
    g.add_argument("--quality", choices=QUALITIES, default=DEFAULTS.quality,
                   help="preset for the flow's size and the schedule; the options below override it. fast: 500 "
                        "Adam steps; balanced: coarse-to-fine then L-BFGS, a fold barrier on meshes (closer to "
                        "the target, no flipped triangles, about fast's time on 10^4-vertex meshes); best: a "
                        "wider, deeper flow for ~10x longer (README, Registration quality) (default: %(default)s)")
    g.add_argument("--data-term", choices=DATA_TERMS, default=DEFAULTS.data_term,
                   help="distance between the warped source and the target (default: %(default)s; "
                        "l2 needs one target point per source point)")
    g.add_argument("--sigma", type=_positive_float, default=DEFAULTS.sigma,
                   help="data-term weight 1/(2 sigma^2) at the end of the schedule, relative to the shapes' size "
                        f"({preset('sigma')})")
    g.add_argument("--blur", type=_positive_float, default=DEFAULTS.blur,
                   help="Sinkhorn blur at the end of the schedule, relative to the shapes' size (default: %(default)s)")
    g.add_argument("--fold-penalty", type=_non_negative_float, default=DEFAULTS.fold_penalty, metavar="W",
                   help="for a mesh: weight of a penalty on triangles that turn over among their neighbours "
                        f"(fastlddmm.mesh.FoldBarrier; {preset('fold_penalty')}; 0: off)")
    g.add_argument("--steps", type=_positive_int, default=DEFAULTS.steps,
                   help=f"optimiser steps of the schedule, all stages together ({preset('steps')}; the preset's "
                        f"L-BFGS refinement comes on top)")
    g.add_argument("--width", type=_positive_int, default=DEFAULTS.width,
                   help=f"hidden units per residual block ({preset('width')})")
    g.add_argument("--layers", type=_positive_int, default=DEFAULTS.layers,
                   help=f"residual blocks = Euler steps of the flow ({preset('layers')})")
    g.add_argument("--lr", type=_positive_float, default=DEFAULTS.lr,
                   help="learning rate (default: " + ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULTS.optimizer, help="(default: %(default)s)")
    g.add_argument("--activation", choices=ACTIVATIONS, default=DEFAULTS.activation,
                   help="nonlinearity of the blocks (default: %(default)s)")
    g.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed, help="initialisation seed (default: %(default)s)")
    g.add_argument("--backend", choices=("auto", *BACKENDS), default=DEFAULTS.backend,
                   help="kernels to use (default: %(default)s; see: fastlddmm backends)")
    g.add_argument("--checkpoint-every", type=_positive_int, default=DEFAULTS.checkpoint_every, metavar="N",
                   help="write OUTDIR/checkpoint.pt every N steps (default: %(default)s)")


def _picture_options(p: argparse.ArgumentParser) -> None:
    from fastlddmm.viz import UPS

    p.add_argument("--up", choices=UPS, default=None,
                   help="the axis 3-D pictures draw upwards (default: y for .obj and .ply files, the convention of "
                        "scans; else auto, the shape's principal axis)")


def build_parser() -> argparse.ArgumentParser:
    import fastlddmm as fl
    from fastlddmm.pipeline import DEMO_SETTINGS
    from fastlddmm.registration import DATA_TERMS

    parser = _Parser(prog="fastlddmm", description="Diffeomorphic registration of point clouds (ResNet-LDDMM).",
                     epilog="FASTLDDMM_DEBUG=1 shows full tracebacks on errors.")
    parser.add_argument("--version", action="version", version=f"fastlddmm {fl.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("register", help="register SOURCE onto TARGET (point clouds or meshes)",
                       description="Registers SOURCE onto TARGET and writes into OUTDIR: warped.<ext> (the "
                                   "warped source, same format; a mesh keeps its faces), trajectory.npy, "
                                   "flow.gif, filmstrip.png, losses.png, registration.png, registration.pt and "
                                   "summary.json (for a mesh: how many triangles flip). "
                                   "Formats: .npy .txt .csv .xyz .ply .obj .vtk .off .stl")
    p.add_argument("source", help="the shape to deform")
    p.add_argument("target", help="the shape to reach")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    _registration_options(p)
    _picture_options(p)
    p.add_argument("--resume", action="store_true", help="continue from OUTDIR/checkpoint.pt")
    p.add_argument("--force", action="store_true", help="overwrite the results in an existing OUTDIR")
    p.add_argument("--no-pictures", action="store_true",
                   help="skip flow.gif, filmstrip.png, losses.png and registration.png")
    p.add_argument("--distributed", action="store_true",
                   help="shard the points over the processes of a torchrun job (`torchrun --nproc-per-node P "
                        "-m fastlddmm register ... --distributed`): exact data terms across shards, gloo on CPUs, "
                        "nccl on GPUs (--device cpu / cuda chooses; default: GPUs when visible); rank 0 writes "
                        "the outputs")
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
    p.add_argument("--data-term", choices=DATA_TERMS, default=None,
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
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive_int, default=None, help="training iterations (default: the module's)")
    g.add_argument("--seconds", type=_positive_float, default=None, metavar="S",
                   help="train for S seconds instead of a number of iterations (e.g. 300 to train longer)")
    p.add_argument("--independent", action="store_true",
                   help="one network per step instead of one network applied at every step (shared weights)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: torch's, or 1 when the load average says every core is busy)")
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
    from fastlddmm.pipeline import InputError, PairFailed, first_line

    try:
        _refuse_unsharded_torchrun(args)
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\nfastlddmm: interrupted" + (" (rerun with --resume to continue)"
                                                      if getattr(args, "command", "") == "register" else "") + "\n")
        return EXIT_INTERRUPTED
    except (UserError, InputError) as err:
        if _debug():
            raise
        sys.stderr.write(f"fastlddmm: error: {err}\n")
        return EXIT_USAGE
    except PairFailed as err:
        if _debug():
            raise
        sys.stderr.write(f"fastlddmm: failed: {err}\n")
        return EXIT_FAILED
    except OSError as err:  # disk full, permission denied on the output folder ...
        if _debug():
            raise
        sys.stderr.write(f"fastlddmm: error: {err.strerror or first_line(err)}"
                         f"{': ' + repr(err.filename) if err.filename else ''}\n")
        return EXIT_USAGE
    except Exception as err:
        if _debug():
            raise
        sys.stderr.write(f"fastlddmm: internal error: {type(err).__name__}: {first_line(err)} "
                         f"(please report it; FASTLDDMM_DEBUG=1 shows the traceback)\n")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
