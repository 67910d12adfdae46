"""`fastlddmm batch` on Ray: three tiny pairs on a local 2-CPU Ray, resume, failures, engines, usage errors.

Ray is started once for the module (through the runner's own start-up code) and every CLI call in the
tests reuses it, as a driver script or notebook that has already called ray.init would.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlddmm import batch, cli
from fastlddmm.io import write_points

# A registration small enough to take a fraction of a second on a CPU.
TINY = ["--steps", "4", "--width", "8", "--layers", "3", "--data-term", "chamfer", "--checkpoint-every", "2",
        "--no-pictures"]
PAIR_FILES = ("warped.csv", "trajectory.npy", "registration.pt", "summary.json", "checkpoint.pt")
SIZES = {"a": 17, "b": 23, "c": 19}  # odd sizes, one per pair, so that a mixed-up row shows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Three pairs (a target is the source stretched and moved) and their manifest, pairs.csv."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(5)
    lines = ["source,target,name"]
    for k, (name, n) in enumerate(SIZES.items()):
        src = rng.normal(size=(n, 2))
        write_points(folder / f"{name}_src.csv", src)
        write_points(folder / f"{name}_tgt.csv", src * (1.1 + 0.1 * k) + 0.2)
        lines.append(f"{name}_src.csv,{name}_tgt.csv,{name}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    broken = folder / "broken.npy"
    np.save(broken, np.zeros((5, 2)))
    broken.write_bytes(broken.read_bytes()[:-7])
    return folder


def _manifest(folder: Path, tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "m.csv"
    path.write_text("source,target,name\n" + "".join(f"{folder / s},{folder / t},{n}\n" for s, t, n in
                                                       (r.split(",") for r in rows)))
    return path


def _rows(out: Path) -> list[dict]:
    with (out / "summary.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("fastlddmm: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def _ray_module():
    ray = pytest.importorskip("ray", reason="the Ray engine needs Ray: pip install 'fastlddmm[ray]'")
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def local_ray(_ray_module, monkeypatch):
    """A local Ray with 2 CPUs (two pairs at a time), started by the runner's own code on first use."""
    ray = _ray_module
    if not ray.is_initialized():
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(batch, "_local_cores", lambda: 2)
        assert batch._start_ray(None, cpus_per_pair=1, gpus_per_pair=0.0, quiet=True)
    assert ray.cluster_resources()["CPU"] == 2
    return ray


def _no_local_engine(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the local engine ran instead of Ray")

    monkeypatch.setattr(batch, "run_local", refuse)


def test_three_pairs_on_ray_then_resume_after_one_is_removed(local_ray, inputs, tmp_path, monkeypatch):
    _no_local_engine(monkeypatch)
    out = tmp_path / "out"
    args = ["batch", str(inputs / "pairs.csv"), "-o", str(out), "--engine", "ray", "-q", *TINY]
    assert cli.main(args) == 0
    first = _rows(out)
    assert [r["name"] for r in first] == list(SIZES)  # manifest order, whatever order the tasks ended in
    assert [r["status"] for r in first] == ["ok"] * 3
    for row in first:
        folder = out / row["name"]
        for name in PAIR_FILES:
            assert (folder / name).is_file(), f"{row['name']}/{name}"
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["points"]["source"] == SIZES[row["name"]] and summary["steps"] == 4
        assert row["source"] == str(inputs / f"{row['name']}_src.csv")
        # the table holds the pair's own numbers, written at full precision
        assert float(row["final_loss"]) == summary["final"]["loss"] > 0
        assert float(row["data"]) == summary["final"]["data"] > 0
        assert float(row["energy"]) == summary["final"]["energy"] > 0
        assert float(row["min_jacobian_det"]) == summary["min_jacobian_determinant"] > 0
        assert int(row["folds"]) == summary["folds"] == 0
        assert float(row["seconds"]) >= 0
        assert np.load(folder / "trajectory.npy").shape == (4, SIZES[row["name"]], 2)  # layers + 1 states

    kept = {p: p.stat().st_mtime_ns for name in ("a", "c") for p in (out / name).iterdir()}
    shutil.rmtree(out / "b")
    assert cli.main(args) == 0
    second = _rows(out)
    assert [r["status"] for r in second] == ["done (earlier run)", "ok", "done (earlier run)"]
    assert {p: p.stat().st_mtime_ns for name in ("a", "c") for p in (out / name).iterdir()} == kept
    for name in PAIR_FILES:
        assert (out / "b" / name).is_file(), f"b/{name}"
    number_columns = ("final_loss", "data", "energy", "min_jacobian_det", "folds")
    for before, after in zip(first, second):  # done rows come from summary.json; b is recomputed, same seed
        assert {k: after[k] for k in number_columns} == {k: before[k] for k in number_columns}, after["name"]
    assert local_ray.is_initialized()  # the caller's Ray is left running


def test_ray_and_local_engines_write_the_same_registration(local_ray, inputs, tmp_path):
    manifest = _manifest(inputs, tmp_path, "b_src.csv,b_tgt.csv,b")
    threads = torch.get_num_threads()
    # One torch thread in both: a reduction split over another number of threads may round differently.
    common = [str(manifest), "-q", "--seed", "7", "--cpus-per-pair", "1", *TINY]
    assert cli.main(["batch", "-o", str(tmp_path / "ray"), "--engine", "ray", *common]) == 0
    assert cli.main(["batch", "-o", str(tmp_path / "local"), "--engine", "local", *common]) == 0
    assert torch.get_num_threads() == threads  # the local engine gives torch its thread count back
    on_ray = json.loads((tmp_path / "ray" / "b" / "summary.json").read_text())
    local = json.loads((tmp_path / "local" / "b" / "summary.json").read_text())
    for key in ("final", "min_jacobian_determinant", "folds", "steps", "points", "config", "source"):
        assert on_ray[key] == local[key], key
    assert on_ray["config"]["seed"] == 7
    np.testing.assert_array_equal(np.load(tmp_path / "ray" / "b" / "trajectory.npy"),
                                  np.load(tmp_path / "local" / "b" / "trajectory.npy"))
    assert (tmp_path / "ray" / "b" / "warped.csv").read_bytes() == (tmp_path / "local" / "b" / "warped.csv").read_bytes()
    ray_rows, local_rows = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in ray_rows] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in local_rows]


