"""The dispatch table (fastlddmm/dispatch.py): what is built and why not, the table's entries against each
op room's contract, every "auto" rule at its thresholds, the limits of each entry, and the errors a user
gets for a backend that cannot run (saying why and how), an unknown backend, and a backend without the op.

The auto rules are tested against a pretended set of built backends (``pretend``), so that each branch of
each rule runs on every machine, whatever is installed; the thresholds are read from dispatch itself.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types

import pytest
import torch

import fastlddmm as fl
from fastlddmm import dispatch
from fastlddmm.dispatch import Problem
from fastlddmm.ops.softmin import Softmin

from conftest import flow_params, random_points

# What each op room's contract asks of a backend module (the rooms' __init__ docstrings).
CONTRACT = {
    "euler_flow": ("forward", "backward"),
    "softmin": ("Softmin",),
    "projection": ("softmax_weighted_sum",),
    "nearest": ("knn_index",),
    "kernel_sum": ("kernel_sum", "DIFFERENTIATES_Y"),
}


@pytest.fixture
def pretend(monkeypatch):
    """pretend(*names): dispatch.status says exactly these backends are built and installed."""
    real = dispatch.status

    def set_available(*names):
        def status(name):
            real(name)  # unknown names still raise
            if name in names:
                return dispatch.BackendStatus(name, True, "available (pretended by the test)")
            return dispatch.BackendStatus(name, False, "not available (pretended by the test): how to get it")

        monkeypatch.setattr(dispatch, "status", status)

    return set_available


def cpu(dtype=torch.float32, dim=3, **kw) -> Problem:
    return Problem(device="cpu", dtype=dtype, dim=dim, **kw)


def gpu(dtype=torch.float32, dim=3, **kw) -> Problem:
    return Problem(device="cuda", dtype=dtype, dim=dim, **kw)


# ------------------------------------------------------------------------------------------------
# What is built here, and why not
# ------------------------------------------------------------------------------------------------


def test_backends_lists_every_backend_with_a_reason():
    got = fl.backends()
    assert tuple(got) == dispatch.BACKENDS
    for name, st in got.items():
        assert st.name == name and isinstance(st.available, bool) and bool(st) is st.available
        assert st.reason, f"{name}: no reason given"
    assert got["reference"].available


def test_status_of_an_unknown_backend_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown backend 'fastest'.*reference"):
        dispatch.status("fastest")
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        dispatch.check_name("fastest")
    assert dispatch.check_name("auto") == "auto"


def test_cpu_without_the_compiled_module_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(dispatch, "compiled_module", lambda: None)
    for name in ("cpu", "cuda"):
        st = dispatch.status(name)
        assert not st.available
    assert "pip install" in dispatch.status("cpu").reason
    assert "nvcc" in dispatch.status("cuda").reason


def test_cuda_built_without_a_gpu_says_so(monkeypatch):
    monkeypatch.setattr(dispatch, "compiled_module", lambda: types.SimpleNamespace(has_cuda=lambda: True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    st = dispatch.status("cuda")
    assert not st.available and "no GPU" in st.reason


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def test_every_op_has_the_reference_and_an_auto_rule():
    assert set(dispatch.TABLE) == set(CONTRACT) == set(dispatch.OPS)
    for op in dispatch.OPS:
        assert dispatch.backends_for(op) == tuple(dispatch.TABLE[op])
        assert "reference" in dispatch.backends_for(op)
        assert set(dispatch.backends_for(op)) <= set(dispatch.BACKENDS)
        for entry in dispatch.TABLE[op].values():
            assert set(entry.devices) <= {"cpu", "cuda"} and entry.devices
    with pytest.raises(ValueError, match="unknown op 'blur'"):
        dispatch.backends_for("blur")


@pytest.mark.parametrize("op,backend", [(op, b) for op in dispatch.TABLE for b in dispatch.TABLE[op]],
                         ids=[f"{op}-{b}" for op in dispatch.TABLE for b in dispatch.TABLE[op]])
def test_every_entry_loads_a_module_with_the_contract(op, backend):
    st = dispatch.status(backend)
    if not st.available:
        pytest.skip(f"backend {backend!r} is not available here: {st.reason}")
    module = dispatch.load(op, backend)
    assert module.__name__ == dispatch.TABLE[op][backend].module
    # The reference euler_flow is the autograd twin (fl.reference.euler_flow), not a launcher pair.
    names = ("euler_flow",) if (op, backend) == ("euler_flow", "reference") else CONTRACT[op]
    for name in names:
        assert hasattr(module, name), f"{module.__name__} lacks {name!r} (the {op} contract)"
    if op == "softmin":
        assert issubclass(module.Softmin, Softmin)


def test_reference_runs_every_op_on_any_device_and_dtype():
    for op in dispatch.OPS:
        for pr in (cpu(torch.float16), cpu(torch.float64, dim=17), gpu(torch.bfloat16)):
            assert dispatch.why_not(op, "reference", pr) is None


def test_a_backend_without_the_op_says_which_have_it():
    with pytest.raises(dispatch.BackendUnavailableError, match=r"'cuda' has no nearest; use one of \('auto', 'reference'"):
        dispatch.load("nearest", "cuda")
    with pytest.raises(dispatch.BackendUnavailableError, match="'kdtree' has no softmin"):
        dispatch.choose("softmin", "kdtree", cpu())
    x, y = random_points(5, 3), random_points(4, 3, seed=2)
    with pytest.raises(fl.BackendUnavailableError, match="'cuda' has no nearest"):
        fl.chamfer(x, y, backend="cuda")
    with pytest.raises(fl.BackendUnavailableError, match="'cuda' has no nearest"):
        fl.nearest(x, y, backend="cuda")
    with pytest.raises(fl.BackendUnavailableError, match="'kdtree' has no softmin"):
        fl.sinkhorn(x, y, backend="kdtree")
    with pytest.raises(fl.BackendUnavailableError, match="'cuda' has no softmin"):
        fl.sinkhorn_projection(x, y, backend="cuda")
    with pytest.raises(fl.BackendUnavailableError, match="'keops' has no euler_flow"):
        fl.ops.euler_flow(x, *flow_params(2, 4, 3), 0.5, backend="keops")


def test_unknown_backend_names_are_refused_by_every_front_end():
    x, y = random_points(5, 3), random_points(4, 3, seed=2)
    for call in (lambda: fl.chamfer(x, y, backend="fast"), lambda: fl.nearest(x, y, backend="fast"),
                 lambda: fl.sinkhorn(x, y, backend="fast"), lambda: fl.sinkhorn_projection(x, y, backend="fast"),
                 lambda: fl.ops.euler_flow(x, *flow_params(2, 4, 3), 0.5, backend="fast"),
                 lambda: fl.ResNetFlow(3, 4, 2, backend="fast")):
        with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
            call()


def test_an_unavailable_backend_raises_its_reason_and_auto_falls_back(pretend):
    """A backend named by the user that is not built raises with status()'s reason (why, and how to get
    it); "auto" runs the reference instead, with no error."""
    pretend("reference", "kdtree", "triton")  # no keops (and no compiled CPU kernels)
    x, y = random_points(5, 3), random_points(4, 3, seed=2)
    for call in (lambda: fl.chamfer(x, y, backend="keops"), lambda: fl.nearest(x, y, backend="keops"),
                 lambda: fl.sinkhorn(x, y, backend="keops"), lambda: fl.sinkhorn_projection(x, y, backend="keops")):
        with pytest.raises(fl.BackendUnavailableError, match=r"backend 'keops' is not available: .*how to get it"):
            call()
    assert dispatch.choose("nearest", "auto", cpu(dim=8, n=1000, m=1000)) == "reference"
    assert dispatch.choose("softmin", "auto", cpu(n=6000, m=6000)) == "reference"
    assert torch.isfinite(fl.sinkhorn(x, y, backend="auto"))


def test_euler_flow_without_the_compiled_module(monkeypatch):
    x = random_points(7, 3)
    params = flow_params(2, 4, 3)
    if dispatch.status("cpu"):
        assert dispatch.choose_euler_flow("auto", "cpu", "float64", 3, False) == "cpu"
    monkeypatch.setattr(dispatch, "compiled_module", lambda: None)
    assert dispatch.choose_euler_flow("auto", "cpu", "float64", 3, False) == "reference"
    with pytest.raises(fl.BackendUnavailableError, match="not built"):
        fl.ops.euler_flow(x, *params, 0.5, "relu", backend="cpu")
    # and "auto" still runs (the reference)
    out, energy = fl.ops.euler_flow(x, *params, 0.5, "relu")
    want_out, want_energy = fl.reference.euler_flow(x, *params, 0.5, "relu")
    assert torch.equal(out, want_out) and torch.equal(energy, want_energy)


def test_cuda_euler_flow_on_cpu_tensors_says_why():
    """'cuda' can never take CPU tensors: not built, no GPU, or the wrong device (the message says which)."""
    x = random_points(7, 3)
    with pytest.raises(fl.BackendUnavailableError, match="cuda"):
        fl.ops.euler_flow(x, *flow_params(2, 4, 3), 0.5, "relu", backend="cuda")


# ------------------------------------------------------------------------------------------------
# Limits of the entries
# ------------------------------------------------------------------------------------------------


def test_limits_say_what_the_backend_takes(pretend, monkeypatch):
    pretend(*dispatch.BACKENDS)
    assert dispatch.why_not("nearest", "triton", gpu(k=1, norm=2)) is None
    assert "single nearest neighbour" in dispatch.why_not("nearest", "triton", gpu(k=2))
    assert "norm=1" in dispatch.why_not("nearest", "triton", gpu(norm=1))
    for op, backend in (("euler_flow", "cpu"), ("euler_flow", "triton"), ("softmin", "triton"),
                        ("projection", "triton"), ("nearest", "triton")):
        device = "cpu" if backend == "cpu" else "cuda"
        reason = dispatch.why_not(op, backend, Problem(device, torch.float16, 3))
        assert "float32 or float64" in reason and "float16" in reason, (op, backend, reason)
    # keops and the k-d tree take any float dtype (they convert or reduce in it)
    assert dispatch.why_not("nearest", "kdtree", cpu(torch.float16)) is None
    # the CUDA flow keeps a point in registers: D <= CUDA_MAX_DIM
    monkeypatch.setattr(dispatch, "compiled_module", lambda: types.SimpleNamespace(has_cuda=lambda: True, CUDA_MAX_DIM=64))
    assert dispatch.why_not("euler_flow", "cuda", gpu(dim=64)) is None
    assert "D <= 64" in dispatch.why_not("euler_flow", "cuda", gpu(dim=65))


def test_device_of_the_tensors(pretend):
    pretend(*dispatch.BACKENDS)
    assert "on cpu tensors, got tensors on cuda" in dispatch.why_not("euler_flow", "cpu", gpu())
    assert "cuda tensors, got tensors on cpu" in dispatch.why_not("euler_flow", "cuda", cpu())
    assert dispatch.why_not("nearest", "kdtree", gpu()) is None  # through the host


def test_named_backend_is_chosen_when_it_can_run(pretend):
    pretend(*dispatch.BACKENDS)
    for op in dispatch.OPS:
        for name in dispatch.backends_for(op):
            pr = gpu() if name == "cuda" else cpu()
            if dispatch.why_not(op, name, pr) is None:
                assert dispatch.choose(op, name, pr) == name
            else:
                with pytest.raises(dispatch.BackendUnavailableError):
                    dispatch.choose(op, name, pr)


def test_usable_backends_is_what_why_not_allows():
    for op in dispatch.OPS:
        for pr in (cpu(), cpu(torch.float64, k=3), cpu(torch.float16)):
            usable = dispatch.usable_backends(op, pr)
            assert usable == [b for b in dispatch.backends_for(op) if dispatch.why_not(op, b, pr) is None]
            assert usable[0] == "reference"
    assert "triton" not in dispatch.usable_backends("nearest", cpu(k=3))
    assert "cpu" not in dispatch.usable_backends("euler_flow", cpu(torch.float16))


# ------------------------------------------------------------------------------------------------
# The auto rules, at their thresholds
# ------------------------------------------------------------------------------------------------


def test_auto_euler_flow(pretend, monkeypatch):
    monkeypatch.setattr(dispatch, "compiled_module", lambda: types.SimpleNamespace(has_cuda=lambda: True, CUDA_MAX_DIM=64))
    pretend(*dispatch.BACKENDS)
    assert dispatch.choose("euler_flow", "auto", cpu()) == "cpu"
    assert dispatch.choose("euler_flow", "auto", cpu(torch.float16)) == "reference"
    assert dispatch.choose("euler_flow", "auto", gpu()) == "triton"
    assert dispatch.choose("euler_flow", "auto", gpu(deterministic=True)) == "triton"
    pretend("reference", "cpu", "cuda")  # no triton
    assert dispatch.choose("euler_flow", "auto", gpu()) == "cuda"
    assert dispatch.choose("euler_flow", "auto", gpu(dim=65)) == "reference"
    # CUDA kernels sum weight gradients with atomics: not for bitwise-reproducible runs
    assert dispatch.choose("euler_flow", "auto", gpu(deterministic=True)) == "reference"
    pretend("reference", "triton", "cuda")  # no compiled CPU path
    assert dispatch.choose("euler_flow", "auto", cpu()) == "reference"
    # choose_euler_flow: the same answers from plain arguments (what torch.compile treats as a constant)
    assert dispatch.choose_euler_flow("auto", "cuda", "float32", 3, False) == "triton"
    assert dispatch.choose_euler_flow("auto", "cpu", "float64", 3, False) == "reference"
    with pytest.raises(dispatch.BackendUnavailableError, match="'cpu' is not available"):
        dispatch.choose_euler_flow("cpu", "cpu", "float64", 3, False)


def test_auto_nearest_cpu(pretend):
    pretend(*dispatch.BACKENDS)
    # the C++ k-d tree at every size (its measured crossovers are in dispatch.py), up to its D <= 64
    assert dispatch.choose("nearest", "auto", cpu(n=3, m=3)) == "cpu"
    assert dispatch.choose("nearest", "auto", cpu(dim=64, n=1000, m=1000, k=5, norm=1)) == "cpu"
    assert dispatch.choose("nearest", "auto", cpu(torch.float16, n=1000, m=1000)) != "cpu"
    assert dispatch.choose("nearest", "auto", cpu(dim=65, n=1000, m=1000)) == "keops"
    pretend(*(b for b in dispatch.BACKENDS if b != "cpu"))  # without the compiled module: the older rule
    limit, max_dim = dispatch.NEAREST_DENSE_MAX_PAIRS, dispatch.KDTREE_MAX_DIM
    assert dispatch.choose("nearest", "auto", cpu(n=limit, m=1)) == "reference"
    assert dispatch.choose("nearest", "auto", cpu(n=limit + 1, m=1)) == "kdtree"
    assert dispatch.choose("nearest", "auto", cpu(dim=max_dim, n=1000, m=1000)) == "kdtree"
    assert dispatch.choose("nearest", "auto", cpu(dim=max_dim + 1, n=1000, m=1000)) == "keops"
    assert dispatch.choose("nearest", "auto", cpu(dim=max_dim + 1, n=limit, m=1)) == "reference"
    # never the Triton interpreter on CPU tensors, even where it runs
    assert dispatch.choose("nearest", "auto", cpu(n=1000, m=1000, k=1)) != "triton"
    pretend("reference", "keops")
    assert dispatch.choose("nearest", "auto", cpu(n=1000, m=1000)) == "keops"
    pretend("reference")
    assert dispatch.choose("nearest", "auto", cpu(n=1000, m=1000)) == "reference"


def test_auto_nearest_cuda(pretend):
    pretend(*dispatch.BACKENDS)
    limit = dispatch.NEAREST_DENSE_MAX_PAIRS_CUDA
    assert dispatch.choose("nearest", "auto", gpu(n=3, m=3)) == "triton"
    # K > 1 or L1: not the Triton kernel; dense while small, KeOps beyond
    assert dispatch.choose("nearest", "auto", gpu(n=limit, m=1, k=3)) == "reference"
    assert dispatch.choose("nearest", "auto", gpu(n=limit + 1, m=1, k=3)) == "keops"
    assert dispatch.choose("nearest", "auto", gpu(n=limit + 1, m=1, norm=1)) == "keops"
    pretend("reference", "keops", "kdtree")
    assert dispatch.choose("nearest", "auto", gpu(n=limit, m=1)) == "reference"
    assert dispatch.choose("nearest", "auto", gpu(n=limit + 1, m=1)) == "keops"
    pretend("reference", "kdtree")
    assert dispatch.choose("nearest", "auto", gpu(n=limit + 1, m=1)) == "reference"


@pytest.mark.parametrize("op", ["softmin", "projection"])
def test_auto_softmin_and_projection(pretend, op):
    pretend(*dispatch.BACKENDS)
    # CPU float tensors: the C++ kernels from the smallest sizes on (measured crossovers in dispatch.py)
    assert dispatch.choose(op, "auto", cpu(n=2, m=3)) == "cpu"
    assert dispatch.choose(op, "auto", cpu(n=20000, m=20000, batch=3)) == "cpu"
    assert dispatch.choose(op, "auto", cpu(torch.float16, n=2, m=3)) == "reference"
    pretend(*(b for b in dispatch.BACKENDS if b != "cpu"))  # without the compiled module: the older rule
    side = int(dispatch.SOFTMIN_DENSE_MAX_ENTRIES**0.5)
    assert side**2 == dispatch.SOFTMIN_DENSE_MAX_ENTRIES  # the bound is a square: side x side entries
    assert dispatch.choose(op, "auto", cpu(n=side, m=side)) == "reference"
    assert dispatch.choose(op, "auto", cpu(n=side + 1, m=1)) == "keops"  # max(N, M)² counts
    assert dispatch.choose(op, "auto", cpu(n=1, m=side + 1)) == "keops"
    pair = int(side / 2**0.5)  # the batch counts too: 2 · pair² <= side² < 2 · (pair + 1)²
    assert dispatch.choose(op, "auto", cpu(n=pair, m=pair, batch=2)) == "reference"
    assert dispatch.choose(op, "auto", cpu(n=pair + 1, m=pair + 1, batch=2)) == "keops"
    assert dispatch.choose(op, "auto", gpu(n=side + 1, m=1)) == "triton"
    assert dispatch.choose(op, "auto", gpu(n=side, m=side)) == "reference"
    pretend("reference", "keops")
    assert dispatch.choose(op, "auto", gpu(n=side + 1, m=1)) == "keops"
    pretend("reference", "triton")  # Triton is never picked for CPU tensors
    assert dispatch.choose(op, "auto", cpu(n=side + 1, m=1)) == "reference"


def test_auto_kernel_sum(pretend):
    pretend(*dispatch.BACKENDS)
    limit = dispatch.KERNEL_DENSE_MAX_ENTRIES
    assert dispatch.choose("kernel_sum", "auto", cpu(n=limit, m=1)) == "reference"
    assert dispatch.choose("kernel_sum", "auto", cpu(n=limit // 2, m=1, batch=2)) == "reference"
    assert dispatch.choose("kernel_sum", "auto", cpu(n=limit + 1, m=1)) == "keops"
    assert dispatch.choose("kernel_sum", "auto", gpu(n=limit // 2 + 1, m=1, batch=2)) == "keops"
    pretend("reference")
    assert dispatch.choose("kernel_sum", "auto", cpu(n=limit + 1, m=1)) == "reference"


def test_problem_reads_shapes():
    x, y = random_points(2, 7, 3), random_points(2, 5, 3)
    pr = dispatch.problem(x, y, k=2)
    assert (pr.device, pr.dtype, pr.dim, pr.n, pr.m, pr.batch, pr.k) == ("cpu", torch.float64, 3, 7, 5, 2, 2)
    pr = dispatch.problem(x[0].float(), y[0].float())
    assert (pr.dtype, pr.n, pr.m, pr.batch) == (torch.float32, 7, 5, 1)


# ------------------------------------------------------------------------------------------------
# The front-ends run what the table picks (nothing else chooses)
# ------------------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_front_ends_run_the_backend_the_table_picks(monkeypatch):
    x, y = random_points(300, 3), random_points(400, 3, seed=2)  # 1.2e5 pairs: beyond the dense bound
    pr = dispatch.problem(x, y)
    picked = dispatch.choose("nearest", "auto", pr)
    assert picked == dispatch.choose("nearest", "auto", dispatch.problem(y, x))
    calls = _spy(monkeypatch, dispatch.load("nearest", picked), "knn_index")
    fl.chamfer(x, y)
    assert len(calls) == 2  # both directions
    fl.nearest(x, y)
    assert len(calls) == 3


def test_sinkhorn_auto_switches_at_the_table_threshold(monkeypatch, pretend):
    if not dispatch.status("keops"):
        pytest.skip(f"backend 'keops' is not available here: {dispatch.status('keops').reason}")
    pretend("reference", "keops")  # the rule without the C++ soft-min, which auto takes first on CPU tensors
    monkeypatch.setattr(dispatch, "SOFTMIN_DENSE_MAX_ENTRIES", 100)
    x, y = random_points(11, 3), random_points(13, 3, seed=2)
    assert dispatch.choose("softmin", "auto", dispatch.problem(x, y)) == "keops"
    keops = dispatch.load("softmin", "keops")
    calls = _spy(monkeypatch, keops, "softmin")
    # the same value as the reference (float64, same loop: 1e-10 leaves a wide margin over ~1e-15 seen)
    got = fl.sinkhorn(x, y, blur=0.1)
    assert calls, "auto did not run the KeOps soft-min"
    want = fl.sinkhorn(x, y, blur=0.1, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_euler_flow_runs_the_launcher_the_table_picks(monkeypatch):
    picked = dispatch.choose_euler_flow("auto", "cpu", "float64", 3, False)
    if picked == "reference":
        pytest.skip(f"no fused euler_flow backend takes CPU tensors here: {dispatch.status('cpu').reason}")
    module = dispatch.load("euler_flow", picked)
    forward, backward = _spy(monkeypatch, module, "forward"), _spy(monkeypatch, module, "backward")
    x = random_points(7, 3, requires_grad=True)
    out, energy = fl.ops.euler_flow(x, *flow_params(2, 4, 3), 0.5)
    (out.sum() + energy).backward()
    assert forward and backward


# ------------------------------------------------------------------------------------------------
# Triton on CPU tensors without the interpreter (a fresh process: the choice is made at import)
# ------------------------------------------------------------------------------------------------

_TRITON_CPU_SCRIPT = """
import os, sys
if sys.argv[1] == "late":
    import triton  # noqa: F401  (imported before the variable is set: its library stays compiled)
    os.environ["TRITON_INTERPRET"] = "1"
