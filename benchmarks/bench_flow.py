"""asv: the fused Euler flow (forward, forward+backward) per backend, over points × width × layers."""

import torch

import fastlddmm as fl

from ._common import flow_inputs, require_backend, sync


class EulerFlowCPU:
    params = ([1_000, 20_000, 200_000], [16, 64, 128], [10], ["reference", "compile", "cpu"])
    param_names = ["points", "width", "layers", "backend"]
    device = "cpu"
    timeout = 600

    def setup(self, n, width, layers, backend):
        self.inputs = flow_inputs(n, width, layers, device=self.device)
        self.dt = 1.0 / layers
        self.grad_inputs = [t.clone().requires_grad_() for t in self.inputs]
        if backend == "compile":  # torch.compile of the eager reference, compiled here (static shapes)
            if width != 64 or self.device != "cpu":
                raise NotImplementedError("torch.compile: Inductor takes 30-70 s per shape on 2 cores: width 64 only")
            self.flow = torch.compile(fl.reference.euler_flow, dynamic=False)
            self._forward_backward(backend)
        else:
            require_backend(backend, self.device)
            self.flow = lambda *a, be=backend: fl.ops.euler_flow(*a, backend=be)

    def _forward_backward(self, backend):
        x_final, energy = self.flow(*self.grad_inputs, self.dt, "relu")
        (x_final.square().sum() + energy).backward()
        sync(self.device)

    def time_forward(self, n, width, layers, backend):
        with torch.no_grad():
            self.flow(*self.inputs, self.dt, "relu")
        sync(self.device)

    def time_forward_backward(self, n, width, layers, backend):
        self._forward_backward(backend)

    def peakmem_forward_backward(self, n, width, layers, backend):
        self._forward_backward(backend)


class EulerFlowGPU(EulerFlowCPU):
    params = ([100_000, 1_000_000], [64, 128, 500], [10], ["reference", "triton", "cuda"])
    device = "cuda"

    def setup(self, n, width, layers, backend):
        require_backend(backend, self.device)
        super().setup(n, width, layers, backend)

    def track_peak_gpu_memory_mb(self, n, width, layers, backend):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        self._forward_backward(backend)
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    track_peak_gpu_memory_mb.unit = "MiB"
