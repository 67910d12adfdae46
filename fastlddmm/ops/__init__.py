"""The ops, one room each: the reference twin, every backend and the contract they share.

    euler_flow/   the fused ResNet-LDDMM flow, forward and backward
    softmin/      Sinkhorn's reduction
    projection/   the barycentric projection's soft-max weighted sum
    nearest/      K nearest neighbours
    kernel_sum/   GeomLoss's kernel sums

Which backend runs is decided in one place, fastlddmm/dispatch.py.
"""

from .euler_flow import euler_flow

__all__ = ["euler_flow"]