import torch, fastlddmm as fl
x = torch.randn(4, 3)
p = [t.float() for t in (torch.randn(2, 4, 3), torch.randn(2, 4), torch.randn(2, 3, 4), torch.randn(2, 3))]
calls = (lambda: fl.sinkhorn(x, x, backend="triton"), lambda: fl.chamfer(x, x, backend="triton"),
         lambda: fl.sinkhorn_projection(x, x, backend="triton"), lambda: fl.ops.euler_flow(x, *p, 0.5, backend="triton"))
for call in calls:
    try:
        call()
    except fl.BackendUnavailableError as e:
        print("ERROR:", e)
    else:
        print("NO ERROR")
print("AUTO", fl.ops.euler_flow(x, *p, 0.5)[0].shape == x.shape, bool(torch.isfinite(fl.sinkhorn(x, x + 1))))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors for CPU tensors without a GPU; a GPU is present")
@pytest.mark.parametrize("when,expected", [
    ("unset", "set TRITON_INTERPRET=1"),
    ("late", "TRITON_INTERPRET=1 was set after triton was imported"),
])
def test_triton_on_cpu_tensors_without_the_interpreter_says_how(when, expected, tmp_path):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("the triton package is missing: pip install 'fastlddmm[triton]'")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _TRITON_CPU_SCRIPT, when], env=env, capture_output=True, text=True,
                          cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    errors = [line for line in lines if line.startswith(("ERROR", "NO ERROR"))]
    assert len(errors) == 4, proc.stdout
    for line in errors:
        assert line.startswith("ERROR:") and expected in line, line
    assert "AUTO True True" in lines, proc.stdout  # "auto" still runs, without Triton


@pytest.mark.gpu
def test_gpu_auto_picks_the_streaming_kernels_for_cuda_tensors():
    """With a GPU (and triton installed), "auto" sends large CUDA problems to the Triton kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch sees none here): run `pytest -m gpu` on a machine with one")
    if not dispatch.status("triton"):
        pytest.skip(f"backend 'triton' is not available here: {dispatch.status('triton').reason}")
    x = torch.randn(3000, 3, device="cuda")
    y = torch.randn(2500, 3, device="cuda")
    pr = dispatch.problem(x, y)
    for op in ("softmin", "projection", "nearest"):
        assert dispatch.choose(op, "auto", pr) == "triton", op
    assert dispatch.choose_euler_flow("auto", "cuda", "float32", 3, False) == "triton"
