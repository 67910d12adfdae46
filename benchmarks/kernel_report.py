"""Static report of the Triton kernels: compile every kernel at every configuration the launchers pick, for
sm_80 and sm_90, with the installed triton and with triton 3.6 (the GPU machines' version), and read the
machine code. No GPU needed: triton.compile with an explicit GPUTarget, then the cuobjdump bundled in the
triton wheel. These are static figures, not timings.

    python benchmarks/kernel_report.py [--json OUT.json] [--markdown OUT.md] [--archs 80,90]
                                       [--triton36 DIR] [--install-triton36] [--jobs N] [--sweep KIND]

What is compiled (``jobs()``): for each kernel, the launcher's own tile choice (the functions the launchers
call: kernels.euler_flow._configs, kernels.softmin.configs) on representative problems: N = M = 10^6 points
in D = 2 and 3, hidden width H = 500 (the paper's), float32 and float64, each activation (flow), p = 1 and
2 (soft-min, weighted sum); and the generic D > 3 kernels once per dtype (kind "other"). Every pointer is
16-byte aligned and an int argument equal to 0 mod 16 is marked so, as Triton's launcher does at run time.

Per compiled kernel (one JSON row):
  regs          registers per thread (cuobjdump --dump-resource-usage REG)
  spill_bytes   register spill bytes per thread as ptxas -v reports them (max of spill stores and loads;
                the workers compile with an empty triton cache so that ptxas always runs). ptxas
                sometimes outlines code into subroutines (CALL.REL.NOINC) and saves registers around
                them in a small stack frame: that is not a spill for ptxas; the Markdown lists it
                ("stack B")
  shared_bytes  the shared memory the launch asks for (triton's metadata)
  inner_loop    the innermost loops of the SASS: a loop is a backward branch (BRA to a lower address),
                innermost = contains no other loop. For these kernels every innermost loop is one trip of a
                tile loop over (points × hidden units) (flow: the forward has one, the backward two: the
                velocity recomputed, then the gradients) or (x points × y points) (soft-min, weighted sum,
                nearest: one), and Triton does not unroll them.
                  unit                   "point x hidden unit" or "pair"
                  instructions_per_unit  Σ over the innermost loops of (SASS instructions in the body, the
                                         backward branch included) × 32 · num_warps threads / (units per
                                         trip = BLOCK_N · BLOCK_H or BLOCK_N · BLOCK_M): the thread-level
                                         instructions one unit of work costs (a warp instruction counts 32)
                  shuffles, barriers     SHFL and BAR instructions in those bodies (per trip, not per unit)
                  mufu_per_unit          MUFU (exp2, lg2, rcp, rsqrt, ...) thread instructions per unit
The Markdown adds, for the flow, "+ per layer": the instructions of the loop around the hidden loops (one
(tile, layer): the reductions over H after them, loading the states, the bias sums) outside them, per unit
at H = 500 (x 500/128 at H = 128): the part of the work that the innermost-loop figure leaves out.

The Markdown adds, per float32 row at sm_90, the expected H100 time of the kernel's loops on a reference
workload from these counts and peak rates (model below), against eager PyTorch and against FlashSinkhorn's
structure. Model (H100 SXM): 132 SMs at 1.98 GHz; an SM issues 4 warp instructions per clock (128
thread-instructions), its MUFU unit does 16 per clock, its FP64 units 64 per clock. Time per unit =
max(instructions / 128, MUFU / 16, FP64 / 64) clocks per SM, summed over the units and divided by
132 SMs · 1.98e9. It assumes full issue (enough warps to hide latency) and ignores the work outside the
innermost loops, so it is a lower bound of what the code as compiled can do.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_TRITON36 = ROOT / ".triton36"
ARCHS = (80, 90)
KINDS = ("flow_forward", "flow_backward", "softmin_forward", "softmin_backward", "nearest", "other")

# Representative problem of the job list (the launchers' tile choice depends on it only through clipping
# to small sizes).
N_POINTS = 10**6
WIDTH = 500

# The issue's targets (float32, sm_80 and sm_90, both tritons): instructions per unit, and whether the
# innermost loop must be free of shuffles and barriers.
TARGETS = {
    "flow_forward": (12, 9, True),
    "flow_backward": (45, 35, False),
    "softmin_forward": (16, 11, True),
    "nearest": (12, 11, True),
}

# H100 model (module docstring).
H100_SMS, H100_HZ = 132, 1.98e9
ISSUE_PER_CLK, MUFU_PER_CLK, FP64_PER_CLK = 128, 16, 64
HBM_BYTES_PER_S = 3.35e12


@dataclass
class Job:
    """One kernel compilation: ``module.fn`` with these constexprs and launch options."""

    module: str  # e.g. "fastlddmm.kernels.softmin"
    fn: str
    kind: str
    dtype: str  # "float32" / "float64"
    constexprs: dict
    num_warps: int
    units_per_trip: int  # BLOCK_N · BLOCK_H or BLOCK_N · BLOCK_M
    unit: str
    ints: dict = field(default_factory=dict)  # representative values of the int arguments (divisibility)
    label: str = ""  # the kernel's name in the report

    def config_text(self) -> str:
        keys = [k for k in ("D", "ACT", "P", "BLOCK_N", "BLOCK_H", "BLOCK_M", "BLOCK_D") if k in self.constexprs]
        act = {0: "relu", 1: "tanh", 2: "softplus"}
        parts = []
        for k in keys:
            v = self.constexprs[k]
            parts.append(f"{k}={act[v] if k == 'ACT' else v}")
        return " ".join(parts + [f"warps={self.num_warps}"])


# ------------------------------------------------------------------------------------------------
# The jobs: what the launchers pick
# ------------------------------------------------------------------------------------------------


def _flow_jobs(K, torch) -> list[Job]:
    jobs = []
    for dtype in (torch.float32, torch.float64):
        dname = str(dtype).split(".")[1]
        for act in K.ACTIVATIONS:
            for dim in (2, 3):
                for backward in (False, True):
                    bn, bh, _, warps = K._configs(N_POINTS, WIDTH, dim, dtype, backward=backward, activation=act)
                    hp = -(-WIDTH // bh) * bh
                    c = dict(D=dim, ACT=K._ACT_CODE[act], BLOCK_N=bn, BLOCK_H=bh, FAST=True)
                    if not backward:
                        c["STORE_STATES"] = True
                    fn = "_euler_flow_bwd_kernel" if backward else "_euler_flow_fwd_kernel"
                    jobs.append(Job("fastlddmm.kernels.euler_flow", fn, "flow_backward" if backward else "flow_forward",
                                    dname, c, warps, bn * bh, "point x hidden unit", dict(L=10, HP=hp),
                                    "euler_flow " + ("backward" if backward else "forward")))
        # Generic path (D > 3), relu, once.
        for backward in (False, True):
            bn, bh, bd, warps = K._configs(N_POINTS, WIDTH, 4, dtype, backward=backward, activation="relu")
            c = dict(ACT=0, BLOCK_N=bn, BLOCK_H=bh, BLOCK_D=bd)
            if not backward:
                c["STORE_STATES"] = True
            fn = "_euler_flow_bwd_generic" if backward else "_euler_flow_fwd_generic"
            jobs.append(Job("fastlddmm.kernels.euler_flow", fn, "other", dname, c, warps, bn * bh,
                            "point x hidden unit", dict(L=10, H=WIDTH, D=4),
                            "euler_flow generic " + ("backward" if backward else "forward") + " (D > 3)"))
    return jobs


# (launcher key, kernel, kind, label, padded-side int argument)
_SOFTMIN_KERNELS = (
    ("fwd", "_softmin_fwd_kernel", "softmin_forward", "softmin forward", "MP"),
    ("bwd_x", "_softmin_bwd_x_kernel", "softmin_backward", "softmin backward x", "MP"),
    ("bwd_y", "_softmin_bwd_y_kernel", "softmin_backward", "softmin backward y", "NP"),
    ("wsum_fwd", "_wsum_fwd_kernel", "other", "weighted sum forward", "MP"),
    ("wsum_bwd_x", "_wsum_bwd_x_kernel", "other", "weighted sum backward x", "MP"),
    ("wsum_bwd_y", "_wsum_bwd_y_kernel", "other", "weighted sum backward y,v,h", "NP"),
)
_SOFTMIN_GENERIC = (("fwd", "_softmin_fwd_generic", "softmin forward generic (D > 3)"),
                    ("bwd_x", "_softmin_bwd_x_generic", "softmin backward x generic (D > 3)"))


def _softmin_jobs(S, torch) -> list[Job]:
    jobs = []
    for dtype in (torch.float32, torch.float64):
        dname = str(dtype).split(".")[1]
        for key, fn, kind, label, _ in _SOFTMIN_KERNELS:
            for p in (2, 1):
                for dim in (2, 3):
                    bn, bm, _, warps = S.configs(key, N_POINTS, N_POINTS, dim, dtype)
                    jobs.append(Job("fastlddmm.kernels.softmin", fn, kind, dname,
                                    dict(D=dim, P=p, BLOCK_N=bn, BLOCK_M=bm), warps, bn * bm, "pair", {}, label))
        for key, fn, label in _SOFTMIN_GENERIC:
            bn, bm, bd, warps = S.configs(key, N_POINTS, N_POINTS, 4, dtype)
            jobs.append(Job("fastlddmm.kernels.softmin", fn, "other", dname, dict(P=2, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd),
                            warps, bn * bm, "pair", dict(D=4), label))
    return jobs


def _nearest_jobs(S, torch) -> list[Job]:
    jobs = []
    for dtype in (torch.float32, torch.float64):
        dname = str(dtype).split(".")[1]
        for dim in (2, 3):
            bn, bm, _, warps = S.configs("nearest", N_POINTS, N_POINTS, dim, dtype)
            jobs.append(Job("fastlddmm.kernels.nearest", "_nearest_kernel", "nearest", dname,
                            dict(D=dim, BLOCK_N=bn, BLOCK_M=bm), warps, bn * bm, "pair", {}, "nearest"))
        bn, bm, bd, warps = S.configs("nearest", N_POINTS, N_POINTS, 4, dtype)
        jobs.append(Job("fastlddmm.kernels.nearest", "_nearest_generic", "other", dname,
                        dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd), warps, bn * bm, "pair", dict(D=4),
                        "nearest generic (D > 3)"))
    return jobs


# Candidate tiles of the sweep (--sweep): flow forward (BLOCK_N, BLOCK_H = 8 or 16, warps), flow backward
# (BLOCK_N, BLOCK_H = 32 · warps, warps), streaming kernels (threads' axis 32 · warps · rows per thread, the
# in-thread axis, warps).
SWEEP = {
    "flow_fwd": [(bn, bh, w) for w in (1, 2, 4) for bh in (8, 16) for bn in (32 * w, 64 * w, 128 * w)],
    "flow_bwd": [(bn, 32 * w, w) for w in (1, 2, 4) for bn in (4, 8, 16)]
    + [(bn, 8, 1) for bn in (16, 32, 64, 128)] + [(bn, 16, 1) for bn in (16, 32, 64)] + [(64, 8, 2), (128, 8, 4)],
    "stream": [(32 * w * r, bm, w) for w in (2, 4) for r in (1, 2, 4, 8) for bm in (4, 8, 16, 32)],
}


def sweep_jobs(which: str) -> list[Job]:
    only = dict(kv.split("=") for kv in os.environ.get("KERNEL_REPORT_ONLY", "").split(",") if kv)
    return [j for j in _sweep_jobs(which) if all(str(j.constexprs.get(k, getattr(j, k, None))) == v or
                                                   (k == "dtype" and j.dtype == v) for k, v in only.items())]


def _sweep_jobs(which: str) -> list[Job]:
    """Candidate tiles for one kernel (a key of kernels.softmin._GPU_TILES, or "flow_fwd" / "flow_bwd"), D = 2
    and 3, float32 and float64, every activation or p. KERNEL_REPORT_ONLY="dtype=float32,ACT=0,..." keeps the
    jobs whose constexprs (or Job fields) have these values."""
    import torch  # noqa: F401

    out = []
    for dname in ("float32", "float64"):
        if which.startswith("flow"):
            backward = which == "flow_bwd"
            for act, dim, (bn, bh, w) in [(a, d, t) for a in (0, 1, 2) for d in (2, 3) for t in SWEEP[which]]:
                c = dict(D=dim, ACT=act, BLOCK_N=bn, BLOCK_H=bh, FAST=True)
                if not backward:
                    c["STORE_STATES"] = True
                out.append(Job("fastlddmm.kernels.euler_flow",
                               "_euler_flow_bwd_kernel" if backward else "_euler_flow_fwd_kernel",
                               "flow_backward" if backward else "flow_forward", dname, c, w, bn * bh,
                               "point x hidden unit", dict(L=10, HP=-(-WIDTH // bh) * bh), which))
            continue
        table = {k: (fn, kind) for k, fn, kind, _, _ in _SOFTMIN_KERNELS}
        table["nearest"] = ("_nearest_kernel", "nearest")
        fn, kind = table[which]
        module = "fastlddmm.kernels.nearest" if which == "nearest" else "fastlddmm.kernels.softmin"
        for p, dim in [(p, d) for p in ((2,) if which == "nearest" else (2, 1)) for d in (2, 3)]:
            for threads_axis, inner, w in SWEEP["stream"]:
                bn, bm = (inner, threads_axis) if which.endswith("_y") else (threads_axis, inner)
                c = dict(D=dim, BLOCK_N=bn, BLOCK_M=bm)
                if which != "nearest":
                    c["P"] = p
                out.append(Job(module, fn, kind, dname, c, w, bn * bm, "pair", {}, which))
    return out


def jobs() -> list[Job]:
    """Every kernel at every configuration the launchers pick (module docstring). Imports the kernels
    compiled for the GPU: TRITON_INTERPRET must not be set."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("kernel_report compiles for the GPU: unset TRITON_INTERPRET")
    import torch

    from fastlddmm.kernels import euler_flow as K
    from fastlddmm.kernels import softmin as S

    return _flow_jobs(K, torch) + _softmin_jobs(S, torch) + _nearest_jobs(S, torch)


