"""Many registrations from a manifest: one Ray task per pair, or one pair after the other.

``fastlddmm batch MANIFEST.csv -o OUTDIR`` registers each (source, target) row into OUTDIR/<name>/ with
:func:`fastlddmm.pipeline.run_pair`, the function behind ``fastlddmm register``, so both engines write the
same files and the same numbers:

- ``ray``: each pair is a Ray task that asks for ``cpus_per_pair`` CPUs (its torch thread count) and
  ``gpus_per_pair`` GPUs; Ray's scheduler runs as many at once as the machine or cluster has room for.
  Ray is an optional dependency: ``pip install 'fastlddmm[ray]'``.
- ``local``: one pair after the other in this process.

A pair whose summary.json exists is done and is skipped (unless ``force``); an interrupted one resumes
from its checkpoint. OUTDIR/summary.csv has one row per pair in manifest order and is rewritten
atomically whenever a pair finishes; a pair that fails gets an ``error: ...`` status and the others go on.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from ._atomic import write_text
from .pipeline import InputError, PairFailed, first_line, run_pair

SUMMARY_COLUMNS = ("name", "status", "final_loss", "data", "energy", "min_jacobian_det", "folds", "seconds",
                   "source", "target")
STATUS_OK = "ok"
STATUS_DONE = "done (earlier run)"
RAY_HINT = "pip install 'fastlddmm[ray]'"


# -- the manifest and the summary table --------------------------------------------------------------

def read_manifest(path: Path) -> list[dict]:
    """The pairs of a CSV manifest (header source,target[,name]) as dicts name, source, target.

    Relative paths are relative to the manifest; paths come back absolute, because a Ray worker does not
    run in this process's working directory. A pair without a name takes its source's stem; repeated
    names get -2, -3 ... so that every pair has its own output folder.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"cannot read manifest {str(path)!r}: no such file")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            fields = [c.strip() for c in (reader.fieldnames or [])]
    except (UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read manifest {str(path)!r}: {first_line(err)}") from None
    if "source" not in fields or "target" not in fields:
        raise InputError(f"manifest {str(path)!r} needs a header line with columns source,target[,name]; "
                        f"got {','.join(fields) or 'nothing'}")
    pairs, seen = [], set()
    for number, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row.get("source") or not row.get("target"):
            raise InputError(f"manifest {str(path)!r} line {number}: empty source or target")
        src, tgt = (path.parent / row["source"]).absolute(), (path.parent / row["target"]).absolute()
        name = row.get("name") or src.stem
        if any(c in name for c in "/\\") or name in (".", ".."):
            raise InputError(f"manifest {str(path)!r} line {number}: name {name!r} must not contain a path")
        base, k = name, 2
        while name in seen:  # same stem twice: keep both
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        pairs.append({"name": name, "source": src, "target": tgt})
    if not pairs:
        raise InputError(f"manifest {str(path)!r} lists no pairs")
    return pairs


def summary_row(summary: dict) -> dict:
    """The summary.csv columns taken from one pair's summary.json."""
    f = summary.get("final", {})
    return {"final_loss": f.get("loss"), "data": f.get("data"), "energy": f.get("energy"),
            "min_jacobian_det": summary.get("min_jacobian_determinant"), "folds": summary.get("folds"),
            "seconds": round(summary.get("seconds", {}).get("registration", float("nan")), 3)}


def write_summary_csv(path: Path, rows: list[dict]) -> None:
    """Writes the table atomically (temporary file + rename): a reader never sees half a file."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in SUMMARY_COLUMNS})
    write_text(path, buf.getvalue())


def _base_row(pair: dict, status: str) -> dict:
    return {"name": pair["name"], "source": str(pair["source"]), "target": str(pair["target"]), "status": status}


def _earlier_summary(folder: Path) -> dict | None:
    """summary.json of a pair finished by an earlier run, or None (absent or unreadable: redo the pair)."""
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


class _Table:
    """summary.csv: every pair's row in manifest order ("pending" until it finishes)."""

    def __init__(self, path: Path, pairs: list[dict]):
        self.path = path
        self.rows = [_base_row(pair, "pending") for pair in pairs]

    def set(self, index: int, row: dict) -> None:
        self.rows[index] = row
        write_summary_csv(self.path, self.rows)

    def interrupted(self) -> None:
        for row in self.rows:
            if row["status"] == "pending":
                row["status"] = "interrupted"
        write_summary_csv(self.path, self.rows)


# -- one pair: the same code under both engines ------------------------------------------------------

def register_pair(pair: dict, outdir: Path, *, options: dict, force: bool, pictures: bool) -> dict:
    """Registers one manifest pair into outdir/<name>/; returns its summary.csv row.

    A bad input or a diverged registration gives an ``error: ...`` row; anything else (a bug) raises.
    """
    try:
        summary = run_pair(pair["source"], pair["target"], Path(outdir) / pair["name"], options=options,
                           resume=not force, progress=False, name=pair["name"], pictures=pictures)
    except (InputError, PairFailed) as err:
        return _base_row(pair, f"error: {err}")
    return {**_base_row(pair, STATUS_OK), **summary_row(summary)}


def package_identity() -> dict:
    """Which fastlddmm this process runs: version, folder, and whether its compiled extension loaded."""
    import fastlddmm
    from fastlddmm import dispatch

    return {"version": fastlddmm.__version__, "path": str(Path(fastlddmm.__file__).resolve().parent),
            "compiled": dispatch.compiled_module() is not None}


def _shadowing_checkout(cwd: Path | None = None) -> Path | None:
    """A fastlddmm source folder in the current directory that is not the package this process imported.

    Ray puts the driver's current directory first on every worker's sys.path: run from a source checkout
    with the package installed (not editable), the workers would import the checkout instead, without its
    compiled extension, and silently compute on another backend."""
    folder = (cwd or Path.cwd()) / "fastlddmm"
    if (folder / "__init__.py").is_file() and folder.resolve() != Path(package_identity()["path"]):
        return folder
    return None


def _ray_task(pair: dict, outdir: Path, *, options: dict, force: bool, pictures: bool, threads: int,
              driver: dict) -> dict:
    """The body of one Ray task: torch gets the task's CPU share, and the GPU Ray assigned if any."""
    import ray
    import torch

    mine = package_identity()
    if mine["version"] != driver["version"] or (driver["compiled"] and not mine["compiled"]):
        return _base_row(pair, f"error: this Ray worker runs fastlddmm {mine['version']} from {mine['path']} "
                               f"({'with' if mine['compiled'] else 'without'} its compiled extension), the driver "
                               f"{driver['version']} from {driver['path']} (with it): install the same fastlddmm on "
                               f"every node")

    # A worker process is reused by later tasks and torch keeps its thread count: set it every time.
    torch.set_num_threads(threads)
    if ray.get_gpu_ids():  # Ray made the assigned GPU the only visible one (CUDA_VISIBLE_DEVICES)
        options = {**options, "device": "cuda"}
    return register_pair(pair, outdir, options=options, force=force, pictures=pictures)


# -- engines -----------------------------------------------------------------------------------------

def have_ray() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _todo(pairs: list[dict], outdir: Path, table: _Table, *, force: bool) -> list[int]:
    """Fills in the rows of the pairs done by an earlier run; returns the indices of the others."""
    todo = []
    for i, pair in enumerate(pairs):
        earlier = None if force else _earlier_summary(outdir / pair["name"])
        if earlier is None:
            todo.append(i)
        else:
            table.set(i, {**_base_row(pair, STATUS_DONE), **summary_row(earlier)})
    return todo


def _progress(total: int, done: int, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="pairs", unit="pair", disable=quiet)


def _finished(bar, row: dict) -> None:
    if row["status"].startswith("error"):
        bar.write(f"fastlddmm: {row['name']}: {row['status'][len('error: '):]}", file=sys.stderr)
    bar.set_postfix_str(f"{row['name']}: {row['status']}", refresh=False)
    bar.update(1)


def run_local(pairs: list[dict], outdir: Path, *, options: dict, force: bool = False, pictures: bool = True,
              threads: int | None = None, quiet: bool = False) -> list[dict]:
    """Registers the pairs one after the other in this process; returns the summary.csv rows.

    ``threads``: torch's thread count while the pairs run (default: torch's own, all cores).
    """
    table = _Table(Path(outdir) / "summary.csv", pairs)
    todo = _todo(pairs, Path(outdir), table, force=force)
    import torch

    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    bar = _progress(len(pairs), len(pairs) - len(todo), quiet)
    try:
        for i in todo:
            bar.set_postfix_str(pairs[i]["name"])
            row = register_pair(pairs[i], outdir, options=options, force=force, pictures=pictures)
            table.set(i, row)
            _finished(bar, row)
    except BaseException:
        table.interrupted()
        raise
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    return table.rows


def _local_cores() -> int:
    if hasattr(os, "process_cpu_count"):  # Python 3.13: honours the CPU affinity mask
        return os.process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _start_ray(address: str | None, *, cpus_per_pair: int, gpus_per_pair: float, quiet: bool) -> bool:
    """Connects to Ray; returns True when this call started it (and so must shut it down).

    A Ray already initialised in this process (a notebook, a test, a driver script) is used as it is.
    Otherwise: ``address`` or $RAY_ADDRESS names a running cluster; without either, a fresh Ray for this
    machine alone (address "local", so that a `ray start` cluster here is not picked up by accident).
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(logging_level=logging.ERROR if quiet else logging.WARNING, log_to_driver=not quiet)
    if _shadowing_checkout() is not None:
        # An empty working_dir keeps Ray from putting this directory (a fastlddmm checkout) on the workers' path.
        kwargs["runtime_env"] = {"working_dir": tempfile.mkdtemp(prefix="fastlddmm-ray-")}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise InputError(f"cannot connect to the Ray cluster at {address!r}: {first_line(err)}") from None
        return True
    # On a cluster Ray reports tasks it cannot place (and an autoscaler may add nodes); on this machine
    # nothing will ever come, so say so now instead of waiting forever.
    cores = _local_cores()
    if cpus_per_pair > cores:
        raise InputError(f"--cpus-per-pair {cpus_per_pair}: this machine has {cores} CPU cores")
    if gpus_per_pair > 0:
        import torch

        if not torch.cuda.is_available():
            raise InputError("--gpus-per-pair: torch sees no CUDA GPU on this machine (give a cluster with "
                            "--address, or run on the CPU with --gpus-per-pair 0)")
    ray.init(address="local", num_cpus=cores, include_dashboard=False, **kwargs)
    return True


def run_ray(pairs: list[dict], outdir: Path, *, options: dict, force: bool = False, pictures: bool = True,
            cpus_per_pair: int = 1, gpus_per_pair: float = 0.0, address: str | None = None,
            quiet: bool = False, log=None) -> list[dict]:
    """Registers each pair as a Ray task (``cpus_per_pair`` CPUs, ``gpus_per_pair`` GPUs); returns the rows.

    On a cluster, OUTDIR and the input files must be on a file system that every node sees, and the
    nodes need fastlddmm installed: the tasks read and write there, this process writes summary.csv.
    """
    import ray

    outdir = Path(outdir).absolute()
    table = _Table(outdir / "summary.csv", pairs)
    todo = _todo(pairs, outdir, table, force=force)
    if not todo:
        return table.rows
    started = _start_ray(address, cpus_per_pair=cpus_per_pair, gpus_per_pair=gpus_per_pair, quiet=quiet)
    waiting: dict = {}
    bar = None
    try:
        if log is not None:
            res = ray.cluster_resources()
            log(f"{len(todo)} pairs on Ray ({res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs), "
                f"{cpus_per_pair} CPU{'s' if cpus_per_pair > 1 else ''}"
                + (f" and {gpus_per_pair:g} GPU" if gpus_per_pair else "") + " per pair")
        task = ray.remote(_ray_task).options(num_cpus=cpus_per_pair, num_gpus=gpus_per_pair)
        driver = package_identity()
        waiting = {task.remote(pairs[i], outdir, options=options, force=force, pictures=pictures,
                               threads=cpus_per_pair, driver=driver): i for i in todo}
        bar = _progress(len(pairs), len(pairs) - len(todo), quiet)
        while waiting:
            [ref], _ = ray.wait(list(waiting), num_returns=1)
            i = waiting.pop(ref)
            try:
                row = ray.get(ref)
            except ray.exceptions.RayTaskError as err:  # a bug inside the task: this pair only
                cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else err
                row = _base_row(pairs[i], f"error: internal: {type(cause).__name__}: {first_line(cause)}")
            except ray.exceptions.RayError as err:  # the worker or its node died, out of memory ...
                row = _base_row(pairs[i], f"error: {type(err).__name__}: {first_line(err)}")
            table.set(i, row)
            _finished(bar, row)
    except BaseException:
        for ref in waiting:  # Ctrl-C: stop the running tasks; they resume from their checkpoints next time
            ray.cancel(ref)
        table.interrupted()
        raise
    finally:
        if bar is not None:
            bar.close()
        if started:
            ray.shutdown()
    return table.rows
