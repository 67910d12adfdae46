"""Quick timings of every usable backend against the reference, in one run: ``fastlddmm bench``.

The full side-by-side comparisons (eager and torch.compile, GeomLoss, scipy, pykeops, other sizes, peak
memory, fresh processes) are the scripts of benchmarks/ (and its asv suite); they time with
``median_seconds`` from here too.
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from typing import Callable, TextIO

import torch

from . import dispatch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], repeat: int = 3, device: str = "cpu", warmup: int = 1) -> float:
    """Median wall time of ``repeat`` calls of fn after ``warmup`` untimed ones (KeOps / torch.compile
    compile there), the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cases(quick: bool, device: str):
    """(op name, size label, make inputs, call(backend, inputs)) for each benchmark."""
    import fastlddmm as fl

    gen = torch.Generator().manual_seed(0)

    def flow_inputs(n, width=64, layers=10, dim=3):
        x = torch.randn(n, dim, generator=gen)
        params = [torch.randn(layers, width, dim, generator=gen) / math.sqrt(dim),
                  torch.randn(layers, width, generator=gen) * 0.1,
                  torch.randn(layers, dim, width, generator=gen) / math.sqrt(width),
                  torch.randn(layers, dim, generator=gen) * 0.1]
        return [t.to(device) for t in (x, *params)], 1.0 / layers

    def flow_call(backend, inputs):
        (x, *params), dt = inputs
        x = x.detach().requires_grad_(True)
        params = [p.detach().requires_grad_(True) for p in params]
        out, energy = fl.ops.euler_flow(x, *params, dt, "relu", backend=backend)
        (out.square().sum() + energy).backward()

    def pair(n):
        x = torch.randn(n, 3, generator=gen)
        return x.to(device), (torch.randn(n + 7, 3, generator=gen) + 0.5).to(device)

    def dist_call(fn):
        def call(backend, inputs):
            x, y = inputs
            fn(x.detach().requires_grad_(True), y, backend=backend).backward()
        return call

    cases = []
    for n in ((1000, 5000) if quick else (2000, 20000)):
        cases.append(("euler_flow", "euler_flow fwd+bwd", f"N={n} H=64 L=10", lambda n=n: flow_inputs(n), flow_call))
    for n in ((500, 2000) if quick else (1000, 4000)):
        cases.append(("nearest", "chamfer fwd+bwd", f"N={n} M={n + 7}", lambda n=n: pair(n), dist_call(fl.chamfer)))
    for n in ((300, 1000) if quick else (500, 2000)):
        cases.append(("softmin", "sinkhorn fwd+bwd", f"N={n} M={n + 7}", lambda n=n: pair(n), dist_call(fl.sinkhorn)))
    return cases


def run(*, repeats: int = 5, warmup: int = 2, quick: bool = False, out: TextIO | None = None) -> list[dict]:
    """Times each case for the reference and every other backend that can run it here; prints a table to
    ``out`` (if given) and returns the rows."""
    import fastlddmm as fl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    write = (lambda s: (out.write(s + "\n"), out.flush())) if out is not None else (lambda s: None)
    write(f"fastlddmm {fl.__version__} bench: torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
          f"median of {repeats} runs after {warmup} warm-up run(s), float32")
    if device == "cpu" and dispatch.status("triton").available:
        write("  not timed: triton: runs in the CPU interpreter here (TRITON_INTERPRET=1): correct but not fast")
    header = f"{'op':<20} {'size':<18} {'backend':<10} {'median ms':>10} {'reference ms':>13} {'speed-up':>9}"
    write(header)
    write("-" * len(header))
    rows = []
    with warnings.catch_warnings():  # keep the table readable (e.g. KeOps' compile notices)
        warnings.simplefilter("ignore")
        for op, label, size, make, call in _cases(quick, device):
            inputs = make()
            try:
                ref = median_seconds(lambda: call("reference", inputs), repeats, device, warmup)
            except (RuntimeError, MemoryError) as err:  # e.g. the dense reference running out of memory
                write(f"{label:<20} {size:<18} {'reference':<10} failed: {str(err).splitlines()[0]}")
                continue
            write(f"{label:<20} {size:<18} {'reference':<10} {ref * 1e3:>10.2f} {ref * 1e3:>13.2f} {'1.00x':>9}")
            rows.append({"op": label, "size": size, "backend": "reference", "seconds": ref, "reference_seconds": ref})
            probe = dispatch.Problem(device=device, dtype=torch.float32, dim=3)
            for backend in dispatch.usable_backends(op, probe):
                if backend == "reference" or (backend == "triton" and device == "cpu"):
                    continue
                t = median_seconds(lambda: call(backend, inputs), repeats, device, warmup)
                write(f"{label:<20} {size:<18} {backend:<10} {t * 1e3:>10.2f} {ref * 1e3:>13.2f} {ref / t:>8.2f}x")
                rows.append({"op": label, "size": size, "backend": backend, "seconds": t, "reference_seconds": ref})
    write("Full side-by-side comparison (eager and torch.compile, GeomLoss, scipy cKDTree, pykeops; other sizes; "
          "GPU): `python benchmarks/compare.py [--quick]` in a source checkout (asv suite: benchmarks/bench_*.py).")
    return rows
