"""Issue 13's GPU benchmark of the distances: fastlddmm Triton / KeOps against GeomLoss and flash-sinkhorn.

    python benchmarks/gpu_distances.py                              # CUDA, N = M = 1e4, 1e5, 1e6
    python benchmarks/gpu_distances.py --sizes 1e4 1e5 --budget 400
    python benchmarks/gpu_distances.py --device cpu --sizes 200     # smoke run, no GPU needed
    bash benchmarks/run_gpu.sh .whl bench                           # on a lent GPU machine (README)

What is timed: value + gradient with respect to x (one forward and one backward call, as in a registration
step), float32, D = 3, N = M points, x ~ N(0, I), y ~ 0.8 N(0, I) + 0.3 (benchmarks/_common.clouds).

Sinkhorn, all the same problem: GeomLoss ``SamplesLoss("sinkhorn", p=2, blur, scaling, debias=True)``,
i.e. the debiased divergence S(a, b) = OT(a, b) - OT(a, a)/2 - OT(b, b)/2 with cost |x - y|²/2,
temperature eps = blur², ε-scaling from diameter² down to blur² by a factor scaling² per step (diameter:
the diagonal of the bounding box of both clouds), uniform weights, a last extrapolation step and gradients
through the converged potentials.
  fl-triton, fl-keops, fl-reference   fl.sinkhorn(x, y, blur=, scaling=, backend=...) (reference: dense,
                                      only while its (N, M) matrices fit in --max-dense-gib)
  geomloss-online, -multiscale        geomloss.SamplesLoss("sinkhorn", p=2, blur=, scaling=, backend=...);
                                      multiscale is GeomLoss's clustered, kernel-truncated approximation
  flash-sinkhorn, -tf32               flash_sinkhorn.SamplesLoss, mapped onto the same problem as follows.

flash-sinkhorn 0.4.1 (read from its wheel's source, flash_sinkhorn/samples_loss.py and kernels/_common.py):
  * call: ``flash_sinkhorn.SamplesLoss(loss="sinkhorn", p=2, blur=blur, scaling=scaling, debias=True,
    half_cost=True, backend="symmetric")(x, y)`` returns a 0-d tensor, differentiable in x and y (analytic
    gradient from the potentials, no backprop through the iterations, GeomLoss's last_extrapolation
    convention). CUDA tensors only (it raises ValueError on CPU tensors); only p = 2.
  * debias: its default is False (GeomLoss's is True), so debias=True is passed. Debiased, it solves
    OT(x, y), OT(x, x) and OT(y, y) separately, all on the ε schedule of OT(x, y), and returns
    OT(x, y) - OT(x, x)/2 - OT(y, y)/2, the same divergence as GeomLoss.
  * cost: its default is the full |x - y|² (cost_scale 1); half_cost=True gives |x - y|²/2, GeomLoss's
    p = 2 cost. The ε schedule does not depend on cost_scale: epsilon_schedule(diameter, blur, scaling, p=2)
    goes from diameter² to blur² by scaling² per step, exactly GeomLoss's, with the same bounding-box
    diameter. So with half_cost=True, eps = blur² as in GeomLoss; without it the value would be
    2 × GeomLoss's at blur / √2.
  * backend="symmetric" (its default) is GeomLoss's symmetric (averaged) update with ε-scaling;
    "alternating" needs a fixed eps and "multiscale" has no gradients, so neither is timed here.
  * precision: by default (allow_tf32=True) the cost dot products use TF32 and the centred coordinates are
    rounded to TF32 (10-bit mantissa) first, which costs about 1e-3 of relative accuracy. "flash-sinkhorn"
    therefore passes allow_tf32=False (fp32 throughout, the same arithmetic as the other methods);
    "flash-sinkhorn-tf32" keeps the library's defaults, to show its speed at its own accuracy.
  * it centres both clouds on their joint centroid first (translation invariance: same value), and with
    autotune=True (default) Triton autotunes on the first call per shape, hence a full-size warm-up.

Chamfer: fl.chamfer(x, y, backend="triton" | "keops" | "auto" | "reference"), value + gradient; its
reference value is the dense reference where it fits, else KeOps (exact searches: equal up to ties).

Each measurement (benchmarks/_measure.measure): one warm-up call (full size for Triton-based methods, whose
kernels may specialise or autotune per shape; 2,000 points for KeOps-based ones, whose formulas compile
once for all sizes), then the median of --repeat calls, each followed by torch.cuda.synchronize; no
further repeats after a call slower than --slow s. Peak memory: torch.cuda.max_memory_allocated after
reset_peak_memory_stats, above the memory allocated before the calls (the inputs), so buffers that KeOps
allocates outside PyTorch's allocator are not counted; on the CPU, the growth of the process's resident
memory (VmHWM). Errors: |value - ref| / |ref| and ‖grad - grad_ref‖ / ‖grad_ref‖ against GeomLoss online
(Sinkhorn) at the same size, from the last timed call.

Limits: a method whose call took (or, scaled as N², would take) more than --time-limit s is skipped at
the larger sizes; no case starts whose projected cost exceeds what is left of --budget s. Results are
written after every case, so a run stopped at its limit still leaves its tables.

Writes gpu_distances_<device>.md and .json (device, versions, date, command line) to --output-dir, and
prints which backend fl.sinkhorn / fl.chamfer backend="auto" picks at each size next to the fastest one
measured (fastlddmm.dispatch.choose), so that the auto rule can be checked.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # appended: an installed fastlddmm wins over this checkout's sources
    sys.path.append(str(ROOT))

import fastlddmm as fl  # noqa: E402
from benchmarks import _measure  # noqa: E402
from benchmarks._common import clouds  # noqa: E402
from fastlddmm import dispatch  # noqa: E402

DIM = 3
DTYPE = torch.float32
WARMUP_POINTS = 2_000  # KeOps-based methods warm up (compile) on this many points
SINKHORN_REF = "geomloss-online"

# id -> (op, label, family). family decides how it warms up and what it needs to run. The order is the
# order of the runs at each size, most wanted first (a run that hits --budget loses the last ones): the
# Sinkhorn reference, then what issue 13's targets compare, then the rest.
METHODS: dict[str, tuple[str, str, str]] = {
    "geomloss-online": ("sinkhorn", "GeomLoss online (KeOps)", "keops"),
    "fl-triton": ("sinkhorn", "fastlddmm triton", "triton"),
    "flash-sinkhorn": ("sinkhorn", "flash-sinkhorn (fp32)", "flash"),
    "flash-sinkhorn-tf32": ("sinkhorn", "flash-sinkhorn (TF32, its default)", "flash"),
    "chamfer-triton": ("chamfer", "fastlddmm triton", "triton"),
    "chamfer-keops": ("chamfer", "fastlddmm keops", "keops"),
    "chamfer-auto": ("chamfer", "fastlddmm auto", "auto"),
    "chamfer-reference": ("chamfer", "fastlddmm reference (dense)", "dense"),
    "geomloss-multiscale": ("sinkhorn", "GeomLoss multiscale (KeOps)", "keops"),
    "fl-keops": ("sinkhorn", "fastlddmm keops", "keops"),
    "fl-reference": ("sinkhorn", "fastlddmm reference (dense)", "dense"),
}
SMALL_WARMUP = ("keops", "dense")  # families whose warm-up runs on WARMUP_POINTS, not at full size
# Dense (N, M) float32 matrices each reference holds at once (cost matrices and logsumexp temporaries
# for Sinkhorn; differences and squared distances for Chamfer): a generous estimate.
DENSE_MATRICES = {"sinkhorn": 8, "chamfer": 6}


# ------------------------------------------------------------------------------------------------
# What can run here
# ------------------------------------------------------------------------------------------------


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _probe_keops_cuda(timeout: float = 300.0) -> str | None:
    """None when a tiny KeOps reduction runs on the GPU, else why not. In a subprocess: a failing nvrtc
    compilation can abort the whole process, which must not take the benchmark with it."""
    code = ("import torch; from pykeops.torch import LazyTensor; x = torch.randn(50, 3, device='cuda'); "
            "d = (LazyTensor(x[:, None, :]) - LazyTensor(x[None, :, :])).sqnorm2().sum(1); "
            "torch.cuda.synchronize(); print('ok', float(d.sum()))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"KeOps probe took over {timeout:.0f} s"
    if proc.returncode == 0 and "ok" in proc.stdout:
        return None
    tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
    return f"KeOps failed its probe on this GPU (exit {proc.returncode}): {tail[-300:]}"


def unavailable(method: str, device: str, keops_problem: str | None) -> tuple[str, str] | None:
    """(status, reason) when ``method`` cannot run here, else None."""
    family = METHODS[method][2]
    dev = torch.device(device)
    if method.startswith("geomloss") and not _installed("geomloss"):
        return "not installed", "geomloss is not installed (pip install geomloss)"
    if method.startswith("flash-sinkhorn"):
        if not _installed("flash_sinkhorn"):
            return "not installed", "flash-sinkhorn is not installed (pip install flash-sinkhorn)"
        if device != "cuda":
            return "skipped", "flash-sinkhorn runs on CUDA tensors only"
    if family == "keops":
        st = dispatch.status("keops")
        if not st.available:
            return "not installed", st.reason
        if keops_problem:
            return "skipped", keops_problem
    if family == "triton":
        why = dispatch.why_not("softmin", "triton", dispatch.Problem(device=torch.device(dev).type, dtype=DTYPE, dim=3))
        if why is not None:
            return "skipped", why
    return None


def dense_gib(op: str, n: int) -> float:
    return DENSE_MATRICES[op] * n * n * torch.finfo(DTYPE).bits / 8 / 2**30


# ------------------------------------------------------------------------------------------------
# The calls: value + gradient with respect to x
# ------------------------------------------------------------------------------------------------


def loss_function(method: str, blur: float, scaling: float) -> Callable:
    """f(x, y) -> scalar loss, differentiable in x."""
    kw = {"blur": blur, "scaling": scaling}
    if method.startswith("fl-"):
        backend = method[3:]
        return lambda x, y: fl.sinkhorn(x, y, p=2, backend=backend, **kw)
    if method.startswith("geomloss-"):
        from geomloss import SamplesLoss

        return SamplesLoss("sinkhorn", p=2, debias=True, backend=method.split("-", 1)[1], **kw)
    if method.startswith("flash-sinkhorn"):
        import flash_sinkhorn

        tf32 = method.endswith("tf32")
        # See the module docstring: half_cost for GeomLoss's |x - y|²/2, debias=True (not its default).
        return flash_sinkhorn.SamplesLoss("sinkhorn", p=2, debias=True, half_cost=True, backend="symmetric",
                                          allow_tf32=tf32, **kw)
    if method.startswith("chamfer-"):
        backend = method.split("-", 1)[1]
        return lambda x, y: fl.chamfer(x, y, backend=backend)
    raise ValueError(f"unknown method {method!r}")


def make_call(method: str, x, y, blur: float, scaling: float, keep: list) -> Callable[[], None]:
    loss_fn = loss_function(method, blur, scaling)

    def call():
        xg = x.detach().clone().requires_grad_()
        value = loss_fn(xg, y)
        (grad,) = torch.autograd.grad(value, xg)
        keep[:] = [value.detach(), grad]

    return call


def auto_picks(x, y) -> dict[str, str]:
    """The backend fl.sinkhorn / fl.chamfer backend="auto" would use for these clouds (fastlddmm.dispatch)."""
    pr = dispatch.problem(x, y)
    return {"sinkhorn": dispatch.choose("softmin", "auto", pr), "chamfer": dispatch.choose("nearest", "auto", pr)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def _device_slug(device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or device


def _nvidia_smi() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment(device: str, argv: list[str]) -> dict:
    info = _measure.machine_info(device)
    for package in ("keopscore", "flash-sinkhorn"):
        info["versions"][package] = _measure._version(package)
    info["versions"]["torch"] = torch.__version__
    if device == "cuda":
        info["nvidia_smi"] = _nvidia_smi()
    info["command"] = " ".join(shlex.quote(a) for a in [sys.executable, "benchmarks/gpu_distances.py", *argv])
    info["triton_interpret"] = dispatch.triton_interpret()
    return info


def run(args, argv: list[str]) -> dict:
    device = args.device
    t_start = time.perf_counter()
    keops_problem = None
    if device == "cuda" and dispatch.status("keops").available and any(METHODS[m][2] == "keops" for m in args.methods):
        print("probing KeOps on the GPU (compiles a small formula) ...", flush=True)
        keops_problem = _probe_keops_cuda()
        print(f"  {keops_problem or 'KeOps works'}", flush=True)
    report = {
        "benchmark": "gpu_distances",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "device_type": device,
        "environment": environment(device, argv),
        "settings": {"sizes": args.sizes, "dim": DIM, "dtype": str(DTYPE).replace("torch.", ""), "blur": args.blur,
                     "scaling": args.scaling, "p": 2, "debias": True, "repeat": args.repeat, "slow_s": args.slow,
                     "time_limit_s": args.time_limit, "budget_s": args.budget, "max_dense_gib": args.max_dense_gib,
                     "seed": args.seed, "methods": args.methods, "sinkhorn_reference": SINKHORN_REF, "tag": args.tag},
        "keops_probe": keops_problem or ("ok" if device == "cuda" else "not run on the CPU"),
        "auto": [],
        "cases": [],
    }
    last_ok: dict[str, tuple[int, float]] = {}  # method -> (size, seconds per call) of its last measurement
    stopped: dict[str, str] = {}  # method -> why it runs at no larger size
    for n in args.sizes:
        x, y = clouds(n, n, DIM, device=device, dtype=DTYPE, seed=args.seed)
        picks = auto_picks(x, y)
        report["auto"].append({"size": n, **picks})
        print(f"N = M = {n:,}: auto picks sinkhorn -> {picks['sinkhorn']}, chamfer -> {picks['chamfer']}", flush=True)
        outputs: dict[str, list] = {}  # method -> [value, grad] of its last timed call at this size
        for method in args.methods:
            op, label, _ = METHODS[method]
            case = {"op": op, "method": method, "label": label, "size": n}
            report["cases"].append(case)
            left = None if args.budget is None else args.budget - (time.perf_counter() - t_start)
            why = unavailable(method, device, keops_problem) or skip_reason(method, n, args, last_ok, stopped, left)
            if why:
                case["status"], case["reason"] = why
            else:
                _measure_case(case, method, x, y, args, outputs)
                if case["status"] == "ok":
                    last_ok[method] = (n, case["time_s"])
                    if case["time_s"] > args.time_limit:
                        stopped[method] = (f"took {case['time_s']:.0f} s per call at {n:,} points > --time-limit "
                                           f"{args.time_limit:g} s")
                else:
                    stopped[method] = f"failed at {n:,} points"
            report["wall_s"] = round(time.perf_counter() - t_start, 1)
            write(report, args.output_dir)
        add_errors([c for c in report["cases"] if c["size"] == n], outputs)
        for case in report["cases"]:
            if case["size"] == n:
                _print_case(case)
        write(report, args.output_dir)
        del x, y, outputs
        if device == "cuda":
            torch.cuda.empty_cache()
    report["targets"] = targets(report)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    return report


def skip_reason(method: str, n: int, args, last_ok: dict, stopped: dict, left: float | None) -> tuple[str, str] | None:
    """("skipped", why) when limits keep ``method`` from running at ``n`` points, else None.

    last_ok: method -> (size, seconds per call) of its last measurement; stopped: method -> why it runs at no
    larger size; left: seconds left of --budget (None: no budget).
    """
    op, _, family = METHODS[method]
    if method in stopped:
        return "skipped", stopped[method]
    if family == "dense" and dense_gib(op, n) > args.max_dense_gib:
        return "skipped", f"dense (N, M) matrices ~{dense_gib(op, n):.2g} GiB > --max-dense-gib {args.max_dense_gib:g}"
    if left is not None and left <= 0:
        return "skipped", "run budget spent (--budget)"
    if method not in last_ok:
        return None
    n0, t0 = last_ok[method]
    projected = t0 * (n / n0) ** 2  # every method here does O(N·M) work per call
    if projected > args.time_limit:
        return "skipped", f"projected {projected:.0f} s per call (N² from {n0:,}) > --time-limit {args.time_limit:g} s"
    if left is not None and projected_cost(family, projected, args) > left:
        return "skipped", (f"run budget: ~{projected_cost(family, projected, args):.0f} s projected (warm-up and timed "
                           f"calls), {left:.0f} s left of --budget")
    return None


def projected_cost(family: str, seconds_per_call: float, args) -> float:
    """Seconds one case would take: the full-size warm-up (unless small) and the timed calls."""
    timed = 1 if seconds_per_call > args.slow else args.repeat
    return seconds_per_call * (timed + (0 if family in SMALL_WARMUP else 1))


def _measure_case(case: dict, method: str, x, y, args, outputs: dict) -> None:
    op, _, family = METHODS[method]
    n = case["size"]
    keep: list = []
    print(f"  {op:8s} {method:22s} N={n:>9,} ...", flush=True)
    try:
        call = make_call(method, x, y, args.blur, args.scaling, keep)
        warmup = None
        if family in SMALL_WARMUP and n > WARMUP_POINTS:
            # KeOps compiles a formula once for every size: warm up small, keep the full-size minutes.
            xs, ys = clouds(WARMUP_POINTS, WARMUP_POINTS, DIM, device=args.device, dtype=DTYPE, seed=args.seed)
            warmup = make_call(method, xs, ys, args.blur, args.scaling, [])
        result = _measure.measure(call, repeat=args.repeat, device=args.device, slow_s=args.slow, warmup=warmup)
    except Exception as why:  # out of memory, a library's own error: recorded, the run goes on
        keep.clear()
        message = str(why).strip().splitlines()
        case["status"] = "error"
        case["reason"] = f"{type(why).__name__}: {message[0][:300] if message else ''}"
        if args.device == "cuda":
            torch.cuda.empty_cache()
        return
    value, grad = keep
    case.update(status="ok", time_s=result["time_s"], times_s=result["times_s"], calls=result["calls"],
                peak_mib=round(result["peak_extra_mib"], 2),
                bytes_per_point=round(result["peak_extra_mib"] * _measure.MIB / (2 * n), 1),
                value=float(value), finite=bool(torch.isfinite(value).item() and torch.isfinite(grad).all().item()))
    if "note" in result:
        case["note"] = result["note"]
    outputs[method] = [value, grad]


def add_errors(cases: list[dict], outputs: dict) -> None:
    """Relative value and gradient errors of the cases of one size against their op's reference:
    GeomLoss online for Sinkhorn; for Chamfer the dense reference where it ran, else KeOps."""
    refs = {"sinkhorn": SINKHORN_REF if SINKHORN_REF in outputs else None,
            "chamfer": next((m for m in ("chamfer-reference", "chamfer-keops") if m in outputs), None)}
    for case in cases:
        ref = refs[case["op"]]
        if case["status"] != "ok" or ref is None:
            continue
        (value, grad), (ref_value, ref_grad) = outputs[case["method"]], outputs[ref]
        case["reference"] = ref
        case["value_rel_err"] = _rel(value, ref_value)
        case["grad_rel_err"] = _rel(grad, ref_grad)


def _print_case(case: dict) -> None:
    head = f"  {case['op']:8s} {case['method']:22s} N={case['size']:>9,}"
    if case["status"] != "ok":
        print(f"{head}  {case['status']}: {case['reason']}", flush=True)
        return
    err = "" if "value_rel_err" not in case else f"  rel err {case['value_rel_err']:.1e} / grad {case['grad_rel_err']:.1e}"
    print(f"{head}  {case['time_s']:.4g} s  peak {case['peak_mib']:.1f} MiB{err}", flush=True)


# ------------------------------------------------------------------------------------------------
# Issue 13's targets, read off the measurements
# ------------------------------------------------------------------------------------------------


def _ok(report: dict, method: str, n: int) -> dict | None:
    for c in report["cases"]:
        if c["method"] == method and c["size"] == n and c["status"] == "ok":
            return c
    return None


def targets(report: dict) -> list[dict]:
    """One row per (target, size) with what was measured and whether the target is met (None: not measured)."""
    rows = []
    for n in report["settings"]["sizes"]:
        tri = _ok(report, "fl-triton", n)
        for flash in ("flash-sinkhorn", "flash-sinkhorn-tf32"):
            other = _ok(report, flash, n)
            ratio = tri["time_s"] / other["time_s"] if tri and other else None
            rows.append({"size": n, "target": f"sinkhorn: fl-triton time / {flash} time <= 1.0", "measured": ratio,
                         "met": None if ratio is None else ratio <= 1.0})
        err = tri.get("value_rel_err") if tri else None
        rows.append({"size": n, "target": "sinkhorn: fl-triton relative value error vs GeomLoss online <= 1e-4",
                     "measured": err, "met": None if err is None else err <= 1e-4})
        online = _ok(report, "geomloss-online", n)
        speedup = online["time_s"] / tri["time_s"] if tri and online else None
        rows.append({"size": n, "target": "sinkhorn: GeomLoss online time / fl-triton time >= 10", "measured": speedup,
                     "met": None if speedup is None else speedup >= 10})
        ct, ck = _ok(report, "chamfer-triton", n), _ok(report, "chamfer-keops", n)
        ratio = ct["time_s"] / ck["time_s"] if ct and ck else None
        rows.append({"size": n, "target": "chamfer: triton time / keops time < 1", "measured": ratio,
                     "met": None if ratio is None else ratio < 1})
    return rows


def auto_check(report: dict) -> list[dict]:
    """Per size: auto's pick next to the fastest fastlddmm backend measured (same op). ``agree`` is None
    where auto's pick was not among the backends timed (chunked dense, scipy cKDTree) or none was timed."""
    backends = {"sinkhorn": {"fl-triton": "triton", "fl-keops": "keops", "fl-reference": "reference"},
                "chamfer": {"chamfer-triton": "triton", "chamfer-keops": "keops", "chamfer-reference": "reference"}}
    rows = []
    for entry in report["auto"]:
        n = entry["size"]
        for op, names in backends.items():
            timed = {name: c["time_s"] for m, name in names.items() if (c := _ok(report, m, n))}
            fastest = min(timed, key=timed.get) if timed else None
            auto_case = _ok(report, "chamfer-auto", n) if op == "chamfer" else None
            rows.append({"size": n, "op": op, "auto": entry[op], "fastest_measured": fastest, "measured": sorted(timed),
                         "agree": fastest == entry[op] if fastest and entry[op] in timed else None,
                         "auto_over_fastest": auto_case["time_s"] / timed[fastest] if auto_case and fastest else None})
    return rows


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and (v == 0 or 1e-3 <= abs(v) < 1e4):
        return f"{v:.{digits}g}"
    return f"{v:.2e}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    missing = ", ".join(k for k, v in env["versions"].items() if not v)
    s = report["settings"]
    lines = [
        f"# fastlddmm distances on {report['device']}",
        "",
        f"Command: `{env['command']}`  ",
        f"Date (UTC): {env['date_utc']}, wall time so far: {report.get('wall_s', 0):.0f} s  ",
        f"Device: {report['device']}" + (f" ({env['nvidia_smi']})" if env.get("nvidia_smi") else "")
        + f", CUDA {env.get('cuda', '-')}; CPU {env['cpu_model']}, {env['cpu_cores']} cores  ",
        f"Versions: {versions}" + (f"; not installed: {missing}" if missing else "") + "  ",
        f"KeOps probe: {report['keops_probe']}" + ("; Triton runs in its CPU interpreter (TRITON_INTERPRET=1): "
                                                   "its timings mean nothing" if env.get("triton_interpret") else ""),
        "",
        f"Value + gradient in x, float32, D = {s['dim']}, N = M. Sinkhorn: p = 2, blur {s['blur']}, scaling "
        f"{s['scaling']}, debiased (GeomLoss's conventions; flash-sinkhorn mapped onto them, see the script's "
        f"docstring). Time: median of {s['repeat']} calls after a warm-up (fewer after a call over {s['slow_s']:g} s). "
        + ("Peak: torch.cuda.max_memory_allocated above the inputs (KeOps' own buffers not counted)"
           if report["device_type"] == "cuda" else "Peak: growth of the process's resident memory (VmHWM), rough")
        + "; bytes/point = peak / (N + M). Errors: relative, value and gradient, against the reference column "
        "(the reference's own row reads 0).",
        "",
    ]
    for op, title in (("sinkhorn", "Sinkhorn divergence"), ("chamfer", "Chamfer distance")):
        cases = [c for c in report["cases"] if c["op"] == op]
        if not cases:
            continue
        lines += [f"## {title}", "", "| N = M | method | time (s) | peak (MiB) | bytes/point | value | rel. error value | "
                  "rel. error grad | reference |", "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for c in cases:
            if c["status"] != "ok":
                reason = c["reason"].replace("|", "\\|")  # a table cell
                lines.append(f"| {c['size']:,} | {c['label']} | {c['status']}: {reason} | | | | | | |")
                continue
            t = _fmt(c["time_s"]) + (f" ({c['calls']}×)" if c["calls"] < s["repeat"] else "")
            lines.append(f"| {c['size']:,} | {c['label']} | {t} | {c['peak_mib']:.1f} | {c['bytes_per_point']:.0f} | "
                         f"{c['value']:.7g}{'' if c['finite'] else ' (non-finite!)'} | {_fmt(c.get('value_rel_err'), 2)} | "
                         f"{_fmt(c.get('grad_rel_err'), 2)} | {c.get('reference', '-')} |")
        lines.append("")
    lines += ["## backend=\"auto\" against the measurements", "",
              "`agree`: auto's pick is the fastest of the fastlddmm backends timed (`-`: its pick was not timed). "
              "`auto / fastest`: the time of fl.chamfer(backend=\"auto\") itself over the fastest backend's.", "",
              "| N = M | op | auto picks | fastest measured | agree | auto / fastest | fastlddmm backends timed |",
              "|---:|---|---|---|---|---:|---|"]
    for r in auto_check(report):
        agree = "-" if r["agree"] is None else ("yes" if r["agree"] else "**no**")
        lines.append(f"| {r['size']:,} | {r['op']} | {r['auto']} | {r['fastest_measured'] or '-'} | {agree} | "
                     f"{_fmt(r['auto_over_fastest'], 3)} | {', '.join(r['measured']) or '-'} |")
    lines += ["", "## Issue 13's targets", "", "| N = M | target | measured | met |", "|---:|---|---:|---|"]
    for r in report.get("targets") or targets(report):
        met = "not measured" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['size']:,} | {r['target']} | {_fmt(r['measured'], 3)} | {met} |")
    lines += ["", "Memory O(N + M): bytes/point of one method should stay about constant as N grows.", ""]
    return "\n".join(lines)


