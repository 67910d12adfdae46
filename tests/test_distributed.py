"""Point-sharded Chamfer, Sinkhorn and registration (fastlddmm.distributed) on 2 gloo processes
against the one-process computation: values, gradients of every shard, and whole registrations.

The sharded side runs once per module under `torchrun --standalone --nproc-per-node 2`
(tests/distributed_worker.py); the one-process side runs here. Tolerances: float64 1e-10 relative
(the same sums in another order), float32 1e-5.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastlddmm as fl
from fastlddmm import distributed as fld

WORKER = Path(__file__).with_name("distributed_worker.py")
WORLD = 2
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


def _clouds(n, m, dtype, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=torch.float64) + offset
    y = torch.rand(m, 3, generator=g, dtype=torch.float64) * 0.8 + 0.3 + offset
    return x.to(dtype), y.to(dtype)


def _cases() -> dict:
    cases = {}
    x, y = _clouds(37, 29, torch.float64, 0)
    # Exact duplicates in different shards (rank 0 holds y[:15], rank 1 y[15:]): a tie across ranks.
    y[20] = y[3]
    x[5] = y[3] + 1e-3  # an x whose nearest y is the tied pair
    x[30] = x[2]
    cases["chamfer_f64_ties"] = dict(kind="chamfer", x=x, y=y)
    cases["chamfer_f64_ties_allreduce"] = dict(cases["chamfer_f64_ties"], no_reduce_scatter=True)
    cases["chamfer_f64_gathered_y"] = dict(cases["chamfer_f64_ties"], gather_y=True)
    x, y = _clouds(401, 303, torch.float32, 1)  # big enough for "auto" to use cKDTree on each shard
    cases["chamfer_f32_kdtree"] = dict(kind="chamfer", x=x, y=y)
    x, y = _clouds(23, 31, torch.float64, 2)
    cases["sinkhorn_f64"] = dict(kind="sinkhorn", x=x, y=y, options=dict(blur=0.1, backend="reference"))
    x, y = _clouds(40, 33, torch.float32, 3, offset=100.0)
    cases["sinkhorn_f32_offset"] = dict(kind="sinkhorn", x=x, y=y, options=dict(blur=0.05))
    cases["sinkhorn_f64_gathered_y"] = dict(cases["sinkhorn_f64"], gather_y=True)
    x, y = _clouds(19, 26, torch.float64, 4)
    g = torch.Generator().manual_seed(5)
    a = torch.rand(19, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(26, generator=g, dtype=torch.float64) + 0.1
    cases["sinkhorn_f64_reach_weights_p1"] = dict(
        kind="sinkhorn", x=x, y=y, a=a / a.sum(), b=b / b.sum(),
        options=dict(blur=0.1, p=1, reach=0.3, scaling=0.7, backend="reference"))
    x, y = _clouds(17, 12, torch.float64, 6)
    cases["sinkhorn_f64_no_debias"] = dict(kind="sinkhorn", x=x, y=y, options=dict(blur=0.2, debias=False))
    x, y = _clouds(21, 18, torch.float64, 7)
    cases["sinkhorn_f64_keops"] = dict(kind="sinkhorn", x=x, y=y, options=dict(blur=0.1, backend="keops"))

    x, y = _clouds(12, 10, torch.float32, 10)
    for call in ("chamfer", "sinkhorn", "register"):
        for spoil in ("nan", "dimension"):
            cases[f"error_{call}_{spoil}"] = dict(kind="error", call=call, spoil=spoil, x=x, y=y)

    src, tgt = _clouds(33, 27, torch.float64, 8)
    base = dict(width=16, layers=3, dtype=torch.float64, seed=3)
    cases["register_l2"] = dict(kind="register", source=src, target=src * 1.2 + 0.1,
                                options=dict(base, data_term="l2", steps=6, sigma=0.2))
    cases["register_chamfer_lbfgs"] = dict(kind="register", source=src, target=tgt,
                                           options=dict(base, data_term="chamfer", steps=2, optimizer="lbfgs"))
    cases["register_sinkhorn"] = dict(kind="register", source=src, target=tgt,
                                      options=dict(base, data_term="sinkhorn", steps=4, blur=0.1, lr=1e-2))
    return cases


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(cases, per-rank results) of one torchrun of the worker over every case."""
    tmp = tmp_path_factory.mktemp("distributed")
    cases = _cases()
    torch.save(cases, tmp / "cases.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           str(WORKER), str(tmp / "cases.pt"), str(tmp)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return cases, results


def _close(actual, expected, dtype, what):
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


def _one_process(case):
    x, y = case["x"].clone().requires_grad_(), case["y"].clone().requires_grad_()
    if case["kind"] == "chamfer":
        value = fl.chamfer(x, y, backend="reference")
    else:
        options = {**case["options"], "backend": "reference"}
        value = fl.sinkhorn(x, y, a=case.get("a"), b=case.get("b"), **options)
    value.backward()
    return value.detach(), x.grad, y.grad


DISTANCE_CASES = [name for name, case in _cases().items() if case["kind"] in ("chamfer", "sinkhorn")]
ERROR_CASES = [name for name, case in _cases().items() if case["kind"] == "error"]
REGISTER_CASES = [name for name, case in _cases().items() if case["kind"] == "register"]


@pytest.mark.parametrize("name", DISTANCE_CASES)
def test_sharded_distance_equals_one_process(sharded, name):
    cases, results = sharded
    case = cases[name]
    dtype = case["x"].dtype
    value, grad_x, grad_y = _one_process(case)
    for r in range(WORLD):  # every rank holds the whole value
        _close(results[r][name]["value"], value, dtype, f"{name} value on rank {r}")
    _close(torch.cat([results[r][name]["grad_x"] for r in range(WORLD)]), grad_x, dtype, f"{name} grad x")
    if case.get("gather_y"):  # gather_cloud detaches: the value and x's gradient only
        assert all(results[r][name]["grad_y"] is None for r in range(WORLD))
        return
    _close(torch.cat([results[r][name]["grad_y"] for r in range(WORLD)]), grad_y, dtype, f"{name} grad y")


def test_tie_across_ranks_gives_the_gradient_once(sharded):
    """y[3] (rank 0) and y[20] (rank 1) coincide: the one-process argmin sends the x -> y gradient to y[3]
    only, so must the shards (a rank-blind min would send it to both)."""
    cases, results = sharded
    grad_y = torch.cat([results[r]["chamfer_f64_ties"]["grad_y"] for r in range(WORLD)])
    _, _, expected = _one_process(cases["chamfer_f64_ties"])
    assert not torch.allclose(expected[3], expected[20]), "the case must have an x whose nearest y is y[3]"
    torch.testing.assert_close(grad_y[[3, 20]], expected[[3, 20]], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", REGISTER_CASES)
def test_sharded_registration_equals_one_process(sharded, name):
    cases, results = sharded
    case = cases[name]
    reg = fl.register(case["source"], case["target"], progress=False, **case["options"])
    for r in range(WORLD):
        out = results[r][name]
        torch.testing.assert_close(out["center"], reg.center, rtol=1e-12, atol=1e-12)
        assert out["scale"] == pytest.approx(reg.scale, rel=1e-12)
        for key in ("loss", "data", "energy"):
            assert out["history"][key] == pytest.approx(reg.history[key], rel=1e-8, abs=1e-12), (name, key, r)
        for key, value in reg.flow.state_dict().items():
            torch.testing.assert_close(out["flow"][key], value, rtol=1e-7, atol=1e-9,
                                       msg=lambda m: f"{name} rank {r} {key}: {m}")
    # The ranks are replicas: bitwise the same parameters.
    for key in reg.flow.state_dict():
        assert torch.equal(results[0][name]["flow"][key], results[1][name]["flow"][key])


@pytest.mark.parametrize("name", ERROR_CASES)
def test_a_bad_shard_on_one_rank_raises_on_every_rank(sharded, name):
    """Rank 1 gets a NaN or a 2-D shard: both ranks raise a ValueError (the worker would hang otherwise)."""
    _, results = sharded
    errors = [results[r][name]["error"] for r in range(WORLD)]
    if name.endswith("_nan"):
        assert errors[0] is not None and "rank 1 rejected its input" in errors[0]
        assert errors[1] is not None and "NaN" in errors[1]
    else:
        assert all(e is not None and "same point dimension" in e for e in errors), errors


# -- one-process behaviour of the helpers ------------------------------------------------------------


@pytest.mark.parametrize("count,world", [(1, 1), (7, 2), (10, 3), (1000 + 13, 4), (5, 5)])
def test_shard_bounds_cover_every_point_once(count, world):
    spans = [fld.shard_bounds(count, r, world) for r in range(world)]
    assert spans[0][0] == 0 and spans[-1][1] == count
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sizes = [stop - start for start, stop in spans]
    assert max(sizes) - min(sizes) <= 1


def test_without_a_process_group_the_error_says_how_to_start():
    if fld.is_active():
        pytest.skip("a process group is initialised in this test process")
    x = torch.rand(5, 3)
    with pytest.raises(RuntimeError, match="torchrun"):
        fld.chamfer(x, x)
    with pytest.raises(RuntimeError, match="torchrun"):
        fl.register(x, x, distributed=True, steps=1, progress=False)
    with pytest.raises(TypeError, match="distributed"):
        fl.register(x, x, distributed="yes", steps=1, progress=False)


def test_cli_register_distributed_matches_one_process(tmp_path):
    """`torchrun ... -m fastlddmm register --distributed` (2 gloo ranks) writes what one process writes."""
    from fastlddmm.cli import main

    src, tgt = _clouds(41, 35, torch.float64, 9)
    np.save(tmp_path / "src.npy", src.numpy())
    np.save(tmp_path / "tgt.npy", tgt.numpy())
    options = ["--data-term", "chamfer", "--steps", "4", "--width", "8", "--layers", "2", "--no-pictures", "-q"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
           "-m", "fastlddmm", "register", str(tmp_path / "src.npy"), str(tmp_path / "tgt.npy"),
           "-o", str(tmp_path / "sharded"), "--distributed", "--device", "cpu", *options]  # --device cpu: gloo
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert main(["register", str(tmp_path / "src.npy"), str(tmp_path / "tgt.npy"), "-o", str(tmp_path / "single"),
                 *options]) == 0
    sharded = fl.Registration.load(tmp_path / "sharded" / "registration.pt")
    single = fl.Registration.load(tmp_path / "single" / "registration.pt")
    assert sharded.config["world_size"] == WORLD
    assert sharded.history["loss"] == pytest.approx(single.history["loss"], rel=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "sharded" / "warped.npy"), np.load(tmp_path / "single" / "warped.npy"),
                               rtol=1e-5, atol=1e-6)
    summary = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    assert summary["points"]["source"] == 41 and summary["folds"] == 0


@pytest.mark.parametrize("device", [[], ["--device", "cpu"]])
def test_cli_register_distributed_outside_torchrun_is_a_usage_error(tmp_path, capsys, monkeypatch, device):
    from fastlddmm.cli import main

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    src = tmp_path / "src.npy"
    np.save(src, torch.rand(10, 3).numpy())
    assert main(["register", str(src), str(src), "-o", str(tmp_path / "out"), "--distributed", "-q", *device]) == 2
    assert "torchrun" in capsys.readouterr().err


def test_cli_register_distributed_takes_a_device_kind_not_an_index(tmp_path, capsys, monkeypatch):
    """--device cpu (gloo) and --device cuda (nccl, cuda:LOCAL_RANK per rank) are accepted; cuda:1 is not a
    choice a rank can make for all ranks."""
    import fastlddmm.cli as cli

    monkeypatch.setattr(cli, "_device", lambda text: text)  # as if this machine had GPUs
    src = tmp_path / "src.npy"
    np.save(src, torch.rand(10, 3).numpy())
    assert cli.main(["register", str(src), str(src), "-o", str(tmp_path / "out"), "--distributed",
                     "--device", "cuda:1", "-q"]) == 2
    assert "--device cpu or --device cuda" in capsys.readouterr().err


def test_cli_under_torchrun_without_distributed_is_refused(tmp_path, capsys, monkeypatch):
    """P processes each running a whole registration into the same folder would clobber each other's files."""
    from fastlddmm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    src = tmp_path / "src.npy"
    np.save(src, torch.rand(10, 3).numpy())
    assert main(["register", str(src), str(src), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert "--distributed" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 2
    assert "only `register --distributed`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()
