"""Triton kernels of the fused ResNet-LDDMM Euler flow: forward and backward, then the launchers.

Model and backward formulas: see fastlddmm/reference/flow.py (the ground truth) and the fused-flow
contract in fastlddmm/ops/flow/__init__.py. Per layer l, for every point x (a row of the tile):
    z = W1_l x + b1_l (H),  h = ρ(z),  v = W2_l h + b2_l (D),  x <- x + dt·v,
    S = Σ_l Σ_i |v_l(x_i^l)|² (the kinetic sum; the op makes it the energy ½ · dt · S / N).

Design choices (and why):

* One program = one tile of BLOCK_N points through ALL L layers. The tile's points stay in registers
  from layer to layer; only states[l] (the input of block l, L·N·D numbers) is written, for the
  backward pass. Hidden activations (N·H per layer) never touch global memory: they are computed
  BLOCK_H columns at a time and recomputed in the backward pass.

* No tl.dot. D is 2 or 3 in practice: padding the contraction dimension to tl.dot's minimum of 16
  wastes >80% of the work for z = x W1ᵀ, tl.dot on float32 defaults to TF32 (10-bit mantissa,
  far from the reference's agreement), and float64 tl.dot support varies with GPU and Triton
  version. So both contractions are broadcast-multiply + tl.sum over a (BLOCK_N, BLOCK_H, BLOCK_D)
  register block, BLOCK_D = next power of two ≥ D (masked): computed in the input dtype, float32
  and float64 alike, for any D (large D shrinks BLOCK_H / BLOCK_N so the block stays bounded:
  slow for large D, but correct).

* Energy: each forward program writes Σ_l Σ_{i in tile} |v|² to its own slot of a (num_tiles,)
  buffer, torch sums it and scales by ½·dt/N. Deterministic, no atomics, no host sync.

* Weight/bias gradients of the backward pass: a reduction over all N points of per-point terms.
  Options weighed:
    - tl.atomic_add of every tile's partial into one (L, params) buffer: least memory, one launch,
      but not deterministic (float addition order varies run to run) and every program hammers the
      same few thousand addresses (H=500, D=3: 3.5k per layer), serialising in the L2 atomic units;
    - one partial per tile (num_tiles × L × params) summed by torch: deterministic, but for 10⁶
      points, L=10, H=500 that is ~1 GB;
    - chosen: a persistent grid of P programs (P ≈ 2 × #SMs, capped by the number of tiles and by a
      memory budget), program p loops over tiles p, p+P, ... and accumulates into its OWN slot of a
      (P, L·params) buffer by plain load-add-store (no other program touches that slot, so no
      atomics), then torch sums over P. Deterministic for a given device, memory P·L·params
      (37 MB for L=10, H=500, D=3 on an H100, float32), and only two extra launches (zero fill,
      sum). Within one program, the load of a slot element in a later tile may be issued by a
      different thread than the one that stored it in the previous tile, so a tl.debug_barrier()
      (CTA barrier: makes the block's global writes visible to the block) closes each tile.
  Partials are kept in the input dtype (float32 or float64), like the reference's own reductions.

* dt is passed as a one-element tensor of the input dtype, not as a Python float: a float kernel
  argument is float32 under the interpreter whatever the annotation, which would round dt = 1/3
  to 7 digits in float64 runs.

* No autotuning: block sizes come from a small heuristic (_configs) keyed on dtype, H and D. The
  interpreter cannot autotune, and the backward kernel's read-add-write partials would need
  resetting between autotuner trials. GPU block sizes were chosen as the largest that compile
  without register spills for sm_90 (triton.compile + cuobjdump, no GPU needed); not yet timed.

Interpreter limitations met (TRITON_INTERPRET=1, triton 3.9):
  - TRITON_INTERPRET=1 must be set before triton is imported, not just before this module: triton
    decorates its own tl.sum, tl.zeros, ... at import, and a compiled-mode one cannot be called from
    an interpreted kernel ("Cannot call @triton.jit'd outside of the scope of a kernel");
    cpu_unavailable_reason() says so instead of failing inside the kernel;
  - triton.language.extra.libdevice (tanh, log1p) returns None, so tanh and softplus are written
    with tl.exp / tl.log;
  - a Python float kernel argument reaches the kernel as a float32 constant (see dt above);
  - tl.reduce with a user combine function runs one Python call per element: only tl.sum is used;
  - the interpreter pays ~1 ms per executed op whatever the block size, so it gets large blocks.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

ACTIVATIONS = ("relu", "tanh", "softplus")
_ACT_CODE = {name: i for i, name in enumerate(ACTIVATIONS)}

# Upper bound on the elements of the backward pass's per-program gradient partials (P × L·params):
# 2^25 elements = 128 MiB in float32; P shrinks when L·params is large.
_PARTIAL_BUDGET = 1 << 25


# ----------------------------------------------------------------------------------------------
# Device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rho(z, ACT: tl.constexpr):
    """ρ(z) for ACT 0 relu, 1 tanh, 2 softplus (torch's threshold-20 form)."""
    if ACT == 0:
        h = tl.maximum(z, 0.0)
    elif ACT == 1:
        # tanh from exp of a non-positive argument: no overflow for any z.
        t = tl.exp(-2.0 * tl.abs(z))
        th = (1.0 - t) / (1.0 + t)
        h = tl.where(z < 0.0, -th, th)
    else:
        # log(1 + e^z) = max(z, 0) + log(1 + e^{-|z|}): no overflow for any z. Above 20,
        # torch.nn.functional.softplus (beta=1, threshold=20) returns z itself, and gradient 1.
        soft = tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))
        h = tl.where(z > 20.0, z, soft)
    return h


