"""The ``reference`` backend of euler_flow: PyTorch implementation of the ResNet-LDDMM Euler flow, the
ground truth of every fast path (autograd gives its gradients; any float dtype, any device).

The model (Amor, Arguillère, Shao, "ResNet-LDDMM: Advancing the LDDMM Framework Using Deep
Residual Networks", arXiv 2102.07951, Sec. 3-4 and the experiments section) is a stack of L
residual blocks, each one forward-Euler step of a time-dependent velocity field:

    x^{l+1} = x^l + Δ v_l(x^l),          Δ = 1 / L,          l = 0 .. L-1
    v_l(x)  = W2_l ρ(W1_l x + b1_l) + b2_l

with W1_l: (H, D), b1_l: (H,), W2_l: (D, H), b2_l: (D,), ρ = ReLU in the paper (a fully connected
ReLU network with one hidden layer per block; the paper's experiments use a hidden width of 500).
The paper's regulariser is the kinetic energy of the discrete path,

    E = ½ Σ_l Δ · mean_i |v_l(x_i^l)|²,

evaluated on the moving points themselves (the empirical L² norm of v along the trajectory).

What we chose where the paper leaves room (documented in the README as well):
- the per-point mean (not a sum) in E, so that σ does not have to be rescaled with N;
- smooth activations ("tanh", "softplus") beside "relu": with a Lipschitz, C¹ velocity the Euler map is a
  true diffeomorphism when Δ·Lip(v) < 1, whereas ReLU blocks give bi-Lipschitz homeomorphisms;
- initialisation (in ``fastlddmm.flow``): W1, b1 as PyTorch's nn.Linear default, W2 and b2 zero,
  so that every registration starts from the identity map with zero energy.

Parameters are stacked over layers, which is the layout the fused kernels read:

    weight1: (L, H, D)   bias1: (L, H)   weight2: (L, D, H)   bias2: (L, D)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("relu", "tanh", "softplus")


def activation_fn(name: str):
    """The pointwise nonlinearity ρ called ``name``."""
    if name == "relu":
        return torch.relu
    if name == "tanh":
        return torch.tanh
    if name == "softplus":
        return F.softplus
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def velocity(
    x: Tensor,  # (..., D)
    weight1: Tensor,  # (H, D)
    bias1: Tensor,  # (H,)
    weight2: Tensor,  # (D, H)
    bias2: Tensor,  # (D,)
    activation: str = "relu",
) -> Tensor:  # (..., D)
    """PyTorch implementation of one residual block's velocity v(x) = W2 ρ(W1 x + b1) + b2."""
    hidden = activation_fn(activation)(x @ weight1.T + bias1)
    return hidden @ weight2.T + bias2


def trajectory(
    x: Tensor,  # (..., D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str = "relu",
) -> Tensor:  # (L + 1, ..., D)
    """PyTorch implementation of the flow's trajectory: x^0 = x, x^{l+1} = x^l + dt v_l(x^l)."""
    states = [x]
    for layer in range(weight1.shape[0]):
        v = velocity(states[-1], weight1[layer], bias1[layer], weight2[layer], bias2[layer], activation)
        states.append(states[-1] + dt * v)
    return torch.stack(states)


def euler_flow(
    x: Tensor,  # (..., D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str = "relu",
) -> tuple[Tensor, Tensor]:  # (..., D), ()
    """PyTorch implementation of euler_flow: the point at time 1 and the kinetic energy.

    energy = ½ Σ_l dt · mean_i |v_l(x_i^l)|², the mean over every point (all leading dimensions).
    """
    energy = x.new_zeros(())
    for layer in range(weight1.shape[0]):
        v = velocity(x, weight1[layer], bias1[layer], weight2[layer], bias2[layer], activation)
        energy = energy + 0.5 * dt * v.pow(2).sum(-1).mean()
        x = x + dt * v
    return x, energy