def test_a_failing_pair_does_not_stop_the_others(local_ray, inputs, tmp_path, monkeypatch, capsys):
    _no_local_engine(monkeypatch)
    manifest = _manifest(inputs, tmp_path, "broken.npy,a_tgt.csv,bad", "a_src.csv,a_tgt.csv,good",
                         "c_src.csv,missing.csv,lost")
    out = tmp_path / "out"
    assert cli.main(["batch", str(manifest), "-o", str(out), "--engine", "ray", "-q", *TINY]) == 1
    rows = _rows(out)
    assert [r["name"] for r in rows] == ["bad", "good", "lost"]
    assert rows[0]["status"].startswith(f"error: cannot read {str(inputs / 'broken.npy')!r}")
    assert rows[1]["status"] == "ok" and float(rows[1]["final_loss"]) > 0 and rows[1]["folds"] == "0"
    assert rows[2]["status"].startswith("error: ") and "no such file" in rows[2]["status"]
    assert rows[0]["final_loss"] == rows[2]["final_loss"] == ""
    assert (out / "good" / "summary.json").is_file()
    err = capsys.readouterr().err
    assert "fastlddmm: bad: cannot read" in err and "fastlddmm: lost: " in err


def test_ray_task_gives_torch_its_cpu_share(local_ray, inputs, tmp_path, monkeypatch):
    seen = []

    def spy(pair, outdir, **kwargs):
        seen.append((torch.get_num_threads(), kwargs["options"].get("device")))
        return {"name": pair["name"], "status": "ok"}

    monkeypatch.setattr(batch, "register_pair", spy)
    pair = batch.read_manifest(inputs / "pairs.csv")[0]
    threads = torch.get_num_threads()
    try:
        for k in (1, 2):
            batch._ray_task(pair, tmp_path, options={"device": None}, force=False, pictures=False, threads=k,
                            driver=batch.package_identity())
    finally:
        torch.set_num_threads(threads)
    assert seen == [(1, None), (2, None)]  # no GPU assigned: the device stays as asked


def test_a_source_checkout_in_the_current_directory_is_not_what_workers_import(tmp_path, monkeypatch):
    """Ray puts the driver's current directory first on the workers' sys.path: run from a fastlddmm source
    checkout with the package installed elsewhere, workers would import the checkout (no compiled extension).
    The runner sees it, and starts Ray with an empty working directory instead."""
    assert batch._shadowing_checkout(Path(batch.package_identity()["path"]).parent) is None  # the package itself
    (tmp_path / "fastlddmm").mkdir()
    (tmp_path / "fastlddmm" / "__init__.py").write_text("")
    assert batch._shadowing_checkout(tmp_path) == tmp_path / "fastlddmm"
    assert batch._shadowing_checkout(tmp_path / "elsewhere") is None


