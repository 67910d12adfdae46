"""asv: Chamfer, nearest neighbour and Sinkhorn per backend over cloud sizes.

Sizes a backend cannot reach in asv's per-benchmark timeout are skipped in setup (NotImplementedError,
asv's skip) with the reason: on a 2-core CPU brute-force O(N·M) searches cost ~100 s per call at
N = M = 1e5, and one Sinkhorn solve ~2 s at 1e3 and minutes at 1e4 (benchmarks/results/compare_cpu.md).
"""

import torch

import fastlddmm as fl

from ._common import clouds, require_backend, sync


class ChamferCPU:
    params = ([1_000, 10_000, 100_000, 1_000_000], ["reference", "cpu", "keops", "auto"])
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


class KDTreeLibrariesCPU:
    """The k-d trees a user would otherwise call for Chamfer (indices from the library, distances and
    gradients in torch): scipy's cKDTree (all cores) and pykdtree (if installed)."""

    params = ([10_000, 100_000, 1_000_000], ["scipy", "pykdtree"])
    param_names = ["points", "library"]
    timeout = 600

    def setup(self, n, library):
        if library == "pykdtree":
            try:
                from pykdtree.kdtree import KDTree
            except ImportError:
                raise NotImplementedError("pykdtree is not installed (pip install pykdtree)") from None
            self.query = lambda ref, q: KDTree(ref).query(q, k=1)[1].astype("int64")
        else:
            from scipy.spatial import cKDTree

            self.query = lambda ref, q: cKDTree(ref).query(q, k=1, workers=-1)[1]
        self.x, self.y = clouds(n, n)
        self.xg = self.x.clone().requires_grad_()

    def time_chamfer_forward_backward(self, n, library):
        xs, ys = self.xg.detach().numpy(), self.y.numpy()
        i_xy = torch.from_numpy(self.query(ys, xs))
        i_yx = torch.from_numpy(self.query(xs, ys))
        loss = (self.xg - self.y[i_xy]).square().sum(-1).mean() + (self.y - self.xg[i_yx]).square().sum(-1).mean()
        loss.backward()


class SinkhornCPU:
    params = ([1_000, 2_000, 10_000], ["reference", "cpu", "keops", "auto", "geomloss-online"])
    param_names = ["points", "backend"]
    device = "cpu"
    timeout = 600
    max_points = {"reference": (2_000, "the dense reference: ~1 min per call at 1e4 on 2 cores"),
                  "keops": (2_000, "KeOps' CPU loop: ~30 s per call at 1e4"),
                  "geomloss-online": (2_000, "KeOps' CPU loop: ~30 s per call at 1e4")}

    def setup(self, n, backend):
        if backend == "geomloss-online":
            from geomloss import SamplesLoss

            loss = SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.5, backend="online")
            self.loss = lambda x, y: loss(x, y)
            backend = "keops"  # for the availability check below
        else:
            self.loss = lambda x, y, be=backend: fl.sinkhorn(x, y, blur=0.05, backend=be)
        ChamferCPU.setup(self, n, backend)

    def time_sinkhorn_forward_backward(self, n, backend):
        self.loss(self.xg, self.y).backward()
        sync(self.device)

    def peakmem_sinkhorn_forward_backward(self, n, backend):
        self.loss(self.xg, self.y).backward()


class ChamferGPU(ChamferCPU):
    params = ([10_000, 100_000, 1_000_000], ["reference", "keops", "triton", "auto"])
    device = "cuda"
    max_points = {"reference": (30_000, "the dense reference holds (N, M) matrices")}


class SinkhornGPU(SinkhornCPU):
    params = ([10_000, 100_000], ["reference", "keops", "triton", "auto"])
    max_points = {"reference": (30_000, "the dense reference holds four (N, M) matrices")}
    device = "cuda"
