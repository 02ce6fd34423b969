"""`Backbone.tokens` on the main thread vs on a second thread (where the device scheduler runs it).

    .venv/bin/python benchmarks/forward_thread.py [--backbone dinov2_vits14] [--batch 64] [--rounds 3]

Alternates the two, `--rounds` times, and prints img/s and minor page faults for each and the
thread's rate ÷ the main thread's. A reproducer for the CPU refit's forwards running slower than
benchmarks/refit.py's pure forward (issue 16): on 2 cores the thread was the slower one.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch

    from soapflow.backbones import load_backbone

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    bb = load_backbone(a.backbone, layer=-1)
    size = bb.image_size
    rates: dict[str, list[float]] = {"main": [], "thread": []}

    def measure(where: str) -> None:
        bb.tokens(torch.randn(a.batch, 3, size, size))  # warm this thread's pools
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        for _ in range(3):
            bb.tokens(torch.randn(a.batch, 3, size, size))
        rate = 3 * a.batch / (time.perf_counter() - t)
        rates[where].append(rate)
        print(f"{where:6s} {rate:6.2f} img/s  minor faults {resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}",
              flush=True)

    for _ in range(a.rounds):
        measure("main")
        worker = threading.Thread(target=measure, args=("thread",))
        worker.start()
        worker.join()
    m, t = (sum(v) / len(v) for v in (rates["main"], rates["thread"]))
    print(f"{a.backbone} batch {a.batch}, {torch.get_num_threads()} torch threads: main {m:.2f} img/s, "
          f"thread {t:.2f} img/s = {t / m:.2f}× the main thread's")


if __name__ == "__main__":
    main()