# ------------------------------------------------------------------------------------------------
# Compiling and reading the SASS
# ------------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_job(job: Job, arch: int):
    """triton.compile of the job for sm_<arch> (no GPU): the CompiledKernel (asm["cubin"], metadata)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job.module), job.fn)
    ptr = {"float32": "*fp32", "float64": "*fp64"}[job.dtype]
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in job.constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name == "index_ptr" else ptr
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            value = job.ints.get(name)
            dns = getattr(fn, "do_not_specialize", ()) or ()
            if value is not None and value % 16 == 0 and name not in dns and i not in dns:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, job.constexprs, attrs)
    # ptxas's own report (-v, which triton passes) is printed when TRITON_DUMP_PTXAS_LOG=1; the workers run
    # with an empty cache so that ptxas always runs.
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": job.num_warps})
    return kernel, log.getvalue()


def ptxas_spills(log: str) -> tuple[int, int] | None:
    """(spill store bytes, stack frame bytes) from ptxas -v, or None when ptxas did not run (cache hit)."""
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return None if m is None else (max(int(m[2]), int(m[3])), int(m[1]))


_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)")


def sass_and_resources(cubin: bytes) -> tuple[str, dict]:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.remove(path)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    if m is None:
        raise RuntimeError(f"cannot read the resource usage: {res!r}")
    return sass, dict(regs=int(m[1]), stack=int(m[2]), shared_static=int(m[3]), local=int(m[4]))


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of every SASS instruction, predicates included."""
    return [(int(m[1], 16), m[2]) for m in map(_INSTRUCTION.search, sass.splitlines()) if m]


