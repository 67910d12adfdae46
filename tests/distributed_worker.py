"""Run by tests/test_distributed.py under `torchrun --nproc-per-node P`: computes every case of
CASES_FILE from shards, and writes this rank's results to OUT_DIR/rank<r>.pt.

Usage: torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py CASES_FILE OUT_DIR
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fastlddmm as fl
from fastlddmm import distributed as fld


def distance_case(case: dict) -> dict:
    if case.get("no_reduce_scatter"):  # the all-reduce fallback of backends without a reduce-scatter
        fld._REDUCE_SCATTER_MISSING.add(str(dist.get_backend()))
        try:
            return distance_case({**case, "no_reduce_scatter": False})
        finally:
            fld._REDUCE_SCATTER_MISSING.clear()
    x, y = fld.shard(case["x"]).clone().requires_grad_(), fld.shard(case["y"]).clone().requires_grad_()
    y_arg = fld.gather_cloud(y) if case.get("gather_y") else y  # gathered once, no gradient
    if case["kind"] == "chamfer":
        value = fld.chamfer(x, y_arg, backend=case.get("backend", "auto"))
    else:
        a = None if case.get("a") is None else fld.shard(case["a"])
        b = None if case.get("b") is None else fld.shard(case["b"])
        value = fld.sinkhorn(x, y_arg, a=a, b=b, **case["options"])
    value.backward()
    return {"value": value.detach(), "grad_x": x.grad, "grad_y": y.grad}


def registration_case(case: dict) -> dict:
    reg = fl.register(fld.shard(case["source"]), fld.shard(case["target"]), distributed=True, progress=False,
                      **case["options"])
    return {"history": reg.history, "flow": {k: v.detach().clone() for k, v in reg.flow.state_dict().items()},
            "center": reg.center, "scale": reg.scale}


def error_case(case: dict) -> dict:
    """Spoils rank 1's shard (NaN, or a different point dimension): every rank must raise, none hang."""
    x, y = fld.shard(case["x"]).clone(), fld.shard(case["y"]).clone()
    if dist.get_rank() == 1:
        if case["spoil"] == "nan":
            x[0, 0] = float("nan")
        else:
            x, y = x[:, :2], y[:, :2]
    call = {"chamfer": lambda: fld.chamfer(x, y), "sinkhorn": lambda: fld.sinkhorn(x, y),
            "register": lambda: fl.register(x, y, distributed=True, progress=False, steps=1, width=4, layers=1)}
    try:
        call[case["call"]]()
    except ValueError as err:
        return {"error": str(err)}
    return {"error": None}


def main() -> None:
    cases_file, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    fld.init()
    cases = torch.load(cases_file, weights_only=False)
    results = {}
    for name, case in cases.items():  # an exception ends every rank (torchrun stops the others)
        print(f"rank {dist.get_rank()}: {name}", flush=True)
        run = {"register": registration_case, "error": error_case}.get(case["kind"], distance_case)
        results[name] = run(case)
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
