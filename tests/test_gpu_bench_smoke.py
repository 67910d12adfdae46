"""Smoke run of benchmarks/gpu_distances.py on the CPU: it runs, writes its tables, and its figures hang
together (the GPU figures themselves come from a lent GPU machine: benchmarks/README.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
# Cheap on a CPU: no KeOps formula beyond GeomLoss online's (the Sinkhorn reference of every error),
# and Triton only where the interpreter is on (conftest sets TRITON_INTERPRET=1 when there is no GPU).
METHODS = ["geomloss-online", "fl-triton", "fl-reference", "flash-sinkhorn", "chamfer-reference", "chamfer-triton",
           "chamfer-auto"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_bench")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_distances.py"), "--device", "cpu", "--sizes", str(SIZE),
           "--repeat", "2", "--output-dir", str(out), "--methods", *METHODS]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, f"gpu_distances.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def _cases(report):
    return {c["method"]: c for c in report["cases"]}


def test_writes_md_and_json_with_environment(smoke):
    out, _ = smoke
    assert sorted(p.name for p in out.iterdir()) == ["gpu_distances_cpu.json", "gpu_distances_cpu.md"]
    report = json.loads((out / "gpu_distances_cpu.json").read_text())
    assert report["device"] == "cpu" and report["device_type"] == "cpu"
    env = report["environment"]
    for package in ("torch", "triton", "pykeops", "geomloss", "flash-sinkhorn"):
        assert package in env["versions"], f"version of {package} not recorded"
    assert env["versions"]["torch"].startswith(".".join(__import__("torch").__version__.split(".")[:2]))
    assert env["date_utc"][:2] == "20" and "gpu_distances.py" in env["command"] and "--sizes 64" in env["command"]
    assert report["settings"]["sizes"] == [SIZE] and report["settings"]["blur"] == 0.05
    methods = [c["method"] for c in report["cases"]]
    assert sorted(methods) == sorted(METHODS)  # every method asked for has a row
    assert methods[0] == "geomloss-online"  # the Sinkhorn reference runs first
    md = (out / "gpu_distances_cpu.md").read_text()
    for heading in ("## Sinkhorn divergence", "## Chamfer distance", '## backend="auto"', "## Issue 13's targets"):
        assert heading in md
    assert "Command: `" in md and "Versions: " in md and f"| {SIZE} |" in md


def test_each_case_is_measured_or_says_why_not(smoke):
    out, _ = smoke
    report = json.loads((out / "gpu_distances_cpu.json").read_text())
    for case in report["cases"]:
        assert case["status"] in ("ok", "skipped", "not installed", "error"), case
        if case["status"] == "ok":
            assert case["time_s"] > 0 and case["calls"] >= 1 and case["peak_mib"] >= 0 and case["finite"], case
        else:
            assert case["reason"], f"{case['method']}: {case['status']} without a reason"
    cases = _cases(report)
    assert cases["flash-sinkhorn"]["status"] in ("skipped", "not installed")  # CUDA-only: never runs on a CPU
    assert cases["fl-reference"]["status"] == "ok" and cases["chamfer-reference"]["status"] == "ok"
    assert cases["chamfer-auto"]["status"] == "ok"
    triton_interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    assert (cases["fl-triton"]["status"] == "ok") == triton_interpreted, cases["fl-triton"]


def test_errors_are_against_the_references(smoke):
    out, _ = smoke
    report = json.loads((out / "gpu_distances_cpu.json").read_text())
    cases = _cases(report)
    for method in ("chamfer-triton", "chamfer-auto"):
        if cases[method]["status"] == "ok":
            assert cases[method]["reference"] == "chamfer-reference"
            assert cases[method]["value_rel_err"] < 1e-6  # exact nearest neighbours, same formula
    if cases["geomloss-online"]["status"] != "ok":
        pytest.skip(f"no GeomLoss here ({cases['geomloss-online']['reason']}): pip install geomloss pykeops")
    assert cases["geomloss-online"]["value_rel_err"] == 0
    for method in ("fl-reference", "fl-triton"):
        if cases[method]["status"] == "ok":  # the same problem as GeomLoss: float32 rounding apart
            assert cases[method]["reference"] == "geomloss-online"
            assert cases[method]["value_rel_err"] < 1e-4 and cases[method]["grad_rel_err"] < 1e-3, cases[method]


def test_auto_picks_and_targets_are_reported(smoke):
    out, stdout = smoke
    report = json.loads((out / "gpu_distances_cpu.json").read_text())
    (auto,) = report["auto"]
    assert auto["size"] == SIZE
    # 64 x 64 CPU float32 clouds: what the dispatch table picks for them (the C++ kernels where built)
    from fastlddmm import dispatch

    pr = dispatch.Problem(device="cpu", dtype=torch.float32, dim=3, n=SIZE, m=SIZE)
    assert auto["sinkhorn"] == dispatch.choose("softmin", "auto", pr)
    assert auto["chamfer"] == dispatch.choose("nearest", "auto", pr)
    assert f"auto picks sinkhorn -> {auto['sinkhorn']}, chamfer -> {auto['chamfer']}" in stdout
    checks = {r["op"]: r for r in report["auto_check"]}
    assert checks["chamfer"]["fastest_measured"] in ("reference", "triton")
    targets = {r["target"]: r for r in report["targets"]}
    flash = targets["sinkhorn: fl-triton time / flash-sinkhorn time <= 1.0"]
    assert flash["measured"] is None and flash["met"] is None  # flash-sinkhorn cannot run here
