"""asv: Chamfer, nearest neighbour and Sinkhorn per backend over cloud sizes.

Sizes a backend cannot reach in asv's per-benchmark timeout are skipped in setup (NotImplementedError,
asv's skip) with the reason: on a 2-core CPU brute-force O(N·M) searches cost ~100 s per call at
N = M = 1e5, and one Sinkhorn solve ~2 s at 1e3 and minutes at 1e4 (benchmarks/results/compare_cpu.md).
"""

import torch

import fastlddmm as fl

from ._common import clouds, require_backend, sync


class ChamferCPU:
    params = ([1_000, 10_000, 100_000], ["reference", "keops", "auto"])
    param_names = ["points", "backend"]
    device = "cpu"
    timeout = 600
    # backend -> (largest N = M, why not beyond)
    max_points = {"reference": (10_000, "the dense reference holds (N, M) matrices"),
                  "keops": (10_000, "brute force O(N·M) on the CPU: ~100 s per call at 1e5")}

    def setup(self, n, backend):
        require_backend(backend, self.device)
        limit, why = self.max_points.get(backend, (None, ""))
        if limit is not None and n > limit:
            raise NotImplementedError(f"{backend} above {limit} points: {why}")
        self.x, self.y = clouds(n, n, device=self.device)
        self.xg = self.x.clone().requires_grad_()

    def time_nearest(self, n, backend):
        fl.nearest(self.x, self.y, backend=backend)
        sync(self.device)

    def time_chamfer_forward_backward(self, n, backend):
        fl.chamfer(self.xg, self.y, backend=backend).backward()
        sync(self.device)

    def peakmem_chamfer_forward_backward(self, n, backend):
        fl.chamfer(self.xg, self.y, backend=backend).backward()


class SinkhornCPU:
    params = ([1_000, 2_000], ["reference", "keops", "auto"])
    param_names = ["points", "backend"]
    device = "cpu"
    timeout = 600
    max_points = {"reference": (30_000, "the dense reference holds four (N, M) matrices")}

    def setup(self, n, backend):
        ChamferCPU.setup(self, n, backend)

    def time_sinkhorn_forward_backward(self, n, backend):
        fl.sinkhorn(self.xg, self.y, blur=0.05, backend=backend).backward()
        sync(self.device)

    def peakmem_sinkhorn_forward_backward(self, n, backend):
        fl.sinkhorn(self.xg, self.y, blur=0.05, backend=backend).backward()


class ChamferGPU(ChamferCPU):
    params = ([10_000, 100_000, 1_000_000], ["reference", "keops", "triton", "auto"])
    device = "cuda"
    max_points = {"reference": (30_000, "the dense reference holds (N, M) matrices")}


class SinkhornGPU(SinkhornCPU):
    params = ([10_000, 100_000], ["reference", "keops", "triton", "auto"])
    device = "cuda"
