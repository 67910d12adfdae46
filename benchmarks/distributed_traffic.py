"""What a point-sharded registration step sends between ranks, measured, against docs/scaling.md's formulas.

Run under torchrun (CPU, gloo):

    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_traffic.py [--points 20000] [--out FILE.md]

Every torch.distributed collective is wrapped to count the bytes of the tensors handed to it (the payload;
on the wire a ring all-reduce moves 2(P-1)/P times that per rank, an all-gather (P-1)/P of its output, a
reduce-scatter (P-1)/P of its input).
One Adam step of fl.register(distributed=True) is measured per data term as the difference between a
3-step and a 1-step run (so the one-off normalisation and parameter broadcast drop out); seconds per step are
timed on steps 2-3, beside the same registration in one process (rank 0). Rank 0 writes the table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

import fastlddmm as fl
from fastlddmm import distributed as fld
from fastlddmm import sinkhorn_solver

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import machine_info  # noqa: E402  (benchmarks/ is not a package on torchrun's path)


COUNTS: Counter = Counter()
KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")


def _count(name: str, fn, nbytes):
    def wrapped(*args, **kwargs):
        COUNTS[name] += nbytes(*args, **kwargs)
        COUNTS[name + " calls"] += 1
        return fn(*args, **kwargs)

    return wrapped


def _install_counters() -> None:
    tensor_bytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    dist.all_reduce = _count("all_reduce", dist.all_reduce, lambda t, *a, **k: tensor_bytes(t))
    dist.all_gather = _count("all_gather", dist.all_gather, lambda out, t, *a, **k: sum(map(tensor_bytes, out)))
    dist.broadcast = _count("broadcast", dist.broadcast, lambda t, *a, **k: tensor_bytes(t))
    # fastlddmm.distributed holds its own reference to the reduce-scatter (its name changed in torch 2.13).
    fld._reduce_scatter = _count("reduce_scatter", fld._reduce_scatter, lambda out, t, *a, **k: tensor_bytes(t))


def _predicted(kind: str, n: int, m: int, d: int, n_params: int, rounds: int, world: int) -> int:
    """Payload bytes per step (float32) from docs/scaling.md, small bookkeeping messages left out."""
    params = 4 * n_params
    if kind == "l2":
        return params + 2 * 4  # the gradient all-reduce, and the energy and data values
    pad = lambda count: world * -(-count // world)  # noqa: E731  all_gather pads shards to the largest
    gathers = 4 * d * pad(n)  # the moved source; the target is gathered once per registration
    backward = 4 * d * pad(n)  # the gathered moved source's gradient, reduce-scattered (padded shards)
    if kind == "chamfer":
        return params + 4 + gathers + backward + (4 + 4) * (n + m)  # MIN of distances, MIN of owner ranks
    return params + 4 + gathers + backward + 2 * 4 * 2 * (n + m) * rounds  # MAX and SUM per soft-min


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20000, help="points in the source and in the target")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (rank 0)")
    args = parser.parse_args()

    device = fld.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    _install_counters()
    g = torch.Generator().manual_seed(0)
    source = torch.rand(args.points, 3, generator=g)
    target = torch.rand(args.points, 3, generator=g) * 0.8 + 0.3
    src, tgt = fld.shard(source).to(device), fld.shard(target).to(device)
    rows = []
    for kind in ("l2", "chamfer", "sinkhorn"):
        settings = dict(data_term=kind, width=args.width, layers=args.layers, progress=False, sigma=0.1, blur=0.05)
        measured, stamps = {}, []
        for steps in (1, 3):
            COUNTS.clear()
            dist.barrier()
            stamps.clear()
            reg = fl.register(src, tgt, steps=steps, distributed=True, **settings,
                              callback=lambda step, record: stamps.append(time.perf_counter()))
            measured[steps] = dict(COUNTS)
        per_step = {k: (measured[3].get(k, 0) - measured[1].get(k, 0)) / 2 for k in KINDS}
        seconds = (stamps[2] - stamps[0]) / 2  # steps 2 and 3: warm caches
        one_process = float("nan")
        if rank == 0:  # the same registration in this one process, for the speed-up
            stamps.clear()
            fl.register(source.to(device), target.to(device), steps=3, **settings,
                        callback=lambda step, record: stamps.append(time.perf_counter()))
            one_process = (stamps[2] - stamps[0]) / 2
        dist.barrier()
        n_params = sum(p.numel() for p in reg.flow.parameters())
        with torch.no_grad():
            normalised = (torch.cat([source, target]) - reg.center) / reg.scale
        diameter = sinkhorn_solver.max_diameter(normalised[: args.points], normalised[args.points:])
        rounds = len(sinkhorn_solver.epsilon_schedule(2, diameter, 0.05, 0.5)) + 2  # first guess, the loop, taped step
        predicted = _predicted(kind, args.points, args.points, 3, n_params, rounds, world)
        rows.append((kind, sum(per_step.values()), predicted, per_step, seconds, one_process, rounds))
    if rank == 0:
        info = machine_info(device.type)
        lines = [
            "# Bytes handed to torch.distributed collectives per registration step, per rank",
            "",
            f"{info['date_utc']} UTC, {info['cpu_model']} ({info['cpu_cores']} cores, load {info['load_average'][0]:.1f}), "
            f"{info.get('gpu', 'no GPU')}; {world} ranks ({dist.get_backend()}), device {device}, torch {torch.__version__}; "
            f"N = M = {args.points} points in 3-D (float32), width {args.width}, {args.layers} layers.",
            f"Command: `torchrun --standalone --nproc-per-node {world} benchmarks/distributed_traffic.py "
            f"--points {args.points}`",
            "",
            "| data term | measured bytes / step | predicted (docs/scaling.md) | all_reduce | all_gather | reduce_scatter | "
            f"Sinkhorn rounds | s / step, {world} ranks | s / step, 1 process |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for kind, total, predicted, per_step, seconds, one_process, rounds in rows:
            lines.append(f"| {kind} | {total:,.0f} | {predicted:,} | {per_step['all_reduce']:,.0f} | "
                         f"{per_step['all_gather']:,.0f} | {per_step['reduce_scatter']:,.0f} | {rounds if kind == 'sinkhorn' else '-'} | {seconds:.3f} | "
                         f"{one_process:.3f} |")
        lines += ["", "Each rank runs with the threads torchrun gives it (OMP_NUM_THREADS); the one-process run "
                  "uses rank 0's threads only, so the last two columns compare P ranks with one."]
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(text, encoding="utf-8")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
