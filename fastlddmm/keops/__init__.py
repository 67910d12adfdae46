"""KeOps backends of the distances: nearest neighbour / Chamfer (ArgMin reductions) and Sinkhorn
(logsumexp reductions), with O(N + M) memory on CPU and GPU.

pykeops is optional (``pip install 'fastlddmm[keops]'``, needs g++ or nvcc at run time) and is
imported only when one of these functions is first called. KeOps compiles each new formula (per
reduction, point dimension D and dtype) with g++/nvcc on first use, ~10-20 s each on a CPU, and
caches the result on disk in ``pykeops.get_build_folder()`` (``~/.cache/keops<version>/...``);
later calls and later processes reuse it. Delete that folder (or call ``pykeops.clean_pykeops()``)
to force a rebuild.
"""

from ._lazy import keops_available
from .chamfer import nearest_index
from .sinkhorn import sinkhorn_projection, softmin, softmin_parts

# The Sinkhorn divergence and potentials with KeOps: fl.sinkhorn(..., backend="keops"), which runs the shared
# loop of fastlddmm.reference.sinkhorn with softmin_parts(p).
__all__ = ["keops_available", "nearest_index", "sinkhorn_projection", "softmin", "softmin_parts"]
