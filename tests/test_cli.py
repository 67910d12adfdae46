"""The fastlddmm command line: outputs of register / batch / demo, refusals, one-line errors, exit codes."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import fastlddmm as fl
from fastlddmm import cli
from fastlddmm.io import MeshInfo, read_points, write_points

# A registration small enough to take a fraction of a second on a CPU.
TINY = ["--steps", "4", "--width", "8", "--layers", "3", "--data-term", "chamfer", "--checkpoint-every", "2"]

try:
    import matplotlib  # noqa: F401
    import PIL  # noqa: F401

    HAVE_VIZ = True
except ImportError:
    HAVE_VIZ = False


def _pair(tmp_path, ext=".csv", n=23, dim=2):
    rng = np.random.default_rng(1)
    src = rng.normal(size=(n, dim))
    tgt = src * 1.2 + 0.3
    write_points(tmp_path / f"src{ext}", src)
    write_points(tmp_path / f"tgt{ext}", tgt)
    return tmp_path / f"src{ext}", tmp_path / f"tgt{ext}", src


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("fastlddmm: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.skipif(not HAVE_VIZ, reason="the pictures need matplotlib and pillow: pip install 'fastlddmm[viz]'")
def test_register_writes_every_output(tmp_path, capsys):
    src_file, tgt_file, src = _pair(tmp_path)
    out = tmp_path / "out"
    assert cli.main(["register", str(src_file), str(tgt_file), "-o", str(out), "--quiet", *TINY]) == 0
    for name in ("warped.csv", "trajectory.npy", "flow.gif", "losses.png", "registration.png", "registration.pt",
                 "summary.json", "checkpoint.pt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["points"] == {"source": 23, "target": 23, "dim": 2}
    assert set(summary["final"]) == {"loss", "data", "energy"}
    assert summary["folds"] == 0 and summary["min_jacobian_determinant"] > 0
    assert summary["config"]["data_term"] == "chamfer" and summary["config"]["width"] == 8
    # the outputs agree with each other: warped = saved registration applied to the source
    reg = fl.Registration.load(out / "registration.pt")
    warped, _ = read_points(out / "warped.csv")
    expected = reg.transform(torch.from_numpy(src).float()).double().numpy()
    np.testing.assert_allclose(warped, expected, rtol=1e-6, atol=1e-6)  # float32 flow, written in float64
    traj = np.load(out / "trajectory.npy")
    assert traj.shape == (4, 23, 2)  # layers + 1 states
    np.testing.assert_allclose(traj[-1], warped, rtol=1e-5, atol=1e-5)
    assert capsys.readouterr().out.strip() == str(out)  # --quiet prints only where the results are


def test_register_refuses_existing_outdir_without_force(tmp_path, capsys):
    src_file, tgt_file, _ = _pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code = cli.main(["register", str(src_file), str(tgt_file), "-o", str(out), "--quiet", "--no-pictures", *TINY])
    assert code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--force" in line and str(out) in line
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]  # nothing touched
    code = cli.main(["register", str(src_file), str(tgt_file), "-o", str(out), "--quiet", "--no-pictures", "--force",
                     *TINY])
    assert code == 0 and (out / "summary.json").is_file() and (out / "mine.txt").read_text() == "keep me"


def test_register_resume_continues_from_the_checkpoint(tmp_path):
    src_file, tgt_file, _ = _pair(tmp_path)
    out = tmp_path / "out"
    args = ["register", str(src_file), str(tgt_file), "-o", str(out), "--quiet", "--no-pictures", *TINY]
    assert cli.main(args) == 0
    first = json.loads((out / "summary.json").read_text())
    first_losses = fl.Registration.load(out / "registration.pt").history["loss"]
    # change the source: a fresh start would record other losses, a resumed run keeps the first 4
    write_points(src_file, read_points(src_file)[0] * 0.5)
    assert cli.main(args + ["--resume", "--steps", "6"]) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["steps"] == 6  # 4 steps from the checkpoint + 2 new ones
    reg = fl.Registration.load(out / "registration.pt")
    assert len(reg.history["loss"]) == 6
    assert reg.history["loss"][:4] == first_losses and first_losses[3] == first["final"]["loss"]


@pytest.mark.skipif(not HAVE_VIZ, reason="needs matplotlib and pillow for the 3-D pictures: pip install 'fastlddmm[viz]'")
def test_register_mesh_keeps_faces(tmp_path):
    pytest.importorskip("meshio", reason="mesh formats need meshio: pip install meshio")
    from fastlddmm.data import load_example

    blob = load_example("blob")
    keep = 60  # a small patch of the mesh: the faces among its first vertices
    faces = blob["faces"][(blob["faces"] < keep).all(1)]
    write_points(tmp_path / "s.ply", blob["source"][:keep], like=MeshInfo(".ply", 3, cells=[("triangle", faces)]))
    write_points(tmp_path / "t.ply", blob["target"][:50])
    out = tmp_path / "out"
    assert cli.main(["register", str(tmp_path / "s.ply"), str(tmp_path / "t.ply"), "-o", str(out), "-q", *TINY]) == 0
    warped, info = read_points(out / "warped.ply")
    assert warped.shape == (keep, 3)
    np.testing.assert_array_equal(info.cells[0][1], faces)
    assert (out / "flow.gif").is_file()


def test_register_mesh_with_a_quality_preset_reports_its_folds(tmp_path):
    """--quality balanced on a mesh: the preset's stages (coarse, fine, L-BFGS) and fold barrier are what ran,
    and summary.json counts the flipped triangles."""
    pytest.importorskip("meshio", reason="mesh formats need meshio: pip install meshio")
    from fastlddmm.data import load_example
    from fastlddmm.registration import PRESETS

    blob = load_example("blob")
    keep = 80
    faces = blob["faces"][(blob["faces"] < keep).all(1)]
    write_points(tmp_path / "s.ply", blob["source"][:keep], like=MeshInfo(".ply", 3, cells=[("triangle", faces)]))
    write_points(tmp_path / "t.ply", blob["target"][:70])
    out = tmp_path / "out"
    assert cli.main(["register", str(tmp_path / "s.ply"), str(tmp_path / "t.ply"), "-o", str(out), "-q",
                     "--no-pictures", "--quality", "balanced", "--steps", "10", "--width", "8", "--layers", "3",
                     "--data-term", "chamfer"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    balanced = PRESETS["balanced"]
    assert config["quality"] == "balanced" and config["fold_penalty"] == balanced.fold_penalty > 0
    assert [st["optimizer"] for st in config["schedule"]] == ["adam", "adam", "lbfgs"]
    assert config["schedule"][0]["sigma"] > config["schedule"][1]["sigma"] == config["schedule"][2]["sigma"]
    assert sum(st["steps"] for st in config["schedule"][:2]) == 10 and config["schedule"][2]["steps"] == balanced.refine
    assert summary["triangles"] == len(faces)
    assert 0 <= summary["flipped_triangles"] <= len(faces)
    assert summary["flipped_fraction"] == pytest.approx(summary["flipped_triangles"] / len(faces))


def _bad_file(tmp_path):
    path = tmp_path / "broken.npy"
    np.save(path, np.zeros((5, 2)))
    path.write_bytes(path.read_bytes()[:-7])
    return path


@pytest.mark.parametrize("extra, fragment", [
    (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["--sigma", "-1"], "argument --sigma: expected a positive finite number"),
    (["--sigma", "nan"], "argument --sigma"),
    (["--data-term", "emd"], "argument --data-term: invalid choice: 'emd'"),
    (["--lr", "fast"], "argument --lr"),
    (["--device", "tpu:0"], "argument --device"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, capsys, extra, fragment):
    src_file, tgt_file, _ = _pair(tmp_path)
    code = cli.main(["register", str(src_file), str(tgt_file), "-o", str(tmp_path / "o"), *extra])
    assert code == 2
    assert fragment in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a missing GPU: run on a CPU-only machine")
def test_cuda_device_without_gpu_is_a_usage_error(tmp_path, capsys):
    src_file, tgt_file, _ = _pair(tmp_path)
    assert cli.main(["register", str(src_file), str(tgt_file), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in _one_error_line(capsys.readouterr().err)


def test_bad_files_exit_2_with_one_line(tmp_path, capsys):
    src_file, tgt_file, _ = _pair(tmp_path)
    broken = _bad_file(tmp_path)
    assert cli.main(["register", str(broken), str(tgt_file), "-o", str(tmp_path / "o1"), "-q"]) == 2
    assert f"cannot read {str(broken)!r}" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["register", str(src_file), str(tmp_path / "missing.ply"), "-o", str(tmp_path / "o2"), "-q"]) == 2
    assert "no such file" in _one_error_line(capsys.readouterr().err)
    write_points(tmp_path / "three.npy", np.zeros((4, 3)) + np.arange(3))
    assert cli.main(["register", str(src_file), str(tmp_path / "three.npy"), "-o", str(tmp_path / "o3"), "-q"]) == 2
    assert "2-D points but target" in _one_error_line(capsys.readouterr().err)
    # l2 needs one target point per source point: the library's ValueError becomes one line too
    write_points(tmp_path / "short.csv", np.ones((5, 2)) * np.arange(5)[:, None])
    code = cli.main(["register", str(src_file), str(tmp_path / "short.csv"), "-o", str(tmp_path / "o4"), "-q",
                     "--data-term", "l2"])
    assert code == 2
    assert "l2" in _one_error_line(capsys.readouterr().err)


def test_divergence_exits_1_and_keeps_the_partial_result(tmp_path, capsys, monkeypatch):
    src_file, tgt_file, _ = _pair(tmp_path)

    class Partial:
        def save(self, path):
            Path(path).write_text("partial")

    def diverging(*args, **kwargs):
        raise fl.RegistrationDiverged("registration diverged at step 3: the loss is not finite", 3, Partial())

    monkeypatch.setattr(fl, "register", diverging)
    out = tmp_path / "out"
    assert cli.main(["register", str(src_file), str(tgt_file), "-o", str(out), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastlddmm: failed: registration diverged at step 3") and "\n" not in err
    assert (out / "registration.partial.pt").read_text() == "partial"


def test_internal_errors_and_interrupts_are_one_line(tmp_path, capsys, monkeypatch):
    src_file, tgt_file, _ = _pair(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("something inside broke\nwith details")

    monkeypatch.setattr(fl, "register", broken)
    assert cli.main(["register", str(src_file), str(tgt_file), "-o", str(tmp_path / "a"), "-q"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastlddmm: internal error: RuntimeError: something inside broke") and "\n" not in err
    assert "FASTLDDMM_DEBUG=1" in err
    monkeypatch.setenv("FASTLDDMM_DEBUG", "1")
    with pytest.raises(RuntimeError, match="inside broke"):
        cli.main(["register", str(src_file), str(tgt_file), "-o", str(tmp_path / "b"), "-q"])
    monkeypatch.delenv("FASTLDDMM_DEBUG")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fl, "register", interrupted)
    assert cli.main(["register", str(src_file), str(tgt_file), "-o", str(tmp_path / "c"), "-q"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_backends_lists_every_backend(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    for name, status in fl.backends().items():
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert ("usable" in line) == status.available and status.reason in line


def test_no_command_and_help(capsys):
    assert cli.main([]) == 2
    assert "required" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("register", "demo", "digits", "bench", "batch", "backends"):
        assert command in out


def test_batch_registers_resumes_and_records_failures(tmp_path, capsys):
    src_file, tgt_file, _ = _pair(tmp_path)
    broken = _bad_file(tmp_path)
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"source,target,name\n{src_file.name},{tgt_file.name},first\n"
                        f"{src_file},{tgt_file},\n{broken.name},{tgt_file.name},bad\n")
    out = tmp_path / "batch"
    # the local engine (one pair after the other); the Ray engine is tested in test_batch.py
    assert cli.main(["batch", str(manifest), "-o", str(out), "-q", "--no-pictures", "--engine", "local",
                     *TINY]) == 1  # one pair failed
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["name"] for r in rows] == ["first", "src", "bad"]  # no name: the source's stem
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[2]["status"].startswith("error: cannot read")
    assert float(rows[0]["final_loss"]) > 0 and int(rows[0]["folds"]) == 0 and float(rows[0]["seconds"]) >= 0
    assert (out / "first" / "warped.csv").is_file()
    capsys.readouterr()
    # a second run skips the finished pairs
    stamp = (out / "first" / "summary.json").stat().st_mtime_ns
    assert cli.main(["batch", str(manifest), "-o", str(out), "-q", "--no-pictures", "--engine", "local", *TINY]) == 1
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert rows[0]["status"] == "done (earlier run)"
    assert (out / "first" / "summary.json").stat().st_mtime_ns == stamp


def test_batch_manifest_errors(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("a,b\n1,2\n")
    assert cli.main(["batch", str(tmp_path / "m.csv"), "-o", str(tmp_path / "o")]) == 2
    assert "columns source,target" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "e.csv").write_text("source,target\n")
    assert cli.main(["batch", str(tmp_path / "e.csv"), "-o", str(tmp_path / "o")]) == 2
    assert "no pairs" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["batch", str(tmp_path / "none.csv"), "-o", str(tmp_path / "o")]) == 2
    assert "no such file" in _one_error_line(capsys.readouterr().err)


@pytest.mark.skipif(not HAVE_VIZ, reason="the demo draws pictures: pip install 'fastlddmm[viz]'")
def test_demo_runs_the_face(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "-o", str(out), "--only", "face", "--steps", "3", "--width", "8", "-q"]) == 0
    for name in ("flow.gif", "registration.png", "losses.png", "summary.json", "warped.npy"):
        assert (out / "face" / name).is_file(), name
    summary = json.loads((out / "face" / "summary.json").read_text())
    assert summary["points"]["source"] == 262 and summary["config"]["data_term"] == "chamfer"
    # a second demo into the same folder is fine; a foreign non-empty folder needs --force
    assert cli.main(["demo", "-o", str(out), "--only", "face", "--steps", "2", "--width", "8", "-q",
                     "--no-pictures"]) == 0
    assert json.loads((out / "face" / "summary.json").read_text())["steps"] == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "x").write_text("")
    assert cli.main(["demo", "-o", str(other), "--only", "face", "--steps", "2", "-q"]) == 2
    assert "--force" in _one_error_line(capsys.readouterr().err)


@pytest.fixture
def fake_digits(monkeypatch):
    """Replace fastlddmm.image.digits by a module whose run() records its keyword arguments."""
    calls = []
    fake = types.ModuleType("fastlddmm.image.digits")
    fake.run = lambda **kwargs: calls.append(kwargs) or {"5": {"ssd_after": 0.1}}
    import fastlddmm.image as image

    monkeypatch.setattr(image, "digits", fake, raising=False)
    monkeypatch.setitem(sys.modules, "fastlddmm.image.digits", fake)
    return fake, calls


def test_digits_calls_the_image_module(tmp_path, fake_digits, capsys):
    _, calls = fake_digits
    out = tmp_path / "d"
    assert cli.main(["digits", "--train", "5", "--eval", "5", "7", "-o", str(out), "-q"]) == 0
    # no option given: the module's defaults (shared weights, its iterations, threads from the load)
    assert calls == [{"train": [5], "eval": [5, 7], "out_dir": out, "seed": 0, "progress": False}]
    assert cli.main(["digits", "--train", "12", "--eval", "5", "-o", str(out)]) == 2
    assert "expected a digit 0-9" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("options,expected", [
    (["--steps", "40"], {"steps": 40}),
    (["--seconds", "300"], {"seconds": 300.0}),
    (["--seconds", "2.5", "--independent"], {"seconds": 2.5, "shared": False}),
    (["--independent"], {"shared": False}),
    (["--threads", "3"], {"threads": 3}),
    (["--steps", "7", "--threads", "1", "--independent", "--seed", "4"], {"steps": 7, "threads": 1, "shared": False,
                                                                          "seed": 4}),
])
def test_digits_options_reach_the_module(tmp_path, fake_digits, options, expected):
    _, calls = fake_digits
    out = tmp_path / "d"
    assert cli.main(["digits", "--train", "5", "--eval", "7", "-o", str(out), "-q", *options]) == 0
    assert calls == [{"train": [5], "eval": [7], "out_dir": out, "seed": 0, "progress": False, **expected}]


@pytest.mark.parametrize("options,message", [
    (["--seconds", "0"], "expected a positive finite number"),
    (["--seconds", "-3"], "expected a positive finite number"),
    (["--seconds", "inf"], "expected a positive finite number"),
    (["--seconds", "nan"], "expected a positive finite number"),
    (["--seconds", "soon"], "expected a positive number"),
    (["--steps", "0"], "expected a positive integer"),
    (["--steps", "1.5"], "expected a positive integer"),
    (["--threads", "0"], "expected a positive integer"),
    (["--threads", "two"], "expected a positive integer"),
    (["--steps", "10", "--seconds", "5"], "not allowed with argument"),
    (["--independent", "yes"], "unrecognized arguments"),
])
def test_digits_bad_options_are_one_line_usage_errors(tmp_path, fake_digits, capsys, options, message):
    _, calls = fake_digits
    assert cli.main(["digits", "--train", "5", "--eval", "5", "-o", str(tmp_path / "d"), *options]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line
    assert calls == []  # refused before anything ran


def test_digits_module_errors_are_one_line_usage_errors(tmp_path, fake_digits, capsys):
    fake, _ = fake_digits

    def refuse(**kwargs):
        raise ValueError("seconds must be a positive number or None, got 0\nsecond line")

    fake.run = refuse
    assert cli.main(["digits", "--train", "5", "--eval", "5", "-o", str(tmp_path / "d")]) == 2
    assert "seconds must be a positive number" in _one_error_line(capsys.readouterr().err)


def test_bench_prints_ratios_against_the_reference(monkeypatch, capsys):
    from fastlddmm import benchmark, dispatch

    # tiny cases instead of the real sizes: this checks the table, not the speed
    def cases(quick, device):
        return [("nearest", "toy op", "N=3", lambda: torch.ones(3), lambda backend, inputs: inputs.sum())]

    monkeypatch.setattr(benchmark, "_cases", cases)
    assert cli.main(["bench", "--repeats", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    toy = [line for line in out.splitlines() if line.startswith("toy op")]
    probe = dispatch.Problem(device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float32, dim=3)
    usable = [n for n in dispatch.usable_backends("nearest", probe) if not (n == "triton" and probe.device == "cpu")]
    assert len(toy) == len(usable) and "reference" in usable
    assert any("reference" in line and "1.00x" in line for line in toy)
    assert "benchmarks/" in out


def test_python_dash_m_subprocess(tmp_path):
    src_file, tgt_file, _ = _pair(tmp_path, ext=".npy")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("FASTLDDMM_DEBUG", None)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "fastlddmm", "register", str(src_file), str(tgt_file), "-o", str(out),
                          "--no-pictures", "-q", *TINY], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (out / "warped.npy").is_file() and np.load(out / "trajectory.npy").shape == (4, 23, 2)
    again = subprocess.run([sys.executable, "-m", "fastlddmm", "register", str(src_file), str(tgt_file), "-o",
                            str(out), "--steps", "-3"], capture_output=True, text=True, env=env, timeout=300,
                           cwd=tmp_path)
    assert again.returncode == 2
    assert "--steps" in _one_error_line(again.stderr)
