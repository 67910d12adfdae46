"""asv: one registration step (flow + data term + backward + Adam step).

RegistrationStep: the loop of fl.register with a given data term (auto backends) at 2·10^3 .. 10^5 points.
RegistrationDefaults: fl.register's defaults (Sinkhorn, blur 0.02, width 128, 10 layers) at 5000 and 50 000
points, against the same step written by hand with the eager flow and GeomLoss SamplesLoss("sinkhorn",
backend="online") (what a user would otherwise write; KeOps' CPU loop, so 5000 points only).
"""

import torch

import fastlddmm as fl

from ._common import clouds, require_backend


class RegistrationStep:
    params = ([2_000, 10_000, 100_000], ["chamfer", "sinkhorn"], ["auto"])
    param_names = ["points", "data_term", "backend"]
    timeout = 600

    def setup(self, n, data_term, backend):
        require_backend(backend)
        if data_term == "sinkhorn" and n > 10_000 and not torch.cuda.is_available():
            # the cpu soft-min: ~10 s per Sinkhorn solve at 1e5 points on 2 cores (O(N²) work)
            raise NotImplementedError("Sinkhorn above 1e4 points on the CPU: O(N²) work, tens of seconds per step")
        self.source, self.target = clouds(n, n)
        self.flow = fl.ResNetFlow(dim=3, width=64, layers=10, backend=backend)
        self.opt = torch.optim.Adam(self.flow.parameters(), lr=1e-3)
        self.term = data_term
        self.backend = backend

    def time_one_iteration(self, n, data_term, backend):
        from fastlddmm.registration import data_term_value

        self.opt.zero_grad()
        moved, energy = self.flow.forward_with_energy(self.source)
        loss = data_term_value(self.term, moved, self.target, blur=0.02, backend=self.backend) / (2 * 0.1**2) + energy
        loss.backward()
        self.opt.step()


class RegistrationDefaults:
    params = ([1_000, 5_000, 50_000], ["fl.register", "eager+geomloss-online"])
    param_names = ["points", "method"]
    timeout = 900

    def setup(self, n, method):
        if method != "fl.register" and n > 5_000:
            raise NotImplementedError("GeomLoss online on the CPU: ~100x the 5000-point step (O(N²)), ~30 min")
        from benchmarks.compare import _register_call

        self.call = _register_call("fastlddmm register" if method == "fl.register" else "eager + geomloss online",
                                   n, "cpu")

    def time_register_steps(self, n, method):
        """fl.register(steps=S) or S hand-written steps (S = 3 at 5000 points, 2 at 50 000)."""
        self.call()