@triton.jit
def _rho_grad(z, h, ACT: tl.constexpr):
    """ρ'(z), given h = ρ(z); the same branch choices as torch's backward of each activation."""
    if ACT == 0:
        d = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 1:
        d = 1.0 - h * h
    else:
        d = tl.where(z > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-z)))
    return d


@triton.jit
def _load_chunk(w1_ptr, b1_ptr, w2_ptr, h0, H, D, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """W1[h0:h0+BLOCK_H, :], b1[h0:...], and W2[:, h0:...] transposed, of one layer, zero-padded."""
    hs = h0 + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    h_ok = hs < H
    wmask = h_ok[:, None] & (cols < D)[None, :]
    w1 = tl.load(w1_ptr + hs[:, None] * D + cols[None, :], mask=wmask, other=0.0)  # (BH, BD): W1[h, d]
    w2t = tl.load(w2_ptr + cols[None, :] * H + hs[:, None], mask=wmask, other=0.0)  # (BH, BD): W2[d, h]
    b1 = tl.load(b1_ptr + hs, mask=h_ok, other=0.0)  # (BH,)
    return w1, b1, w2t


@triton.jit
def _velocity(
    x,  # (BLOCK_N, BLOCK_D) registers, zero in padded columns
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # one layer's parameters
    H, D,
    ACT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """v = W2 ρ(W1 x + b1) + b2 for a tile of points, over H in chunks of BLOCK_H."""
    cols = tl.arange(0, BLOCK_D)
    b2 = tl.load(b2_ptr + cols, mask=cols < D, other=0.0)
    v = tl.zeros_like(x) + b2[None, :]
    for h0 in range(0, H, BLOCK_H):
        w1, b1, w2t = _load_chunk(w1_ptr, b1_ptr, w2_ptr, h0, H, D, BLOCK_H, BLOCK_D)
        z = tl.sum(x[:, None, :] * w1[None, :, :], axis=2) + b1[None, :]  # (BN, BH)
        h = _rho(z, ACT)
        # padded hidden units have ρ(0) ≠ 0 for softplus, but their W2 columns are zero.
        v += tl.sum(h[:, :, None] * w2t[None, :, :], axis=1)  # (BN, BD)
    return v


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["N"])
def _euler_flow_fwd_kernel(
    x_ptr,  # (N, D)
    w1_ptr,  # (L, H, D)
    b1_ptr,  # (L, H)
    w2_ptr,  # (L, D, H)
    b2_ptr,  # (L, D)
    dt_ptr,  # (1,)
    out_ptr,  # (N, D) x at time 1
    states_ptr,  # (L, N, D) states[l] = input of block l
    sq_ptr,  # (num_tiles,) per tile: Σ_l Σ_i |v_l(x_i^l)|²
    N, L, H, D,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    STORE_STATES: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    layer_stride = tl.cast(N, tl.int64) * D

    dt = tl.load(dt_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    sq = tl.zeros([BLOCK_N], dtype=x.dtype)
    for layer in range(L):
        if STORE_STATES:
            tl.store(states_ptr + layer * layer_stride + offs, x, mask=mask)
        v = _velocity(
            x, w1_ptr + layer * H * D, b1_ptr + layer * H, w2_ptr + layer * D * H, b2_ptr + layer * D,
            H, D, ACT, BLOCK_H, BLOCK_D,
        )
        v = tl.where(row_ok[:, None], v, 0.0)  # padded rows would add b2-driven velocity to the energy
        sq += tl.sum(v * v, axis=1)
        x = x + dt * v
    tl.store(out_ptr + offs, x, mask=mask)
    tl.store(sq_ptr + pid, tl.sum(sq, axis=0))


@triton.jit(do_not_specialize=["N", "num_tiles"])
def _euler_flow_bwd_kernel(
    gout_ptr,  # (N, D) dLoss/dx_final
    gs_ptr,  # (1,) dLoss/dS, S = Σ_l Σ_i |v_l(x_i^l)|² (the kinetic sum)
    states_ptr,  # (L, N, D)
    w1_ptr,  # (L, H, D)
    b1_ptr,  # (L, H)
    w2_ptr,  # (L, D, H)
    b2_ptr,  # (L, D)
    dt_ptr,  # (1,)
    gx_ptr,  # (N, D) dLoss/dx
    part_ptr,  # (P, L·(2HD + H + D)) this program's partial grads: [W1 (L,H,D) | W2 (L,D,H) | b1 (L,H) | b2 (L,D)]
    N, L, H, D, num_tiles,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    num_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    layer_stride = tl.cast(N, tl.int64) * D

    # This program's slot of the partial-gradient buffer, and the sections inside it.
    per_layer = 2 * H * D + H + D
    slot = part_ptr + pid.to(tl.int64) * L * per_layer
    gw1_base = slot
    gw2_base = slot + L * H * D
    gb1_base = slot + 2 * L * H * D
    gb2_base = gb1_base + L * H

    dt = tl.load(dt_ptr)
    # dLoss/dv = 2 · dLoss/dS · v.
    e_coef = 2 * tl.load(gs_ptr)

    for tile in range(pid, num_tiles, num_progs):
        rows = tl.cast(tile, tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * D + cols[None, :]
        g = tl.load(gout_ptr + offs, mask=mask, other=0.0)  # dLoss/dx^{l+1}
        for rev in range(L):
            layer = L - 1 - rev
            w1_l = w1_ptr + layer * H * D
            b1_l = b1_ptr + layer * H
            w2_l = w2_ptr + layer * D * H
            x = tl.load(states_ptr + layer * layer_stride + offs, mask=mask, other=0.0)
            v = _velocity(x, w1_l, b1_l, w2_l, b2_ptr + layer * D, H, D, ACT, BLOCK_H, BLOCK_D)
            gv = dt * g + e_coef * v
            gv = tl.where(row_ok[:, None], gv, 0.0)  # padded rows contribute to no gradient

            gb2_ptrs = gb2_base + layer * D + cols
            tl.store(gb2_ptrs, tl.load(gb2_ptrs, mask=col_ok, other=0.0) + tl.sum(gv, axis=0), mask=col_ok)

            g_new = g
            for h0 in range(0, H, BLOCK_H):
                w1, b1, w2t = _load_chunk(w1_l, b1_l, w2_l, h0, H, D, BLOCK_H, BLOCK_D)
                hs = h0 + tl.arange(0, BLOCK_H)
                h_ok = hs < H
                wmask = h_ok[:, None] & col_ok[None, :]

                z = tl.sum(x[:, None, :] * w1[None, :, :], axis=2) + b1[None, :]  # (BN, BH)
                h = _rho(z, ACT)
                gz = tl.sum(gv[:, None, :] * w2t[None, :, :], axis=2) * _rho_grad(z, h, ACT)  # (BN, BH)

                # grad_W2[d, h] += Σ_i gv_i[d] h_i[h], held transposed as (BH, BD)
                gw2_ptrs = gw2_base + layer * D * H + cols[None, :] * H + hs[:, None]
                gw2 = tl.sum(h[:, :, None] * gv[:, None, :], axis=0)
                tl.store(gw2_ptrs, tl.load(gw2_ptrs, mask=wmask, other=0.0) + gw2, mask=wmask)
                # grad_W1[h, d] += Σ_i gz_i[h] x_i[d]
                gw1_ptrs = gw1_base + layer * H * D + hs[:, None] * D + cols[None, :]
                gw1 = tl.sum(gz[:, :, None] * x[:, None, :], axis=0)
                tl.store(gw1_ptrs, tl.load(gw1_ptrs, mask=wmask, other=0.0) + gw1, mask=wmask)
                # grad_b1[h] += Σ_i gz_i[h]
                gb1_ptrs = gb1_base + layer * H + hs
                tl.store(gb1_ptrs, tl.load(gb1_ptrs, mask=h_ok, other=0.0) + tl.sum(gz, axis=0), mask=h_ok)

                g_new += tl.sum(gz[:, :, None] * w1[None, :, :], axis=1)  # W1ᵀ gz
            g = g_new
        tl.store(gx_ptr + offs, g, mask=mask)
        # The next tile reads back the partials stored above, possibly from other threads.
        tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


# Whether the kernels above were built for Triton's CPU interpreter: decided by TRITON_INTERPRET at the
# moment this module was imported (triton.jit reads it then), not by its value now. Triton's own
# library functions (tl.sum, tl.zeros, ...) are decorated when triton is imported: the interpreter can
# only run them if TRITON_INTERPRET=1 was already set then.
_INTERPRETED = isinstance(_euler_flow_fwd_kernel, InterpretedFunction)
_LIBRARY_INTERPRETED = isinstance(tl.standard.sum, InterpretedFunction)


def cpu_unavailable_reason() -> str | None:
    """Why these kernels cannot take CPU tensors in this process, or None when they can (interpreter)."""
    if _INTERPRETED and _LIBRARY_INTERPRETED:
        return None
    if not _INTERPRETED:
        return (
            "the Triton euler_flow kernels were compiled for the GPU: move the tensors to a CUDA device, or set "
            "TRITON_INTERPRET=1 in the environment before Python starts (Triton's slow CPU interpreter)"
        )
    return (
        "TRITON_INTERPRET=1 was set after triton was imported, so triton's own library functions were built "
        "for the GPU: set TRITON_INTERPRET=1 in the environment before Python starts"
    )


def _check_device(t: Tensor) -> None:
    if t.device.type == "cpu":
        reason = cpu_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"euler_flow (triton) got CPU tensors, but {reason}")


def _pow2(n: int) -> int:
    return max(2, triton.next_power_of_2(max(int(n), 1)))


def _configs(n: int, width: int, dim: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_H, BLOCK_D, num_warps) for N points, hidden width H and dimension D."""
    block_d = _pow2(dim)
    if _INTERPRETED:
        # The interpreter pays ~1 ms per executed op whatever the block size: big blocks, few
        # tiles and H-chunks. (Tests force small blocks to exercise the tile and chunk loops.)
        return min(64, _pow2(n)), min(64, _pow2(width)), block_d, 1
    # GPU: the largest blocks that compile without register spills for sm_90 at D <= 4, 4 warps
    # (checked offline with triton.compile + cuobjdump --dump-resource-usage: fp32 forward 64x32
    # 213 registers, backward 32x32 204; fp64 forward 32x16 216, backward 16x16 224). The cap on
    # the (BLOCK_N, BLOCK_H, BLOCK_D) register block keeps that bound for larger D.
    wide = dtype == torch.float64
    block_n, block_h = ((16, 16) if wide else (32, 32)) if backward else ((32, 16) if wide else (64, 32))
    cap = block_n * block_h * 4
    block_n = min(block_n, _pow2(n))
    block_h = min(block_h, _pow2(width))
    while block_n * block_h * block_d > cap and block_h > 2:
        block_h //= 2
    while block_n * block_h * block_d > cap and block_n > 2:
        block_n //= 2
    return block_n, block_h, block_d, 4


def _check(name: str, t: Tensor, shape: tuple[int, ...], like: Tensor) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.dtype != like.dtype or t.device != like.device:
        raise TypeError(f"{name} must have dtype {like.dtype} on {like.device}, got {t.dtype} on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_inputs(x: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, activation: str):
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"x must be float32 or float64, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (N, D) with N >= 1, got {tuple(x.shape)}")
    if weight1.dim() != 3:
        raise ValueError(f"weight1 must have shape (L, H, D), got {tuple(weight1.shape)}")
    layers, width, dim = weight1.shape
    _check("x", x, (x.shape[0], dim), x)
    _check("weight1", weight1, (layers, width, dim), x)
    _check("bias1", bias1, (layers, width), x)
    _check("weight2", weight2, (layers, dim, width), x)
    _check("bias2", bias2, (layers, dim), x)
    return layers, width, dim


def forward(
    x: Tensor,  # (N, D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
    *,
    save_states: bool = True,
    block_n: int | None = None,
    block_h: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # (N, D), (L, N, D) or (0, N, D), ()
    """The fused flow: (x at time 1, states with states[l] = input of block l (empty unless save_states),
    the kinetic sum S = Σ_l Σ_i |v_l(x_i^l)|²): the launcher contract of fastlddmm/ops/flow.

    Contiguous tensors of one dtype (float32 or float64) on a CUDA device, or on the CPU under
    TRITON_INTERPRET=1. block_n / block_h override the tile sizes (powers of two; for tests).
    """
    layers, width, dim = _check_inputs(x, weight1, bias1, weight2, bias2, activation)
    _check_device(x)
    n = x.shape[0]
    states = x.new_empty((layers if save_states else 0, n, dim))
    if layers == 0:
        return x.clone(), states, x.new_zeros(())
    bn, bh, bd, warps = _configs(n, width, dim, x.dtype, backward=False)
    bn, bh = block_n or bn, block_h or bh
    num_tiles = triton.cdiv(n, bn)
    out = torch.empty_like(x)
    sq = x.new_empty((num_tiles,))
    dt_t = torch.full((1,), float(dt), dtype=x.dtype, device=x.device)  # see the module docstring
    _euler_flow_fwd_kernel[(num_tiles,)](
        x, weight1, bias1, weight2, bias2, dt_t, out, states if save_states else out, sq,
        n, layers, width, dim,
        ACT=_ACT_CODE[activation], BLOCK_N=bn, BLOCK_H=bh, BLOCK_D=bd, STORE_STATES=save_states, num_warps=warps,
    )
    return out, states, sq.sum()


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_programs(num_tiles: int, per_slot: int, device: torch.device) -> int:
    if _INTERPRETED or device.type != "cuda":
        # Two programs: enough to exercise the grid-stride loop and the sum over partials.
        return min(num_tiles, 2)
    sms = _sm_count(device)
    return max(1, min(num_tiles, 2 * sms, _PARTIAL_BUDGET // max(per_slot, 1)))


def backward(
    grad_x_final: Tensor | None,  # (N, D) or None (= zero)
    grad_kinetic_sum: Tensor | None,  # () dLoss/dS, S = Σ_l Σ_i |v_l(x_i^l)|², or None (= zero)
    states: Tensor,  # (L, N, D)
    weight1: Tensor,  # (L, H, D)
    bias1: Tensor,  # (L, H)
    weight2: Tensor,  # (L, D, H)
    bias2: Tensor,  # (L, D)
    dt: float,
    activation: str,
    *,
    block_n: int | None = None,
    block_h: int | None = None,
    num_programs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # (N, D), then the parameters' shapes
    """Gradients (x, weight1, bias1, weight2, bias2) of a loss given its gradients wrt (x_final, S).

    Recomputes the hidden activations from states; deterministic for a given device and sizes.
    block_n / block_h / num_programs override the tiling (for tests).
    """
    if states.dim() != 3:
        raise ValueError(f"states must have shape (L, N, D), got {tuple(states.shape)}")
    layers, n, dim = states.shape
    like = states[0] if layers > 0 else states.new_empty((n, dim))
    _, width, _ = _check_inputs(like, weight1, bias1, weight2, bias2, activation)
    _check_device(like)
    if weight1.shape[0] != layers:
        raise ValueError(f"states has {layers} layers but weight1 has {weight1.shape[0]}")
    if grad_x_final is None:
        grad_x_final = like.new_zeros((n, dim))
    _check("grad_x_final", grad_x_final, (n, dim), like)
    if grad_kinetic_sum is None:
        grad_kinetic_sum = like.new_zeros(())
    if grad_kinetic_sum.numel() != 1:
        raise ValueError(f"grad_kinetic_sum must be a scalar tensor, got shape {tuple(grad_kinetic_sum.shape)}")
    gs = grad_kinetic_sum.detach().to(dtype=like.dtype, device=like.device).reshape(1).contiguous()

    if layers == 0:
        return (grad_x_final.clone(), torch.zeros_like(weight1), torch.zeros_like(bias1),
                torch.zeros_like(weight2), torch.zeros_like(bias2))
    bn, bh, bd, warps = _configs(n, width, dim, states.dtype, backward=True)
    bn, bh = block_n or bn, block_h or bh
    num_tiles = triton.cdiv(n, bn)
    per_layer = 2 * width * dim + width + dim
    progs = num_programs or _num_programs(num_tiles, layers * per_layer, states.device)
    progs = max(1, min(progs, num_tiles))

    grad_x = torch.empty_like(grad_x_final)
    partials = states.new_zeros((progs, layers * per_layer))
    dt_t = torch.full((1,), float(dt), dtype=states.dtype, device=states.device)
    _euler_flow_bwd_kernel[(progs,)](
        grad_x_final, gs, states, weight1, bias1, weight2, bias2, dt_t, grad_x, partials,
        n, layers, width, dim, num_tiles,
        ACT=_ACT_CODE[activation], BLOCK_N=bn, BLOCK_H=bh, BLOCK_D=bd, num_warps=warps,
    )
    total = partials.sum(0) if progs > 1 else partials[0]
    # Separate tensors (clones of small slices): outputs of a torch.library op must not alias.
    lhd, lh = layers * width * dim, layers * width
    gw1, gw2, gb1, gb2 = total.split([lhd, lhd, lh, layers * dim])
    return (
        grad_x,
        gw1.view(layers, width, dim).clone(),
        gb1.view(layers, width).clone(),
        gw2.view(layers, dim, width).clone(),
        gb2.view(layers, dim).clone(),
    )
