"""Side-by-side timings of the distances: Chamfer (dense reference, chunked dense, KeOps, scipy cKDTree)
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
import importlib
import os
import sys

import torch

sys.path.append(os.path.join(os.path.dirname(__file__), ".."))  # an installed fastlddmm wins over the sources

import fastlddmm.distances as D  # noqa: E402
from fastlddmm.benchmark import median_seconds  # noqa: E402
from fastlddmm import _backend  # noqa: E402


def clouds(n: int, m: int, dim: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    y = torch.randn(m, dim, generator=g, dtype=dtype) * 0.8 + 0.3
    return x, y


def chamfer_methods():
    """name -> f(x, y) -> value (forward + backward)."""

    def with_finder(find):
        def run(x, y):
            x = x.clone().requires_grad_()
            v = D._chamfer_items(x[None], y[None], None, None, find)[0]
            v.backward()
            return v

        return run

    methods = {"dense reference": lambda x, y: _backward(D.chamfer(x.clone().requires_grad_(), y, backend="reference"))}
    methods["chunked dense"] = with_finder(D._index_chunked)
    if _backend.status("keops").available:
        methods["keops"] = with_finder(D._index_keops)
    if importlib.util.find_spec("scipy") is not None:
        methods["scipy cKDTree"] = with_finder(D._index_kdtree)
    methods["auto"] = lambda x, y: _backward(D.chamfer(x.clone().requires_grad_(), y, backend="auto"))
    return methods


def sinkhorn_methods(blur: float):
    methods = {
        "reference": lambda x, y: _backward(D.sinkhorn(x.clone().requires_grad_(), y, blur=blur, backend="reference"))
    }
    if _backend.status("keops").available:
        methods["keops"] = lambda x, y: _backward(D.sinkhorn(x.clone().requires_grad_(), y, blur=blur, backend="keops"))
    if importlib.util.find_spec("geomloss") is not None:
        from geomloss import SamplesLoss

        for be in ("tensorized", "online"):
            loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=0.5, backend=be)
            methods[f"geomloss {be}"] = lambda x, y, loss=loss: _backward(loss(x.clone().requires_grad_(), y))
    methods["auto"] = lambda x, y: _backward(D.sinkhorn(x.clone().requires_grad_(), y, blur=blur, backend="auto"))
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
            dense = name in ("reference", "geomloss tensorized") or (name == "auto" and n * n <= D._SINKHORN_DENSE_MAX_PAIRS)
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
