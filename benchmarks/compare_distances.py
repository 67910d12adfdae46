"""Side-by-side timings of the distances: Chamfer (every nearest-neighbour backend usable here)
and Sinkhorn (reference, KeOps, GeomLoss tensorized / online), forward + backward, on this machine.

    python benchmarks/compare_distances.py                      # default sizes
    python benchmarks/compare_distances.py --chamfer 1e4 1e5 --sinkhorn 1e3 1e4 --dtype float32

KeOps formulas are compiled once before timing (a warm-up call), so the figures are steady-state.
Each figure is the median of --repeat runs after a warm-up (benchmarks/_measure.py; benchmarks/compare.py
adds peak memory, plots and the other ops). A method is skipped (shown as "-") when its package is
missing or when the dense (N, M) matrices would not fit in --max-dense-gib.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # an installed fastlddmm wins over the sources

import fastlddmm as fl  # noqa: E402
from fastlddmm import dispatch  # noqa: E402
from fastlddmm.benchmark import median_seconds  # noqa: E402


def clouds(n: int, m: int, dim: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    y = torch.randn(m, dim, generator=g, dtype=dtype) * 0.8 + 0.3
    return x, y


def chamfer_methods():
    """name -> f(x, y) -> value (forward + backward): fl.chamfer with each nearest-neighbour backend usable here
    (fastlddmm.dispatch), and "auto"."""
    pr = dispatch.Problem(device="cpu", dtype=torch.float32, dim=3)
    names = {"reference": "dense reference (chunked)", "kdtree": "scipy cKDTree"}
    methods = {names.get(b, b): (lambda x, y, b=b: _backward(fl.chamfer(x.clone().requires_grad_(), y, backend=b)))
               for b in dispatch.usable_backends("nearest", pr) if b != "triton"}
    methods["auto"] = lambda x, y: _backward(fl.chamfer(x.clone().requires_grad_(), y, backend="auto"))
    return methods


def sinkhorn_methods(blur: float):
    methods = {
        "reference": lambda x, y: _backward(fl.sinkhorn(x.clone().requires_grad_(), y, blur=blur, backend="reference"))
    }
    if dispatch.status("keops").available:
        methods["keops"] = lambda x, y: _backward(fl.sinkhorn(x.clone().requires_grad_(), y, blur=blur, backend="keops"))
    if importlib.util.find_spec("geomloss") is not None:
        from geomloss import SamplesLoss

        for be in ("tensorized", "online"):
            loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=0.5, backend=be)
            methods[f"geomloss {be}"] = lambda x, y, loss=loss: _backward(loss(x.clone().requires_grad_(), y))
    methods["auto"] = lambda x, y: _backward(fl.sinkhorn(x.clone().requires_grad_(), y, blur=blur, backend="auto"))
    return methods


def _backward(v):
    v.backward()
    return v


def dense_gib(n: int, m: int, dim: int, itemsize: int, matrices: int) -> float:
    return matrices * n * m * dim * itemsize / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chamfer", nargs="*", type=float, default=[1e3, 1e4, 1e5], help="cloud sizes N = M")
    ap.add_argument("--sinkhorn", nargs="*", type=float, default=[1e3, 1e4], help="cloud sizes N = M")
    ap.add_argument("--dim", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--blur", type=float, default=0.05)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-dense-gib", type=float, default=8.0)
    ap.add_argument("--skip", nargs="*", default=[], help="methods not to run, e.g. 'chunked dense' 'geomloss online'")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, D = {args.dim}")

    rows = []
    for n in map(int, args.chamfer):
        x, y = clouds(n, n, args.dim, dtype)
        for name, fn in chamfer_methods().items():
            if name in args.skip:
                continue
            # the reference materialises (N, M, D) differences (plus the autograd copy)
            if name == "dense reference" and dense_gib(n, n, args.dim, itemsize, 3) > args.max_dense_gib:
                rows.append(("chamfer", n, name, None))
                continue
            rows.append(("chamfer", n, name, median_seconds(lambda: fn(x, y), args.repeat)))
            print(f"  chamfer  N={n:>8}  {name:<18} {rows[-1][3]:.4f} s", flush=True)
    for n in map(int, args.sinkhorn):
        x, y = clouds(n, n, args.dim, dtype)
        for name, fn in sinkhorn_methods(args.blur).items():
            if name in args.skip:
                continue
            dense = name in ("reference", "geomloss tensorized") or (name == "auto" and n * n <= dispatch.SOFTMIN_DENSE_MAX_ENTRIES)
            if dense and dense_gib(n, n, 1, itemsize, 8) > args.max_dense_gib:
                rows.append(("sinkhorn", n, name, None))
                continue
            rows.append(("sinkhorn", n, name, median_seconds(lambda: fn(x, y), args.repeat)))
            print(f"  sinkhorn N={n:>8}  {name:<18} {rows[-1][3]:.4f} s", flush=True)

    print("\n| op | N = M | method | forward + backward (s) |\n|---|---:|---|---:|")
    for op, n, name, t in rows:
        print(f"| {op} | {n} | {name} | {'-' if t is None else f'{t:.4f}'} |")


if __name__ == "__main__":
    main()
