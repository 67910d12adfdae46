"""The "before" rows of the kernel report: the Triton kernels of commit 0ceec05 (issue 19's starting point),
compiled at their own launchers' tiles (D = 3, float32, N = M = 10^6, H = 500) for sm_80 and sm_90 with the
installed triton and triton 3.6, and read by benchmarks/kernel_report.py's analysis. No GPU.

    python benchmarks/kernel_report_before.py [--rev 0ceec05] [--out benchmarks/results/kernel_report_before.json]

kernel_report.py then sets these rows beside its own ("Before → after" in its Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import kernel_report as kr  # noqa: E402


def _jobs() -> list:
    import torch

    from oldk import euler_flow as E  # the old kernels, extracted by main()
    from oldk import softmin as S

    jobs = []
    for act in ("relu", "tanh", "softplus"):
        for bwd in (False, True):
            bn, bh, bd, w = E._configs(kr.N_POINTS, kr.WIDTH, 3, torch.float32, backward=bwd)
            c = dict(ACT=E._ACT_CODE[act], BLOCK_N=bn, BLOCK_H=bh, BLOCK_D=bd)
            if not bwd:
                c["STORE_STATES"] = True
            jobs.append(kr.Job("oldk.euler_flow", "_euler_flow_bwd_kernel" if bwd else "_euler_flow_fwd_kernel",
                               "flow_backward" if bwd else "flow_forward", "float32", c, w, bn * bh,
                               "point x hidden unit", dict(L=10, H=kr.WIDTH, D=3),
                               "euler_flow " + ("backward" if bwd else "forward")))
    for key, fn, kind, label, _ in kr._SOFTMIN_KERNELS:
        for p in (2, 1):
            bn, bm, bd, w = S.configs(key, kr.N_POINTS, kr.N_POINTS, 3, torch.float32)
            jobs.append(kr.Job("oldk.softmin", fn, kind, "float32", dict(P=p, BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd), w,
                               bn * bm, "pair", dict(D=3), label))
    bn, bm, bd, w = S.configs("nearest", kr.N_POINTS, kr.N_POINTS, 3, torch.float32)
    jobs.append(kr.Job("oldk.nearest", "_nearest_kernel", "nearest", "float32", dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd),
                       w, bn * bm, "pair", dict(D=3), "nearest"))
    return jobs


def _worker(arch: int, out: str) -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    Path(out).write_text(json.dumps([kr.run_job(j, arch) for j in _jobs()]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="0ceec05")
    ap.add_argument("--out", default=str(kr.RESULTS / "kernel_report_before.json"))
    ap.add_argument("--triton36", default=str(kr.DEFAULT_TRITON36))
    args = ap.parse_args()
    tritons, notes = kr._tritons(argparse.Namespace(triton36=args.triton36, install_triton36=False))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "oldk"
        pkg.mkdir()
        for name in ("__init__", "euler_flow", "softmin", "nearest"):
            src = subprocess.run(["git", "-C", str(kr.ROOT), "show", f"{args.rev}:kernels/{name}.py"], check=True,
                                 capture_output=True, text=True).stdout
            (pkg / f"{name}.py").write_text(src)
        for i, path in enumerate(tritons):
            for arch in kr.ARCHS:
                out = Path(tmp) / f"rows-{i}-{arch}.json"
                env = kr._worker_env(path)
                env["TRITON_CACHE_DIR"] = str(out) + ".cache"
                env["PYTHONPATH"] = os.pathsep.join([tmp] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
                code = (f"import sys; sys.path.insert(0, {str(HERE)!r}); import kernel_report_before as b; "
                        f"b._worker({arch}, {str(out)!r})")
                proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                rows += json.loads(out.read_text())
    Path(args.out).write_text(json.dumps({"rev": args.rev, "notes": notes, "rows": kr.rows_for_json(rows)}, indent=1) + "\n")
    print(f"{len(rows)} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
