"""Quick side-by-side of the fused Euler flow on the CPU: compiled path ("cpu") vs the reference (eager
autograd through fastlddmm.reference.euler_flow). Forward and forward+backward wall time, and the peak extra
resident memory of forward+backward (each backend in its own subprocess, so the high-water marks do
not mix). For the cpu backend also its two launchers alone (ops/flow/cpu.py forward and backward, the C++
kernels without autograd), on one thread and on all of torch's threads: what to hold against the FMA issue
bound in benchmarks/results/cpu_kernels.md (benchmarks/fma_peak.cpp measures that bound). Measuring helpers:
benchmarks/_measure.py; the full comparison (torch.compile, distances, plots): benchmarks/compare.py.

    python benchmarks/flow_cpu_quick.py [--points 200000] [--width 64] [--layers 10] [--dim 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # an installed fastlddmm wins over the sources

from benchmarks import _measure  # noqa: E402


def _worker(args) -> None:
    import torch

    from fastlddmm.ops.flow import euler_flow

    torch.manual_seed(0)
    L, H, D, N = args.layers, args.width, args.dim, args.points
    x = torch.randn(N, D)
    params = [torch.empty(L, H, D).uniform_(-D**-0.5, D**-0.5), torch.empty(L, H).uniform_(-D**-0.5, D**-0.5),
              torch.randn(L, D, H) / H**0.5, torch.randn(L, D) * 0.1]
    params = [p.requires_grad_(True) for p in params]
    dt = 1.0 / L

    def fwd():
        with torch.no_grad():
            return euler_flow(x, *params, dt, "relu", backend=args.backend)

    def fwd_bwd():
        out, energy = euler_flow(x, *params, dt, "relu", backend=args.backend)
        return torch.autograd.grad(out.square().mean() + energy, params)

    forward = _measure.measure(fwd, repeat=args.repeat)
    both = _measure.measure(fwd_bwd, repeat=args.repeat)
    row = {"backend": args.backend, "forward_s": forward["time_s"], "forward_backward_s": both["time_s"],
           "peak_extra_mib": both["peak_extra_mib"], "threads": torch.get_num_threads()}
    if args.backend == "cpu":
        from fastlddmm.benchmark import median_seconds
        from fastlddmm.ops.flow import cpu as launcher

        w = [p.detach() for p in params]
        grad_out, grad_s = torch.randn_like(x), torch.tensor(0.3, dtype=torch.float64)
        threads = torch.get_num_threads()
        for count in sorted({1, threads}):
            torch.set_num_threads(count)
            row[f"launcher_forward_s_{count}t"] = median_seconds(
                lambda: launcher.forward(x, *w, dt, "relu"), repeat=max(args.repeat, 5))
            row[f"launcher_backward_s_{count}t"] = median_seconds(
                lambda: launcher.backward(grad_out, grad_s, x[None], *w, dt, "relu"), repeat=max(args.repeat, 5))
        torch.set_num_threads(threads)
    print(json.dumps(row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--dim", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backend", default=None, help=argparse.SUPPRESS)  # set in the worker subprocess
    args = parser.parse_args()
    if args.backend is not None:
        return _worker(args)

    print(f"N={args.points} D={args.dim} width={args.width} layers={args.layers} float32, relu, "
          f"{os.cpu_count()} CPU cores; median of {args.repeat}")
    rows = []
    for backend in ("reference", "cpu"):
        row = _measure.run_isolated([__file__, "--backend", backend] + [
            f"--{k}={getattr(args, k)}" for k in ("points", "width", "layers", "dim", "repeat")])
        if "error" in row:
            raise SystemExit(f"backend {backend}: {row['error']}")
        rows.append(row)
    print(f"{'backend':<10} {'forward':>10} {'fwd+bwd':>10} {'peak extra RSS':>15}")
    for r in rows:
        print(f"{r['backend']:<10} {r['forward_s']:>9.3f}s {r['forward_backward_s']:>9.3f}s "
              f"{r['peak_extra_mib']:>12.1f} MiB")
    ref, cpu = rows
    for key in sorted(k for k in cpu if k.startswith("launcher_")):
        print(f"cpu {key[len('launcher_'):]:<22} {cpu[key] * 1e3:9.2f} ms")
    print(f"speed-up fwd+bwd: {ref['forward_backward_s'] / cpu['forward_backward_s']:.2f}x, "
          f"memory: {ref['peak_extra_mib'] / max(cpu['peak_extra_mib'], 1e-9):.1f}x less")


if __name__ == "__main__":
    main()
