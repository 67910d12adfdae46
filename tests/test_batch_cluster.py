"""`fastlddmm batch --address`: the pairs go to an already running Ray cluster (`ray start --head` on this
machine standing in for a cluster's head node), and the runner leaves that cluster running.

Runs after tests/test_batch.py has shut its in-process Ray down (module order); `ray stop` at the end
stops every Ray process of this user on the machine.
"""

from __future__ import annotations

import csv
import os
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="install the ray extra (pip install 'fastlddmm[ray]') to test the cluster path")

RAY = shutil.which("ray", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    """The address of a fresh one-node Ray cluster; stopped afterwards."""
    if RAY is None:
        pytest.skip("the `ray` command is not on PATH beside this Python")
    port = _free_port()
    # The head and the driver must agree on authentication (Ray 2.59+ defaults differ between `ray start`
    # and ray.init): token mode, with a token of this test's own in the environment of both.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    start = subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)
    assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_batch_runs_the_pairs_on_a_running_cluster_and_leaves_it_up(cluster, tmp_path):
    address, env = cluster
    rng = np.random.default_rng(11)
    lines = ["source,target"]
    for k in range(3):
        src = rng.normal(size=(15 + 2 * k, 2))
        np.save(tmp_path / f"s{k}.npy", src)
        np.save(tmp_path / f"t{k}.npy", src * 1.2 + 0.1)
        lines.append(f"s{k}.npy,t{k}.npy")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "fastlddmm", "batch", str(tmp_path / "pairs.csv"), "-o", str(tmp_path / "out"),
           "--address", address, "--engine", "ray", "--steps", "3", "--width", "8", "--layers", "2",
           "--data-term", "chamfer", "--no-pictures", "-q"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with (tmp_path / "out" / "summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["s0", "s1", "s2"]
    assert all(r["status"] == "ok" and float(r["final_loss"]) > 0 and r["folds"] == "0" for r in rows), rows
    # The runner connected to the cluster, it did not start it: the cluster must still answer.
    status = subprocess.run([RAY, "status", f"--address={address}"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert status.returncode == 0, status.stdout[-2000:] + status.stderr[-2000:]
