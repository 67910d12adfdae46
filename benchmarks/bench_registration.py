"""asv: one registration iteration (flow + data term + backward + Adam step) at 2·10^3 .. 10^5 points."""

import torch

import fastlddmm as fl

from ._common import clouds, require_backend


class RegistrationStep:
    params = ([2_000, 10_000, 100_000], ["chamfer", "sinkhorn"], ["auto"])
    param_names = ["points", "data_term", "backend"]
    timeout = 600

    def setup(self, n, data_term, backend):
        require_backend(backend)
        if data_term == "sinkhorn" and n > 2_000 and not torch.cuda.is_available():
            # a Sinkhorn solve costs ~2 s at 1e3 points on 2 cores and grows as N²: minutes at 1e4
            raise NotImplementedError("Sinkhorn above 2e3 points on the CPU: O(N²) work, minutes per iteration")
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
