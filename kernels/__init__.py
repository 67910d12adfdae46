"""Triton kernels, shipped as fastlddmm.kernels."""
