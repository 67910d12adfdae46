"""Triton backends of the distances: thin wrappers over the kernels in fastlddmm.kernels.

softmin   the streaming soft-min of the Sinkhorn loop, and the soft-max weighted sum of the barycentric
          projection, as torch.autograd.Functions (kernels/softmin.py)
sinkhorn  the solver module that fastlddmm.distances dispatches to for backend="triton": the generic
          loop of fastlddmm.reference.sinkhorn with the Triton soft-min plugged in
nearest   the streaming min/argmin index finder (kernels/nearest.py)

CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was imported (slow, for
tests). Submodules import triton, so nothing is imported from here.
"""
