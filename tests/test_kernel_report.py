"""CI without a GPU: every Triton kernel configuration the launchers pick (benchmarks/kernel_report.py's job
list: flow forward and backward per activation, soft-min, weighted sum and nearest kernels for p = 1 and 2,
D = 2 and 3, float32 and float64, and the generic D > 3 kernels) compiles for sm_80 and sm_90 with the
installed triton, ahead of time (triton.compile with an explicit GPUTarget, then the wheel's cuobjdump).

Fails on a compile error, on any register spill (as ptxas -v reports it), and where the fast paths lose their structure: a shuffle
or a barrier in the innermost loop of the flow forward, the soft-min forward or nearest (float32). Register
counts and instruction counts are not pinned: they move with the ptxas that each triton wheel bundles
(the report, benchmarks/results/kernel_report.md, records them).

Cost: the full job list, 86 kernels x 2 archs = 172 compilations, in os.cpu_count() worker processes
(TRITON_INTERPRET unset there, each with an empty triton cache so that ptxas always runs and reports its
spills). Measured on the 2-core machine (triton 3.9): 185 s of CPU (workers included), 4 min 41 s wall at
load average 6 (other engineers' jobs), so about 1.5 min on two free cores; it does not depend on a warm
cache. What the full report (benchmarks/kernel_report.py) adds: the same jobs with triton 3.6 (the GPU
machines' version) and the tile sweeps (--sweep) that chose the launchers' tiles.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the triton package is missing: pip install 'fastlddmm[triton]'")

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "benchmarks" / "kernel_report.py")
kr = importlib.util.module_from_spec(_spec)
sys.modules["kernel_report"] = kr  # its dataclasses look their module up there
_spec.loader.exec_module(kr)

CLEAN_LOOPS = ("flow_forward", "softmin_forward", "nearest")


@pytest.fixture(scope="module")
def rows():
    return kr.collect(list(kr.ARCHS), [None], workers=max(2, os.cpu_count() or 1))


def _where(r: dict) -> str:
    return f"{r['kernel']} [{r['config']}] {r['dtype']} sm_{r['arch']} triton {r['triton']}"


def test_every_configuration_compiles(rows):
    assert rows, "the report compiled nothing"
    errors = [f"{_where(r)}: {r['error'][:300]}" for r in rows if "error" in r]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    # Both architectures, every kind the launchers use.
    assert {r["arch"] for r in rows} == set(kr.ARCHS)
    assert {r["kind"] for r in rows} == set(kr.KINDS)


def test_no_register_spills(rows):
    spills = [f"{_where(r)}: ptxas reports {r['spill_bytes']} B of spills"
              for r in rows if "error" not in r and r["spill_bytes"]]
    assert not spills, "register spills:\n" + "\n".join(spills)


def test_fast_inner_loops_have_no_shuffle_or_barrier(rows):
    bad = []
    for r in rows:
        if "error" in r or r["kind"] not in CLEAN_LOOPS or r["dtype"] != "float32":
            continue
        loop = r["inner_loop"]
        if r["_loops"] != 1:
            bad.append(f"{_where(r)}: {r['_loops']} innermost loops, expected the one tile loop")
        if loop["shuffles"] or loop["barriers"]:
            bad.append(f"{_where(r)}: {loop['shuffles']} SHFL, {loop['barriers']} BAR in the innermost loop")
    assert not bad, "\n".join(bad)


def test_rows_follow_the_issue_schema(rows):
    keys = {"kernel", "kind", "arch", "triton", "dtype", "config", "regs", "spill_bytes", "shared_bytes", "inner_loop"}
    loop_keys = {"unit", "instructions_per_unit", "shuffles", "barriers", "mufu_per_unit"}
    for r in kr.rows_for_json(rows):
        assert set(r) == keys, r
        assert set(r["inner_loop"]) == loop_keys, r
        assert r["kind"] in kr.KINDS and r["arch"] in (80, 90) and r["dtype"] in ("float32", "float64")
        assert r["inner_loop"]["instructions_per_unit"] > 0, r
