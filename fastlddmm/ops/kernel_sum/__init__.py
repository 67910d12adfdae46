"""The kernel_sum op: Σ_j k(x_i, y_j) b_j for the kernels of GeomLoss's kernel losses
(fastlddmm.compat.SamplesLoss("energy" | "gaussian" | "laplacian")).

With d² = |x - y|² and r = sqrt(max(d², 1e-8)) (GeomLoss's "tensorized" floor):
    gaussian   k = exp(-d² / (2 blur²))
    laplacian  k = exp(-sqrt(max(d² / blur², 1e-8)))
    energy     k = -r

The room (which backend runs: fastlddmm/dispatch.py, rule ``_auto_kernel_sum``):

    reference.py    a dense (B, N, M) kernel matrix: the ground truth
    keops.py        a KeOps Sum reduction, memory O(B·(N + M))

The contract: each backend module has

    kernel_sum(name, x (B, N, D), y (B, M, D), b (B, M), blur) -> (B, N)
    DIFFERENTIATES_Y: bool   whether the result is differentiated in y and b too (KeOps: in x only,
                             so that every gradient is the one compiled formula d/dx_i)
"""

KERNELS = ("energy", "gaussian", "laplacian")
# GeomLoss's floor on squared (scaled) distances under a square root ("tensorized" backend).
SQDIST_FLOOR = 1e-8


def kernel_params(name: str, blur: float) -> tuple[float, float, float, float, float]:
    """(q, s, g, l, e) of the unified kernel k = s·exp(-g·d² - l·r) - e·r, r = sqrt(max(q·d², 1e-8)).

    One formula for the three kernels, so that KeOps compiles it once per dtype and dimension:
    gaussian s=1, g=1/(2 blur²); laplacian q=1/blur², s=1, l=1; energy q=1, e=1.
    """
    if name == "gaussian":
        return 1.0, 1.0, 1.0 / (2 * blur**2), 0.0, 0.0
    if name == "laplacian":
        return 1.0 / blur**2, 1.0, 0.0, 1.0, 0.0
    if name == "energy":
        return 1.0, 0.0, 0.0, 0.0, 1.0
    raise ValueError(f"unknown kernel {name!r}; expected one of {KERNELS}")


def implementation(backend: str, x, y):
    """The kernel_sum backend module fastlddmm.dispatch picks for x (B, N, D) against y (B, M, D)."""
    from ... import dispatch

    return dispatch.implementation("kernel_sum", backend, dispatch.problem(x, y))
