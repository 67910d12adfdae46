"""The kernel_sum op (fastlddmm/ops/kernel_sum): Σ_j k(x_i, y_j) b_j for GeomLoss's kernel losses. The
reference against the kernels' formulas written out, then every backend of the dispatch table against the
reference: values, and the gradient in x (the i-variable, which every backend differentiates; in y and b
only where the module's DIFFERENTIATES_Y says so). (GeomLoss agreement: tests/test_compat.py.)

KeOps formulas compiled by this file: the unified kernel (one formula for the three kernels) and its gradient
in x, D = 3, float64, the ones fastlddmm.compat.SamplesLoss(backend="online") compiles.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastlddmm as fl
from fastlddmm import dispatch
from fastlddmm.ops.kernel_sum import kernel_params

from conftest import assert_close, backend_cases, clouds, keops_formula, require_backend, skip_if_interpreted

CASES = backend_cases("kernel_sum")
KERNELS = ("gaussian", "laplacian", "energy")


def kernel(name, x, y, blur):  # python floats: the formulas of the op room's docstring
    d2 = sum((a - b) ** 2 for a, b in zip(x, y))
    if name == "gaussian":
        return math.exp(-d2 / (2 * blur**2))
    if name == "laplacian":
        return math.exp(-math.sqrt(max(d2 / blur**2, 1e-8)))
    return -math.sqrt(max(d2, 1e-8))


@pytest.mark.parametrize("name", KERNELS)
def test_reference_matches_the_formulas(name):
    x, y = clouds(3, 4, 2, batch=1, seed=2)
    b = torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=torch.float64)
    got = fl.reference.kernel_sum(name, x, y, b, 0.7)[0]
    for i, xi in enumerate(x[0].tolist()):
        want = sum(kernel(name, xi, yj, 0.7) * bj for yj, bj in zip(y[0].tolist(), b[0].tolist()))
        assert got[i].item() == pytest.approx(want, rel=1e-13)
    # coincident points: the 1e-8 floor under the square roots gives finite gradients
    z = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fl.reference.kernel_sum(name, z, x, b[:, :3], 0.7).sum(), z)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("batch,n,m", [(2, 1, 1), (1, 7, 13), (2, 29, 17), (1, 1013, 7)])
def test_kernel_sum_matches_reference(backend, device, name, batch, n, m):
    dev = require_backend("kernel_sum", backend, device)
    skip_if_interpreted(backend, device, max(n, m))
    x, y = clouds(n, m, 3, batch=batch, device=dev, seed=n + m)
    b = torch.rand(batch, m, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dev)
    module = dispatch.load("kernel_sum", backend)
    leaves = [x.clone().requires_grad_(), y.clone().requires_grad_(), b.clone().requires_grad_()]
    if not module.DIFFERENTIATES_Y:
        leaves[1], leaves[2] = y, b
    got = module.kernel_sum(name, *leaves, 0.5)
    assert got.shape == (batch, n) and got.dtype == torch.float64
    ref_leaves = [t.detach().clone().requires_grad_() for t in (x, y, b)]
    want = fl.reference.kernel_sum(name, *ref_leaves, 0.5)
    # float64, one sum of M terms in another order: ~1e-15 relative; 1e-12 leaves a margin
    assert_close(got, want, rtol=1e-12, atol=1e-12, name=f"{name} kernel sum")
    v = torch.linspace(-1, 1, got.numel(), dtype=torch.float64, device=dev).view(got.shape)
    differentiated = [0, 1, 2] if module.DIFFERENTIATES_Y else [0]
    grads = torch.autograd.grad((got * v).sum(), [leaves[i] for i in differentiated])
    want_grads = torch.autograd.grad((want * v).sum(), [ref_leaves[i] for i in differentiated])
    for i, g, w in zip(differentiated, grads, want_grads):
        assert_close(g, w, rtol=1e-11, atol=1e-12, name=f"{name} grad {'xyb'[i]}")


@pytest.mark.parametrize("backend,device", CASES)
def test_kernel_sum_float32(backend, device):
    dev = require_backend("kernel_sum", backend, device, dtype=torch.float32)
    keops_formula(backend, False, "the kernel sum in float32")
    x, y = clouds(29, 17, 3, batch=2, dtype=torch.float32, device=dev, seed=3)
    b = torch.rand(2, 17, generator=torch.Generator().manual_seed(1)).to(dev)
    got = dispatch.load("kernel_sum", backend).kernel_sum("gaussian", x, y, b, 0.5)
    want = fl.reference.kernel_sum("gaussian", x.double(), y.double(), b.double(), 0.5)
    # 17 positive terms of size <= 1 in float32: a few ulps of the sum
    assert_close(got.double(), want, rtol=1e-6, atol=1e-6, name="float32 kernel sum")


def test_unknown_kernel_is_refused():
    x, y = clouds(3, 4, batch=1)
    with pytest.raises(ValueError, match="unknown kernel 'cauchy'"):
        kernel_params("cauchy", 0.5)
    with pytest.raises(ValueError, match="unknown kernel|cauchy"):
        fl.reference.kernel_sum("cauchy", x, y, torch.ones(1, 4, dtype=torch.float64), 0.5)
