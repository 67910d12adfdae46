"""fastlddmm against what a user would otherwise pick, in one run, on the same inputs.

    python benchmarks/compare.py [--quick] [--device cpu|cuda] [--out benchmarks/results] [--repeat 3]

Measured, forward + backward, float32, D = 3:
  flow      fl.ops.euler_flow (cpu; cuda and triton on a GPU) vs the eager reference
            (fl.reference.euler_flow, the one the tests use) and torch.compile of it;
            10 layers, over points (width 64) and over widths 16/64/128/500 (fixed points).
  sinkhorn  fl.sinkhorn (auto, cpu, keops) vs the dense reference and GeomLoss tensorized / online
            (blur 0.05, scaling 0.5, p = 2, debiased).
  chamfer   fl.chamfer (auto, cpu, keops) vs scipy cKDTree, pykdtree, dense torch.cdist and plain pykeops argmin.
  register  one optimiser step of fl.register with its defaults (Sinkhorn data term, width 128, 10
            layers, Adam) vs the same step written by hand: the eager flow + GeomLoss
            SamplesLoss("sinkhorn", backend="online") + Adam (time of fl.register(steps=S) / S).

Time: median of --repeat calls after one warm-up call (compilation happens there; it runs on 2,000
points, or at full size for torch.compile, which compiles per shape); a case whose timed call exceeds
--slow seconds gets no further repeats. Peak memory: on the CPU the extra
resident memory of the timed calls (VmHWM above the RSS before them), each (method, size) in its own
fresh subprocess; on a GPU torch.cuda.max_memory_allocated above the memory allocated before them.
Ratios are to each op's baseline (flow: the eager reference; sinkhorn: GeomLoss online; chamfer: scipy
cKDTree; both the "what you would use otherwise" that runs at every size). Sizes a method cannot reach
in the run's budget (memory or minutes) are listed as skipped with the reason.

Writes compare_<device>.md, compare_<device>.json and compare_<device>_<op>.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: an installed fastlddmm wins over this checkout's sources

from benchmarks import _measure  # noqa: E402

LAYERS = 10
OPS = ("flow", "chamfer", "sinkhorn", "register")
WARMUP_POINTS = 2_000  # size of the warm-up call, except for torch.compile (static shapes: full size)
BASELINE = {"flow": "reference (eager)", "sinkhorn": "geomloss online", "chamfer": "scipy cKDTree",
            "register": "eager + geomloss online"}

# Methods per op and device, with the largest size each may run at here and why not beyond.
# (method, max points or None, reason when skipped)
METHODS = {
    "cpu": {
        "flow": [("reference (eager)", None, ""), ("reference torch.compile", None, ""), ("fastlddmm cpu", None, "")],
        # Dense Sinkhorn holds four (N, N) cost matrices; on 2 cores one N = 1e4 solve costs minutes.
        # Each Sinkhorn call is O(N²) work: ~1 min at 1e4 on this CPU, so only fastlddmm auto (KeOps there)
        # and its baseline run at 1e4.
        "sinkhorn": [("fastlddmm auto", None, ""), ("fastlddmm cpu", None, ""),
                     ("fastlddmm keops", 10_000, "KeOps' CPU loop: ~30 s per call at 1e4, O(N²)"),
                     ("reference (dense)", 10_000, "four (N, N) matrices: 160 GB at 1e5"),
                     ("geomloss tensorized", 3_000, "O(N²) work, run's time budget"),
                     ("geomloss online", 10_000, "KeOps' CPU loop: ~50 min per call at 1e5 (100x the 1e4 time)")],
        "chamfer": [("fastlddmm auto", None, ""), ("fastlddmm cpu", None, ""),
                    ("fastlddmm keops", 10_000, "O(N²) brute force: minutes per call on this CPU"),
                    ("scipy cKDTree", None, ""), ("pykdtree", None, ""),
                    ("torch cdist (dense)", 10_000, "(N, N) matrix: O(N²) memory and work"),
                    ("pykeops argmin", 10_000, "O(N²) brute force: minutes per call on this CPU")],
        "register": [("fastlddmm register", None, ""),
                     ("eager + geomloss online", 5_000, "KeOps' CPU loop: ~100x the 5000-point step (O(N²)), "
                                                        "about half an hour per step")],
    },
    "cuda": {
        "flow": [("reference (eager)", None, ""), ("reference torch.compile", None, ""), ("fastlddmm cuda", None, ""),
                 ("fastlddmm triton", None, "")],
        "sinkhorn": [("fastlddmm auto", None, ""), ("fastlddmm keops", None, ""),
                     ("reference (dense)", 30_000, "four (N, N) matrices exceed GPU memory"),
                     ("geomloss tensorized", 30_000, "four (N, N) matrices exceed GPU memory"), ("geomloss online", None, "")],
        "chamfer": [("fastlddmm auto", None, ""), ("fastlddmm keops", None, ""), ("scipy cKDTree", None, ""),
                    ("torch cdist (dense)", 30_000, "(N, N) matrix exceeds GPU memory"), ("pykeops argmin", None, "")],
    },
}

# Sizes: (points sweep at width 64, width sweep at fixed points, sinkhorn sizes, chamfer sizes).
SIZES = {
    ("cpu", False): {"flow_points": [1_000, 10_000, 200_000], "flow_widths": (10_000, [16, 128, 500]),
                     "sinkhorn": [1_000, 2_000, 10_000, 100_000], "chamfer": [1_000, 10_000, 100_000, 1_000_000],
                     "register": [5_000, 50_000]},
    ("cpu", True): {"flow_points": [1_000, 20_000], "flow_widths": (1_000, [16]),
                    "sinkhorn": [1_000], "chamfer": [1_000, 10_000], "register": [1_000]},
    ("cuda", False): {"flow_points": [10_000, 100_000, 1_000_000], "flow_widths": (1_000_000, [16, 128, 500]),
                       "sinkhorn": [1_000, 10_000, 100_000], "chamfer": [10_000, 100_000, 1_000_000], "register": []},
    ("cuda", True): {"flow_points": [10_000, 100_000], "flow_widths": (100_000, [128]),
                     "sinkhorn": [1_000, 10_000], "chamfer": [10_000, 100_000], "register": []},
}


def plan(device: str, quick: bool) -> list[dict]:
    """Every (op, method, points, width) case of one run, skipped ones included (with their reason)."""
    sizes = SIZES[(device, quick)]
    shapes = {"flow": [(n, 64) for n in sizes["flow_points"]] + [(sizes["flow_widths"][0], w) for w in sizes["flow_widths"][1]],
              "sinkhorn": [(n, None) for n in sizes["sinkhorn"]], "chamfer": [(n, None) for n in sizes["chamfer"]],
              "register": [(n, None) for n in sizes["register"]]}
    cases = []
    for op in OPS:
        for n, width in shapes[op]:
            for method, max_n, why in METHODS[device][op]:
                case = {"op": op, "method": method, "points": n, "width": width}
                if max_n is not None and n > max_n:
                    case["skipped"] = f"above {max_n:g} points: {why}"
                elif method == "reference torch.compile" and device == "cpu" and (quick or width != 64):
                    # Inductor takes 30-70 s per shape on a loaded 2-core CPU (measured): width 64 only
                    case["skipped"] = "compilation costs ~30-70 s per shape on this CPU: " + (
                        "left out of --quick" if quick else "run at width 64 only")
                cases.append(case)
    return cases


# ------------------------------------------------------------------------------------------------
# Worker: one case in a fresh process
# ------------------------------------------------------------------------------------------------


def _flow_call(method: str, n: int, width: int, device: str):
    import torch

    import fastlddmm as fl
    from benchmarks._common import flow_inputs
    from fastlddmm import dispatch

    reference = fl.reference.euler_flow
    inputs = [t.requires_grad_() for t in flow_inputs(n, width, LAYERS, device=device)]
    if method == "reference (eager)":
        flow = reference
    elif method == "reference torch.compile":
        flow = torch.compile(reference, dynamic=False)
    else:
        backend = method.split()[-1]
        dispatch.choose("euler_flow", backend, dispatch.Problem(device=device, dtype=torch.float32, dim=3))  # raises if not usable

        def flow(*args):
            return fl.ops.euler_flow(*args, backend=backend)

    def call():
        x_final, energy = flow(*inputs, 1.0 / LAYERS, "relu")
        loss = x_final.square().mean() + energy
        torch.autograd.grad(loss, inputs)
        return loss

    return call


def _sinkhorn_call(method: str, n: int, device: str):
    import torch

    import fastlddmm as fl
    from benchmarks._common import clouds

    x, y = clouds(n, n, device=device)
    kw = {"blur": 0.05, "scaling": 0.5, "p": 2}
    if method.startswith("geomloss"):
        from geomloss import SamplesLoss

        loss_fn = SamplesLoss("sinkhorn", backend=method.split()[-1], **kw)
    else:
        backend = {"fastlddmm auto": "auto", "fastlddmm cpu": "cpu", "fastlddmm keops": "keops",
                   "reference (dense)": "reference"}[method]

        def loss_fn(x, y):
            return fl.sinkhorn(x, y, backend=backend, **kw)

    def call():
        xg = x.clone().requires_grad_()
        loss = loss_fn(xg, y)
        torch.autograd.grad(loss, xg)
        return loss

    return call


def _chamfer_call(method: str, n: int, device: str):
    import torch

    import fastlddmm as fl
    from benchmarks._common import clouds

    x, y = clouds(n, n, device=device)

    def from_indices(xg, i_xy, i_yx):  # (N, D), (N,) nearest y of each x, (M,) nearest x of each y
        return (xg - y[i_xy]).square().sum(-1).mean() + (y - xg[i_yx]).square().sum(-1).mean()

    if method.startswith("fastlddmm"):
        def loss_fn(xg):
            return fl.chamfer(xg, y, backend=method.split()[-1])
    elif method == "scipy cKDTree":
        from scipy.spatial import cKDTree

        def loss_fn(xg):
            xs, ys = xg.detach().cpu().numpy(), y.cpu().numpy()
            i_xy = cKDTree(ys).query(xs, k=1, workers=-1)[1]
            i_yx = cKDTree(xs).query(ys, k=1, workers=-1)[1]
            return from_indices(xg, torch.from_numpy(i_xy).to(xg.device), torch.from_numpy(i_yx).to(xg.device))
    elif method == "pykdtree":
        from pykdtree.kdtree import KDTree

        def loss_fn(xg):
            xs, ys = xg.detach().cpu().numpy(), y.cpu().numpy()  # float32: pykdtree keeps the dtype
            i_xy = KDTree(ys).query(xs, k=1)[1].astype("int64")
            i_yx = KDTree(xs).query(ys, k=1)[1].astype("int64")
            return from_indices(xg, torch.from_numpy(i_xy).to(xg.device), torch.from_numpy(i_yx).to(xg.device))
    elif method == "torch cdist (dense)":
        def loss_fn(xg):
            d2 = torch.cdist(xg, y).square()  # (N, M)
            return d2.min(1).values.mean() + d2.min(0).values.mean()
    elif method == "pykeops argmin":
        from pykeops.torch import LazyTensor

        def loss_fn(xg):
            d2 = (LazyTensor(xg.detach()[:, None, :]) - LazyTensor(y[None, :, :])).square().sum(-1)  # (N, M) lazy
            return from_indices(xg, d2.argmin(1).view(-1).long(), d2.argmin(0).view(-1).long())
    else:
        raise ValueError(f"unknown chamfer method {method!r}")

    def call():
        xg = x.clone().requires_grad_()
        loss = loss_fn(xg)
        torch.autograd.grad(loss, xg)
        return loss

    return call


REGISTER_STEPS = {1_000: 3, 5_000: 3, 50_000: 2}


def _register_call(method: str, n: int, device: str):
    """One optimiser step of a registration (its time: a call of `steps` steps / steps)."""
    import torch

    import fastlddmm as fl
    from benchmarks._common import clouds
    from fastlddmm.registration import DEFAULTS, PRESETS

    source, target = clouds(n, n, device=device)
    steps = REGISTER_STEPS.get(n, 2)
    if method == "fastlddmm register":
        def call():
            r = fl.register(source, target, steps=steps, progress=False)
            return torch.tensor(r.history["loss"][-1])
    else:  # the loop a user writes by hand: the same normalisation, flow, objective and Adam
        from geomloss import SamplesLoss

        loss_fn = SamplesLoss("sinkhorn", p=2, blur=DEFAULTS.blur, scaling=0.5, backend="online")
        center = torch.cat([source, target]).mean(0)
        scale = float((torch.cat([source, target]) - center).norm(dim=-1).max())
        src, tgt = (source - center) / scale, (target - center) / scale

        def call():
            preset = PRESETS[DEFAULTS.quality]  # register()'s defaults are its default preset's
            L, H = preset.layers, preset.width
            with torch.random.fork_rng(devices=[]):  # the parameters fl.register starts from (its seed, its init)
                torch.manual_seed(DEFAULTS.seed)
                start = fl.ResNetFlow(dim=3, width=H, layers=L, activation=DEFAULTS.activation)
            params = [torch.nn.Parameter(p.detach().clone()) for p in
                      (start.weight1, start.bias1, start.weight2, start.bias2)]
            opt = torch.optim.Adam(params, lr=5e-3)
            for _ in range(steps):
                opt.zero_grad()
                moved, energy = fl.reference.euler_flow(src, *params, 1.0 / L, DEFAULTS.activation)
                loss = loss_fn(moved, tgt) / (2 * preset.sigma**2) + energy
                loss.backward()
                opt.step()
            return loss.detach()

    call.steps = steps
    return call


def worker(spec: dict) -> dict:
    import torch

    device = spec["device"]
    make = {"flow": lambda: _flow_call(spec["method"], spec["points"], spec["width"], device),
            "sinkhorn": lambda: _sinkhorn_call(spec["method"], spec["points"], device),
            "chamfer": lambda: _chamfer_call(spec["method"], spec["points"], device),
            "register": lambda: _register_call(spec["method"], spec["points"], device)}[spec["op"]]
    call = make()
    warmup = None
    if spec["method"] != "reference torch.compile" and spec["points"] > WARMUP_POINTS:
        # what warms up here (KeOps formulas, thread pools) does not depend on N: a small call will do
        warmup = {"flow": lambda: _flow_call(spec["method"], WARMUP_POINTS, spec["width"], device),
                  "sinkhorn": lambda: _sinkhorn_call(spec["method"], WARMUP_POINTS, device),
                  "chamfer": lambda: _chamfer_call(spec["method"], WARMUP_POINTS, device),
                  "register": lambda: _register_call(spec["method"], 1_000, device)}[spec["op"]]()
    value = []
    result = _measure.measure(lambda: value.append(call()), repeat=spec["repeat"], device=device, slow_s=spec["slow"],
                              warmup=warmup)
    result["value"] = float(value[-1].detach())
    if spec["op"] == "register":  # a call ran several steps: report one
        result["time_s"] /= call.steps
        result["steps_per_call"] = call.steps
    result["threads"] = torch.get_num_threads()
    return result


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _fmt(v, unit=""):
    if v is None:
        return "-"
    return f"{v:.3g}{unit}" if abs(v) < 1000 else f"{v:.0f}{unit}"


def _with_ratios(cases: list[dict]) -> None:
    base = {(c["op"], c["points"], c["width"]): c for c in cases if c["method"] == BASELINE[c["op"]] and "time_s" in c}
    for c in cases:
        b = base.get((c["op"], c["points"], c["width"]))
        if b is None or "time_s" not in c:
            continue
        c["time_ratio"] = c["time_s"] / b["time_s"]
        # below 1 MiB (a few pages) the baseline's extra memory is noise: no ratio to it
        c["memory_ratio"] = c["peak_extra_mib"] / b["peak_extra_mib"] if b["peak_extra_mib"] >= 1 else None


def markdown(report: dict) -> str:
    m = report["machine"]
    load_before, load_after = m["load_average"], report["load_average_after"]
    lines = [
        f"# fastlddmm comparison ({report['device']})", "",
        f"Command: `{report['command']}`  ",
        f"Date (UTC): {m['date_utc']}, wall time of the run: {report['wall_s']:.0f} s  ",
        f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores, {m.get('memory_gib', '?')} GiB"
        + (f", GPU {m['gpu']}" if "gpu" in m else "") + "  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + "  ",
        f"Load average (1/5/15 min) before: {'/'.join(f'{v:.2f}' for v in load_before)}, "
        f"after: {'/'.join(f'{v:.2f}' for v in load_after)}.",
    ]
    if max(load_before[0], load_after[0]) > (m["cpu_cores"] or 1):
        lines.append(f"**Other processes were running on this machine during the run (load above its {m['cpu_cores']} "
                     "cores): absolute times are inflated; the methods shared the same conditions, so compare ratios.**")
    lines += ["", f"Time: median of {report['repeat']} calls after a warm-up call (a `k×` mark: only k timed "
              f"calls, one took over {report['slow_s']:g} s). Memory: extra peak "
              + ("process RSS of the calls, each case in a fresh process." if report["device"] == "cpu"
                 else "torch.cuda memory of the calls.")
              + " Ratios: method / baseline (below 1 is better). `value`: the loss, to check the methods agree.", ""]
    titles = {"flow": f"Euler flow, {LAYERS} layers, forward + backward", "chamfer": "Chamfer, forward + backward",
              "sinkhorn": "Sinkhorn divergence (blur 0.05), forward + backward",
              "register": "One registration step (fl.register defaults: Sinkhorn blur 0.02, width 128, 10 layers, Adam)"}
    for op in OPS:
        rows = [c for c in report["cases"] if c["op"] == op]
        if not rows:
            continue
        lines += [f"## {titles[op]} (baseline: {BASELINE[op]})", "",
                  "| points | " + ("width | " if op == "flow" else "") + "method | time (s) | × baseline | peak extra (MiB) "
                  "| × baseline | value |",
                  "|---:|" + ("---:|" if op == "flow" else "") + "---|---:|---:|---:|---:|---:|"]
        for c in rows:
            head = f"| {c['points']:,} | " + (f"{c['width']} | " if op == "flow" else "") + f"{c['method']} | "
            if "time_s" not in c:
                lines.append(head + f"skipped: {c.get('skipped') or c.get('error')} | | | | |")
                continue
            once = f" ({c['calls']}×)" if "note" in c else ""
            lines.append(head + f"{c['time_s']:.4g}{once} | {_fmt(c.get('time_ratio'))} | {c['peak_extra_mib']:.1f} | "
                         f"{_fmt(c.get('memory_ratio'))} | {c['value']:.6g} |")
        lines.append("")
    lines += ["Plots: " + ", ".join(f"`{p}`" for p in report["plots"]), ""]
    return "\n".join(lines)


def plots(report: dict, out: Path, name: str = "") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for op in OPS:
        rows = [c for c in report["cases"] if c["op"] == op and "time_s" in c and (op != "flow" or c["width"] == 64)]
        if not rows:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for method in dict.fromkeys(c["method"] for c in rows):
            pts = sorted((c["points"], c["time_s"], c["peak_extra_mib"]) for c in rows if c["method"] == method)
            style = "-o" if method.startswith("fastlddmm") else "--s"
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
            axes[1].plot([p[0] for p in pts], [max(p[2], 0.1) for p in pts], style, label=method)
        for ax, ylabel in zip(axes, ("forward + backward time (s)", "extra peak memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("points N (= M)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
        extra = f", width 64, {LAYERS} layers" if op == "flow" else ""
        fig.suptitle(f"{op}{extra}, float32, {report['device']}: {report['machine']['cpu_model'] if report['device'] == 'cpu' else report['machine'].get('gpu')}",
                     fontsize=9)
        fig.tight_layout()
        fname = f"compare_{report['device']}{name}_{op}.png"
        fig.savefig(out / fname, dpi=90)
        plt.close(fig)
        names.append(fname)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes only (a minute or two)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of the .md/.json/.png files")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per case after the warm-up (median)")
    ap.add_argument("--slow", type=float, default=10.0, help="seconds: no further repeats after a slower timed call")
    ap.add_argument("--case-timeout", type=float, default=300.0, help="seconds before a case is abandoned")
    ap.add_argument("--ops", nargs="*", default=list(OPS), choices=list(OPS))
    ap.add_argument("--sizes", nargs="*", type=int, help="run only these point counts")
    ap.add_argument("--name", default="", help="suffix of the output files (compare_<device><name>.md)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # JSON case spec, in the subprocess
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: no CUDA GPU visible to torch", file=sys.stderr)
            return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = _measure.machine_info(args.device)
    start = time.perf_counter()
    cases = [c for c in plan(args.device, args.quick) if c["op"] in args.ops and (not args.sizes or c["points"] in args.sizes)]
    print(f"{len(cases)} cases on {machine['cpu_model']} ({machine['cpu_cores']} cores, load "
          f"{machine['load_average'][0]:.2f}), {args.device}", flush=True)
    for c in cases:
        if "skipped" in c:
            continue
        spec = dict(c, device=args.device, repeat=args.repeat, slow=args.slow)
        c.update(_measure.run_isolated([__file__, "--worker", json.dumps(spec)], timeout=args.case_timeout))
        shown = (f"{c['time_s']:9.4f} s {c['peak_extra_mib']:9.1f} MiB" if "time_s" in c else c.get("error"))
        print(f"  {c['op']:<9}{c['points']:>9,} {c['width'] or '':>4} {c['method']:<24} {shown}", flush=True)
    _with_ratios(cases)
    report = {"command": command, "device": args.device, "quick": args.quick, "repeat": args.repeat, "slow_s": args.slow,
              "machine": machine, "load_average_after": list(os.getloadavg()),
              "wall_s": time.perf_counter() - start, "baseline": BASELINE, "cases": cases}
    report["plots"] = plots(report, out, args.name)
    text = markdown(report)
    stem = f"compare_{args.device}{args.name}"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + text)
    print(f"wrote {out}/{stem}.md, .json and {len(report['plots'])} plots in {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
