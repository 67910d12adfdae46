"""Triton kernels, shipped as fastlddmm.kernels.

euler_flow: fused forward and backward of the ResNet-LDDMM Euler flow (launchers ``forward`` and
``backward``);
softmin: streaming log-sum-exp soft-min over tiles of y (Sinkhorn), and the soft-max weighted sum of the
barycentric projection, forward and backward, never forming the N×M cost matrix;
nearest: streaming min / argmin (Chamfer, nearest neighbour);
_common: the per-coordinate loads and stores of the fast paths, the launch device guard.
Each file has a fast path for point dimension D <= 3 (one register tile per coordinate) and a generic one.
benchmarks/kernel_report.py compiles every launcher configuration ahead of time and reads the SASS.
They take CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was in the environment
before triton was imported (Triton's CPU interpreter: slow, for tests). Submodules import triton, so
they are imported on demand, never from here.
"""