def write(report: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    tag = report["settings"].get("tag")
    stem = f"gpu_distances_{_device_slug(report['device_type'])}" + (f"_{tag}" if tag else "")
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    full = dict(report, targets=report.get("targets") or targets(report), auto_check=auto_check(report))
    js.write_text(json.dumps(full, indent=1) + "\n")
    md.write_text(markdown(full))
    return md, js


def _size(text: str) -> int:
    value = float(text)
    if value < 1 or value != math.floor(value):
        raise argparse.ArgumentTypeError(f"a size is a positive whole number of points (1e4, 20000), got {text!r}")
    return int(value)


def _tag(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", text):
        raise argparse.ArgumentTypeError(f"a tag is letters, digits, '.', '_' and '-' only, got {text!r}")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--sizes", nargs="+", type=_size, default=[10_000, 100_000, 1_000_000], help="N = M values")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                    help=f"what to run (default: all): {', '.join(METHODS)}")
    ap.add_argument("--blur", type=float, default=0.05)
    ap.add_argument("--scaling", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per case after the warm-up (median)")
    ap.add_argument("--slow", type=float, default=10.0, help="no further repeats after a call slower than this (s)")
    ap.add_argument("--time-limit", type=float, default=150.0,
                    help="seconds per call: a method slower (or projected slower, as N²) skips the larger sizes")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole run: no case starts past it")
    ap.add_argument("--max-dense-gib", type=float, default=8.0, help="largest dense reference to run (GiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", type=_tag, default=None,
                    help="appended to the file names (gpu_distances_<device>_<tag>.md), so a second run keeps the first")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but torch sees no CUDA GPU here (use --device cpu for a smoke run)")
    args.sizes = sorted(set(args.sizes))
    # The Sinkhorn reference first at each size, so that every other method's error can be computed.
    args.methods = sorted(dict.fromkeys(args.methods), key=list(METHODS).index)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 everywhere unless a method says otherwise
    report = run(args, argv)
    md, js = write(report, args.output_dir)
    print(f"wrote {md} and {js} in {report['wall_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
