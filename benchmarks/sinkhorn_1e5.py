"""One fl.sinkhorn value + gradient at N = M = 10^5 (blur 0.05, scaling 0.5, float32, D = 3): issue 18's
"under 3 minutes" case, on compare.py's inputs. Prints one JSON line.

    python benchmarks/sinkhorn_1e5.py [--points N] [--backend auto]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # appended: an installed fastlddmm wins over the checkout's sources

import torch  # noqa: E402

import fastlddmm as fl  # noqa: E402
from benchmarks._common import clouds  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--points", type=int, default=100_000)
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args(argv)
    x, y = clouds(args.points, args.points)
    x.requires_grad_(True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    value = fl.sinkhorn(x, y, blur=0.05, scaling=0.5, backend=args.backend)
    value.backward()
    seconds = time.perf_counter() - t0
    print(json.dumps({"points": args.points, "backend": args.backend, "seconds": round(seconds, 2),
                      "value": float(value.detach()), "threads": torch.get_num_threads(), "load_start": load,
                      "load_end": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