def _opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P[T0-9]+\s+", "", text)
    return text.split()[0].split(".")[0]


def _loops(ins: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) instruction index of every loop: a backward branch and its target."""
    index = {a: i for i, (a, _) in enumerate(ins)}
    loops = []
    for i, (addr, text) in enumerate(ins):
        m = _BRANCH.search(text)
        if m:
            target = int(m[1], 16)
            if target < addr and target in index:
                loops.append((index[target], i))
    return loops


def _inner(loops: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted(lp for lp in loops if not any(o != lp and lp[0] <= o[0] and o[1] <= lp[1] for o in loops))


def innermost_loops(ins: list[tuple[int, str]]) -> list[list[str]]:
    """The bodies (instruction texts, from the branch target to the backward branch) of the loops that
    contain no other loop."""
    return [[t for _, t in ins[s:e + 1]] for s, e in _inner(_loops(ins))]


def enclosing_overhead(ins: list[tuple[int, str]]) -> int:
    """Instructions of the smallest loop around the innermost loops, outside them: for the flow, the work of
    one (tile, layer) besides the hidden loops (the reductions over H, the states, the partial sums of b2)."""
    loops = _loops(ins)
    inner = _inner(loops)
    outer = [lp for lp in loops if lp not in inner and any(lp[0] <= i[0] and i[1] <= lp[1] for i in inner)]
    if not outer:
        return 0
    s, e = min(outer, key=lambda lp: lp[1] - lp[0])
    return (e - s + 1) - sum(b - a + 1 for a, b in inner if s <= a and b <= e)


def analyse(job: Job, kernel, log: str = "") -> dict:
    """The report row of one compiled job (module docstring)."""
    import triton

    sass, res = sass_and_resources(kernel.asm["cubin"])
    ptxas = ptxas_spills(log)
    ins = instructions(sass)
    bodies = innermost_loops(ins)
    threads = 32 * job.num_warps
    scale = threads / job.units_per_trip
    count = sum(len(b) for b in bodies)
    ops = [_opcode(t) for b in bodies for t in b]
    mix: dict[str, int] = {}
    for o in ops:
        mix[o] = mix.get(o, 0) + 1
    fp64 = sum(v for k, v in mix.items() if k in ("DFMA", "DADD", "DMUL", "DSETP", "DMNMX"))
    spills = sum(1 for _, t in ins if _opcode(t) in ("STL", "LDL"))
    return {
        "kernel": job.label,
        "kind": job.kind,
        "arch": None,  # filled by the caller
        "triton": triton.__version__,
        "dtype": job.dtype,
        "config": job.config_text(),
        "regs": res["regs"],
        # ptxas's spill bytes; without its log (a cached compile), all local memory counts as spill
        "spill_bytes": ptxas[0] if ptxas is not None else res["stack"] + res["local"],
        "shared_bytes": int(getattr(kernel.metadata, "shared", 0)) + res["shared_static"],
        "inner_loop": {
            "unit": job.unit,
            "instructions_per_unit": round(count * scale, 2),
            "shuffles": mix.get("SHFL", 0),
            "barriers": mix.get("BAR", 0),
            "mufu_per_unit": round(mix.get("MUFU", 0) * scale, 2),
        },
        # Extra detail, kept out of the issue's schema by rows_for_json().
        "_loops": len(bodies),
        # flow: the per-(tile, layer) work outside the hidden loops, per unit at H = 500
        "_outer_per_unit": (round(enclosing_overhead(ins) * threads / (job.units_per_trip // job.constexprs["BLOCK_H"]
                                                                        * job.ints["HP"]), 2)
                            if "HP" in job.ints else None),
        "_fp64_per_unit": round(fp64 * scale, 2),
        "_local_instructions": spills,  # STL / LDL: spills, or registers saved around ptxas-outlined CALLs
        "_stack_bytes": res["stack"] + res["local"],
        "_mix": dict(sorted(mix.items(), key=lambda kv: -kv[1])[:12]),
    }


def run_job(job: Job, arch: int) -> dict:
    try:
        row = analyse(job, *compile_job(job, arch))
    except Exception as err:  # noqa: BLE001 - a compile error is a result of the report
        import triton

        row = {"kernel": job.label, "kind": job.kind, "arch": arch, "triton": triton.__version__, "dtype": job.dtype,
               "config": job.config_text(), "error": f"{type(err).__name__}: {str(err)[:2000]}"}
    row["arch"] = arch
    return row


# ------------------------------------------------------------------------------------------------
# Several tritons: one worker process each (a side folder first on sys.path for triton 3.6)
# ------------------------------------------------------------------------------------------------


def _triton_version(path: str | None) -> str | None:
    env = _worker_env(path)
    proc = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    return proc.stdout.strip() if proc.returncode == 0 else None


def _worker_env(path: str | None) -> dict:
    """The environment of a worker: no TRITON_INTERPRET (compiled kernels), and the side triton first on the
    path when given. fastlddmm itself comes from the installed (editable) package."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    if path:
        env["PYTHONPATH"] = os.pathsep.join([path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def collect(archs: list[int], tritons: list[str | None], workers: int, kinds: list[str] | None = None,
            sweep: str | None = None) -> list[dict]:
    """Rows for every (triton, arch, job); the jobs of one triton are split over ``workers`` processes."""
    tasks = []
    with tempfile.TemporaryDirectory() as tmp:
        for t_i, path in enumerate(tritons):
            for a in archs:
                for w in range(max(1, workers // max(1, len(archs) * len(tritons)))):
                    tasks.append((path, a, w, os.path.join(tmp, f"rows-{t_i}-{a}-{w}.json")))
        per_arch = {}
        for path, a, w, out in tasks:
            per_arch.setdefault((path, a), []).append(out)

        def launch(path, a, w, out):
            n = len(per_arch[(path, a)])
            code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import kernel_report as r; "
                    f"r._worker_shard({[a]!r}, {out!r}, {kinds!r}, {w}, {n}, {sweep!r})")
            env = _worker_env(path)
            env["TRITON_CACHE_DIR"] = out + ".cache"  # empty: ptxas runs, and reports its spills
            # cwd: a scratch folder, so that `-c`'s sys.path[0] (the working directory) cannot put a checkout's
            # fastlddmm/ (which has no kernels/ inside) in front of the installed package.
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp)
            if proc.returncode != 0:
                raise RuntimeError(f"kernel_report worker failed (triton at {path or 'installed'}):\n{proc.stderr[-4000:]}")
            return json.loads(Path(out).read_text())

        rows = []
        with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for part in pool.map(lambda t: launch(*t), tasks):
                rows.extend(part)
    return rows


def _worker_shard(archs: list[int], out: str, kinds: list[str] | None, shard: int, shards: int,
                  sweep: str | None = None) -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    todo = sweep_jobs(sweep) if sweep else [j for j in jobs() if kinds is None or j.kind in kinds]
    todo = todo[shard::shards]
    rows = [run_job(j, a) for a in archs for j in todo]
    Path(out).write_text(json.dumps(rows))


def rows_for_json(rows: list[dict]) -> list[dict]:
    """The issue's schema: the extra "_" keys dropped (an "error" key stays on rows that failed)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]


# ------------------------------------------------------------------------------------------------
# Targets and the H100 model
# ------------------------------------------------------------------------------------------------


def target_failures(rows: list[dict]) -> list[str]:
    """The issue's targets not met (float32 rows), and every spill or compile error."""
    bad = []
    for r in rows:
        where = f"{r['kernel']} [{r['config']}] {r['dtype']} sm_{r['arch']} triton {r['triton']}"
        if "error" in r:
            bad.append(f"{where}: compile error {r['error'][:200]}")
            continue
        if r["spill_bytes"]:
            bad.append(f"{where}: spills {r['spill_bytes']} B")
        target = TARGETS.get(r["kind"])
        if target is None or r["dtype"] != "float32":
            continue
        limit, _, clean = target
        loop = r["inner_loop"]
        if loop["instructions_per_unit"] > limit:
            bad.append(f"{where}: {loop['instructions_per_unit']} instructions per {loop['unit']} > {limit}")
        if clean and (loop["shuffles"] or loop["barriers"]):
            bad.append(f"{where}: {loop['shuffles']} shuffles, {loop['barriers']} barriers in the innermost loop")
    return bad


def clocks_per_unit(r: dict) -> float:
    loop = r["inner_loop"]
    return max(loop["instructions_per_unit"] / ISSUE_PER_CLK, loop["mufu_per_unit"] / MUFU_PER_CLK,
               r.get("_fp64_per_unit", 0.0) / FP64_PER_CLK)


def h100_seconds(units: float, clk_per_unit: float) -> float:
    return units * clk_per_unit / (H100_SMS * H100_HZ)


# Reference workloads of the time model: (units of work, eager PyTorch model in seconds, what it is).
_FLOW_UNITS = 10**6 * 128 * 10  # N = 10^6 points, H = 128, L = 10 layers
_PAIRS = 10**12  # N = M = 10^6
# Eager flow (cuBLAS GEMMs with K = D = 3 are memory-bound): per layer the forward writes z, reads it for ρ,
# writes h and reads it for W2 (4 N·H floats); the backward reads h and z, writes and reads grad h and
# grad z for the two weight GEMMs and W1ᵀ (~8 N·H floats).
_EAGER = {
    "flow_forward": (4 * _FLOW_UNITS * 4 / HBM_BYTES_PER_S, "4 N·H floats per layer through HBM"),
    "flow_backward": (8 * _FLOW_UNITS * 4 / HBM_BYTES_PER_S, "8 N·H floats per layer through HBM"),
    # Dense soft-min in chunks: the cost matrix written, read by logsumexp (and for the backward, the
    # soft-max written and read again): >= 3 (forward) / 5 (backward) floats per pair through HBM.
    "softmin_forward": (3 * _PAIRS * 4 / HBM_BYTES_PER_S, "cost matrix in chunks, 3 floats per pair"),
    "softmin_backward": (5 * _PAIRS * 4 / HBM_BYTES_PER_S, "5 floats per pair"),
    "nearest": (2 * _PAIRS * 4 / HBM_BYTES_PER_S, "distance matrix in chunks, 2 floats per pair"),
}
# FlashSinkhorn's structure for the soft-min forward: the centred cross term on tensor cores, then per pair
# one FFMA (scale and column bias), the running max, one subtraction, one exp2, one add: ~5 issue slots and
# one MUFU: the exp unit bounds it at 1/16 clock per pair.
_FLASH_CLK_PER_PAIR = max(5 / ISSUE_PER_CLK, 1 / MUFU_PER_CLK)


def model_lines(rows: list[dict], triton_version: str) -> list[str]:
    lines = ["| kernel | config | clk/unit/SM | bound | H100 time | eager (model) | FlashSinkhorn structure |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r or r["dtype"] != "float32" or r["arch"] != 90 or r["triton"] != triton_version:
            continue
        if r["kind"] not in _EAGER or "D=3" not in r["config"]:
            continue
        clk = clocks_per_unit(r)
        loop = r["inner_loop"]
        if r.get("_outer_per_unit"):  # the per-layer work around the hidden loops, scaled from H = 500 to 128
            block_h = int(re.search(r"BLOCK_H=(\d+)", r["config"])[1])
            hp = lambda h: -(-h // block_h) * block_h  # noqa: E731
            clk += r["_outer_per_unit"] * hp(WIDTH) / hp(128) / ISSUE_PER_CLK
        bound = "MUFU" if loop["mufu_per_unit"] / MUFU_PER_CLK >= loop["instructions_per_unit"] / ISSUE_PER_CLK else "issue"
        units = _FLOW_UNITS if r["kind"].startswith("flow") else _PAIRS
        work = "N=10^6, H=128, L=10" if r["kind"].startswith("flow") else "N=M=10^6"
        eager, why = _EAGER[r["kind"]]
        flash = f"{h100_seconds(_PAIRS, _FLASH_CLK_PER_PAIR) * 1e3:.0f} ms" if r["kind"] == "softmin_forward" else "-"
        lines.append(f"| {r['kernel']} | {r['config']} | {clk:.4f} | {bound} | {_fmt_s(h100_seconds(units, clk))} "
                     f"({work}) | {_fmt_s(eager)} ({why}) | {flash} |")
    return lines


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _variant(r: dict) -> str:
    m = re.search(r"\b(ACT|P)=(\w+)", r["config"])
    return m[0] if m else ""


def before_after_lines(rows: list[dict], before: list[dict]) -> list[str]:
    """One line per kernel variant (D = 3, float32): the rows of an earlier report (``--before``) beside these."""
    old = {(b["kernel"], b["dtype"], _variant(b), b["arch"], b["triton"]): b for b in before if "error" not in b}
    lines = ["| kernel | variant | sm | triton | regs | spill B | instr/unit | SHFL | BAR | → regs | spill B | instr/unit | "
             "+ per layer | SHFL | BAR |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r or r["dtype"] != "float32" or "D=3" not in r["config"]:
            continue
        b = old.get((r["kernel"], r["dtype"], _variant(r), r["arch"], r["triton"]))
        if b is None:
            continue
        bl, lp = b["inner_loop"], r["inner_loop"]
        outer = "" if r.get("_outer_per_unit") is None else r["_outer_per_unit"]
        lines.append(f"| {r['kernel']} | {_variant(r)} | {r['arch']} | {r['triton']} | {b['regs']} | {b['spill_bytes']} | "
                     f"{bl['instructions_per_unit']} | {bl['shuffles']} | {bl['barriers']} | {r['regs']} | {r['spill_bytes']} | "
                     f"{lp['instructions_per_unit']} | {outer} | {lp['shuffles']} | {lp['barriers']} |")
    return lines


def markdown(rows: list[dict], notes: list[str], before: list[dict] | None = None) -> str:
    out = ["# Triton kernels: static report (compiled, not timed)", "",
           "Written by `python benchmarks/kernel_report.py`; see its docstring for what each column means. "
           "These are static figures read from the SASS (no GPU), not timings.", ""]
    out += [f"- {n}" for n in notes] + [""]
    out += ["| kernel | kind | dtype | config | sm | triton | regs | spill B | stack B | shared B | instr/unit | "
            "+ per layer | SHFL | BAR | MUFU/unit |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['kernel']} | {r['kind']} | {r['dtype']} | {r['config']} | {r['arch']} | {r['triton']} | "
                       f"compile error: {r['error'][:80]} | | | | | | | | |")
            continue
        lp = r["inner_loop"]
        out.append(f"| {r['kernel']} | {r['kind']} | {r['dtype']} | {r['config']} | {r['arch']} | {r['triton']} | "
                   f"{r['regs']} | {r['spill_bytes']} | {r.get('_stack_bytes', '')} | {r['shared_bytes']} | "
                   f"{lp['instructions_per_unit']} | {'' if r.get('_outer_per_unit') is None else r['_outer_per_unit']} | "
                   f"{lp['shuffles']} | {lp['barriers']} | {lp['mufu_per_unit']} |")
    versions = sorted({r["triton"] for r in rows})
    out += ["", "## Targets (issue 19: float32, sm_80 and sm_90, both tritons)", ""]
    fails = target_failures(rows)
    for kind, (limit, goal, clean) in TARGETS.items():
        sel = [r for r in rows if r["kind"] == kind and r["dtype"] == "float32" and "error" not in r]
        if not sel:
            continue
        worst = max(r["inner_loop"]["instructions_per_unit"] for r in sel)
        best = min(r["inner_loop"]["instructions_per_unit"] for r in sel)
        dirty = sum(1 for r in sel if r["inner_loop"]["shuffles"] or r["inner_loop"]["barriers"])
        out.append(f"- {kind}: {best}–{worst} instructions per unit (target <= {limit}, goal {goal})"
                   + (f"; innermost loops with shuffles/barriers: {dirty}" if clean else ""))
    spills = [r for r in rows if r.get("spill_bytes")]
    out.append(f"- spills: {len(spills)} of {len(rows)} compiled kernels")
    out.append(f"- not met: {len(fails)}" + ("" if not fails else ":"))
    out += [f"  - {f}" for f in fails]
    if before:
        out += ["", "## Before → after (float32, D = 3; before: the kernels of commit 0ceec05 at their launchers' tiles, "
                "from --before)", ""]
        out += before_after_lines(rows, before)
    for v in versions:
        out += ["", f"## Expected H100 time from these counts (model in the script's docstring; triton {v}, sm_90, "
                "float32, D = 3)", ""]
        out += model_lines(rows, v)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _tritons(args) -> tuple[list[str | None], list[str]]:
    """The triton installations to compile with ([None] = the installed one), and notes on what is missing."""
    notes = []
    installed = _triton_version(None)
    if installed is None:
        raise SystemExit("kernel_report: triton is not importable")
    tritons: list[str | None] = [None]
    notes.append(f"installed triton {installed}")
    if not installed.startswith("3.6"):
        side = Path(args.triton36)
        if args.install_triton36 and not (side / "triton").is_dir():
            subprocess.run([sys.executable, "-m", "pip", "install", "--target", str(side), "triton==3.6.*",
                            "--no-deps", "-q"], check=True)
        version = _triton_version(str(side)) if (side / "triton").is_dir() else None
        if version and version.startswith("3.6"):
            tritons.append(str(side))
            notes.append(f"triton {version} from {side}")
        else:
            notes.append(f"triton 3.6 (the GPU machines' version) NOT compiled: no triton 3.6 in {side} "
                         f"(pip install --target {side} 'triton==3.6.*' --no-deps, or --install-triton36)")
    return tritons, notes


def _print_sweep(rows: list[dict]) -> int:
    """One line per candidate: instructions per unit, registers and spills on every (arch, triton)."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["dtype"], r["config"]), []).append(r)
    for (dtype, config), rs in sorted(by.items()):
        cells = []
        for r in sorted(rs, key=lambda r: (r["arch"], r["triton"])):
            if "error" in r:
                cells.append(f"sm{r['arch']}/{r['triton']}: error")
                continue
            lp = r["inner_loop"]
            outer = f"+{r['_outer_per_unit']:.2f}" if r.get("_outer_per_unit") is not None else ""
            cells.append(f"sm{r['arch']}/{r['triton']}: {lp['instructions_per_unit']:6.2f}{outer} r{r['regs']:3d}"
                         + (f" SPILL {r['spill_bytes']}" if r["spill_bytes"] else "")
                         + (f" shfl{lp['shuffles']} bar{lp['barriers']}" if lp["shuffles"] or lp["barriers"] else ""))
        print(f"{dtype} {config:48s} " + " | ".join(cells))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the rows here ({'rows': [...]})")
    ap.add_argument("--markdown", default=str(RESULTS / "kernel_report.md"), help="Markdown table (default %(default)s)")
    ap.add_argument("--archs", default="80,90")
    ap.add_argument("--triton36", default=str(DEFAULT_TRITON36), help="side folder holding triton 3.6")
    ap.add_argument("--install-triton36", action="store_true", help="pip install triton 3.6 into --triton36 if missing")
    ap.add_argument("--kinds", default=None, help=f"comma-separated subset of {KINDS}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    ap.add_argument("--before", default=str(RESULTS / "kernel_report_before.json"),
                    help="rows of an earlier report ({'rows': [...]}) to set beside these in the Markdown "
                         "(default %(default)s, if it exists)")
    ap.add_argument("--sweep", help="compile the candidate tiles of one kernel (flow_fwd, flow_bwd, fwd, bwd_x, bwd_y, "
                    "wsum_fwd, wsum_bwd_x, wsum_bwd_y, nearest) and print them; writes nothing")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    kinds = args.kinds.split(",") if args.kinds else None
    tritons, notes = _tritons(args)
    if args.sweep:
        return _print_sweep(collect(archs, tritons, args.jobs, sweep=args.sweep))
    start = time.perf_counter()
    rows = collect(archs, tritons, args.jobs, kinds)
    rows.sort(key=lambda r: (KINDS.index(r["kind"]), r["kernel"], r["dtype"], r["config"], r["arch"], r["triton"]))
    notes.append(f"{len(rows)} compilations in {time.perf_counter() - start:.0f} s ({args.jobs} processes)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows_for_json(rows)}, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        before = json.loads(Path(args.before).read_text())["rows"] if args.before and Path(args.before).exists() else None
        Path(args.markdown).write_text(markdown(rows, notes, before))
    for n in notes:
        print(n)
    fails = target_failures(rows)
    print(f"{len(rows)} rows; targets not met / spills / errors: {len(fails)}")
    for f in fails:
        print("  " + f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
