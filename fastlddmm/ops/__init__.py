"""The ops, one room each: the reference twin, every backend and the contract they share.

    flow/         euler_flow: the fused ResNet-LDDMM flow, forward and backward (the room is not named
                  after the function, which fl.ops.euler_flow names: no function shadows a module)
    softmin/      Sinkhorn's reduction
    projection/   the barycentric projection's soft-max weighted sum
    nearest/      K nearest neighbours
    kernel_sum/   GeomLoss's kernel sums

Which backend runs is decided in one place, fastlddmm/dispatch.py.
"""

from .flow import euler_flow

__all__ = ["euler_flow"]