def test_a_worker_running_another_fastlddmm_build_refuses_the_pair(inputs, tmp_path, monkeypatch):
    pair = batch.read_manifest(inputs / "pairs.csv")[0]
    driver = {**batch.package_identity(), "compiled": True, "path": "/site-packages/fastlddmm"}
    monkeypatch.setattr(batch, "package_identity", lambda: {**driver, "compiled": False, "path": "/checkout/fastlddmm"})
    monkeypatch.setattr(batch, "register_pair", lambda *a, **k: pytest.fail("the pair must not be registered"))
    threads = torch.get_num_threads()
    try:
        row = batch._ray_task(pair, tmp_path, options={}, force=False, pictures=False, threads=1, driver=driver)
    finally:
        torch.set_num_threads(threads)
    assert row["status"].startswith("error: this Ray worker runs fastlddmm") and "/checkout/fastlddmm" in row["status"]
    assert "without its compiled extension" in row["status"]


def test_engine_ray_without_ray_is_a_usage_error(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "out"
    manifest = str(inputs / "pairs.csv")
    assert cli.main(["batch", manifest, "-o", str(out), "--engine", "ray", *TINY]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--engine ray needs Ray" in line and "pip install 'fastlddmm[ray]'" in line
    assert cli.main(["batch", manifest, "-o", str(out), "--address", "ray://head:10001", *TINY]) == 2
    assert "--address needs Ray" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()
    # auto: one line saying how to get Ray, then the pairs one after the other
    one = _manifest(inputs, tmp_path, "a_src.csv,a_tgt.csv,a")
    assert cli.main(["batch", str(one), "-o", str(out), *TINY]) == 0
    err = capsys.readouterr().err
    assert "Ray is not installed" in err and "pip install 'fastlddmm[ray]'" in err
    assert [r["status"] for r in _rows(out)] == ["ok"]


def test_scheduling_usage_errors(inputs, tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray", reason="the Ray engine needs Ray: pip install 'fastlddmm[ray]'")

    def no_start(*args, **kwargs):
        raise AssertionError("Ray must not be started for an impossible request")

    # as if no Ray were running in this process, on a 2-core machine without a GPU
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_start)
    monkeypatch.setattr(batch, "_local_cores", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    manifest = str(inputs / "pairs.csv")
    base = ["batch", manifest, "-o", str(tmp_path / "o"), "--engine", "ray", *TINY]
    assert cli.main(base + ["--cpus-per-pair", "3"]) == 2
    assert "--cpus-per-pair 3: this machine has 2 CPU cores" in _one_error_line(capsys.readouterr().err)
    assert cli.main(base + ["--gpus-per-pair", "1"]) == 2
    assert "no CUDA GPU" in _one_error_line(capsys.readouterr().err)
    assert cli.main(base + ["--gpus-per-pair", "1", "--device", "cpu"]) == 2
    assert "--gpus-per-pair with --device cpu" in _one_error_line(capsys.readouterr().err)
    assert cli.main(base + ["--gpus-per-pair", "2"]) == 2
    assert "expected a number of GPUs between 0 and 1" in _one_error_line(capsys.readouterr().err)
    local = ["batch", manifest, "-o", str(tmp_path / "o"), "--engine", "local", *TINY]
    assert cli.main(local + ["--address", "ray://head:10001"]) == 2
    assert "--address is for the Ray engine" in _one_error_line(capsys.readouterr().err)


def test_runner_shuts_down_the_ray_it_started(local_ray, inputs, tmp_path, monkeypatch):
    # Last on purpose: it takes the module's Ray down (local_ray starts a new one if a test follows).
    monkeypatch.setattr(batch, "_start_ray", lambda *args, **kwargs: True)  # as if the runner had started it
    manifest = _manifest(inputs, tmp_path, "c_src.csv,c_tgt.csv,c")
    assert cli.main(["batch", str(manifest), "-o", str(tmp_path / "out"), "--engine", "ray", "-q", *TINY]) == 0
    assert _rows(tmp_path / "out")[0]["status"] == "ok"
    assert not local_ray.is_initialized()
