"""CI smoke of the asv suite: every benchmark runs once at its smallest parameters (no timings)."""

import importlib
import inspect
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["benchmarks.bench_flow", "benchmarks.bench_distances", "benchmarks.bench_registration"]


def benchmark_cases():
    sys.path.insert(0, str(ROOT))
    for name in MODULES:
        module = importlib.import_module(name)
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            smallest = [values[0] for values in cls.params]  # asv params: one list per parameter
            for backend in cls.params[-1]:
                args = smallest[:-1] + [backend]
                yield pytest.param(cls, args, id=f"{cls_name}-{'-'.join(map(str, args))}")


@pytest.mark.parametrize("cls,args", list(benchmark_cases()))
def test_benchmark_runs_once(cls, args):
    bench = cls()
    try:
        bench.setup(*args)
    except NotImplementedError as why:  # asv's way to skip: the same reasons apply here
        pytest.skip(f"asv would skip it here too: {why}")
    methods = [m for m in dir(bench) if m.split("_")[0] in ("time", "peakmem", "track")]
    assert methods, f"{cls.__name__} defines no benchmark"
    for method in methods:
        getattr(bench, method)(*args)
