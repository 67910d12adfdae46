"""Measuring helpers shared by the comparison scripts (compare.py, flow_cpu_quick.py, compare_distances.py).

Time: the median of ``repeat`` calls after one warm-up call (KeOps / torch.compile compile there);
``median_seconds`` (no memory figure) is fastlddmm.benchmark's, the one ``fastlddmm bench`` uses.
Peak memory, CPU: the extra resident memory (RSS) of the calls above what the process held before them,
from the kernel's high-water mark VmHWM, which ``reset_peak_rss`` resets (Linux >= 4.0,
/proc/self/clear_refs), so the warm-up's compilation memory is not counted. Each (method, size) runs in
its own fresh subprocess (``run_isolated``) so that high-water marks and allocator caches of one method
never leak into another's figure. Peak memory, GPU: torch.cuda.max_memory_allocated above the memory
allocated before the calls.

No function here starts with time_/peakmem_/track_/mem_: asv imports every module of benchmarks/ and
would take such names for benchmarks.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

MIB = 2**20

# glibc serves big blocks from the heap once its adaptive mmap threshold has grown past them, and keeps
# freed heap memory resident: the repeats after a warm-up would then reuse it and show ~0 extra memory.
# A fixed threshold (set in each worker's environment, read by glibc at start-up) keeps every block
# above 128 KiB an mmap that is returned to the system when freed.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def rss_bytes() -> int:
    """Resident memory of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """High-water mark of the resident memory (since start or the last reset_peak_rss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it (peak then includes
    everything since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def measure(fn: Callable[[], object], *, repeat: int = 3, device: str = "cpu", slow_s: float = float("inf"),
            warmup: Callable[[], object] | None = None) -> dict:
    """One warm-up call (``warmup``, default ``fn``: compilation), then up to ``repeat`` timed calls of
    ``fn``: median seconds and the peak extra memory (MiB) of the timed calls.

    A ``warmup`` on smaller inputs of the same method saves a full-size call where what warms up does
    not depend on the size (KeOps formulas, thread pools; not torch.compile with static shapes).

    The timed calls stop early once one has taken more than ``slow_s`` seconds (``calls`` says how many
    ran): at sizes where one call costs minutes, repeats would not fit a run's budget.
    """
    (warmup or fn)()  # KeOps / torch.compile compilation, thread-pool start-up
    _sync(device)
    gc.collect()
    base, peak_reset = _memory_mark(device)
    times = []
    while len(times) < repeat:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if times[-1] > slow_s:
            break
    result = {"time_s": statistics.median(times), "times_s": times, "calls": len(times),
              "peak_extra_mib": _peak_extra(device, base), "peak_reset": peak_reset}
    if len(times) < repeat:
        result["note"] = f"{len(times)} timed call(s): one took over {slow_s:g} s"
    return result


def _memory_mark(device: str) -> tuple[int, bool]:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), True
    ok = reset_peak_rss()
    return rss_bytes(), ok


def _peak_extra(device: str, base: int) -> float:
    if device == "cuda":
        import torch

        return (torch.cuda.max_memory_allocated() - base) / MIB
    return max(0, peak_rss_bytes() - base) / MIB


def run_isolated(argv: list[str], timeout: float | None = None) -> dict:
    """Run ``python argv...`` in a fresh process (allocator settings of WORKER_ENV) and return the JSON
    object its last stdout line holds; {"error": ...} when it fails or runs out of time."""
    env = dict(os.environ, **WORKER_ENV)
    try:
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[-300:]}"}
    return json.loads(lines[-1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: str = "cpu") -> dict:
    """Who measured: CPU model, cores, memory, load, package versions, date (UTC)."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("fastlddmm", "torch", "pykeops", "geomloss", "scipy", "numpy", "triton")},
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
