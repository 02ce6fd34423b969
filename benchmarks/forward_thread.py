"""`Backbone.tokens` on the main thread vs on a second thread (where the device scheduler runs it),
each bare and through extraction's `DeviceIO.forward` (the copy into a float16 host ring and the
finite check).

    .venv/bin/python benchmarks/forward_thread.py [--backbone dinov2_vits14] [--batch 64] [--rounds 3]

Each round runs one batch four ways in turn (main, thread, main + DeviceIO, thread + DeviceIO) on
the same resident batch, so the box's drift, which moves a whole run by ±10 % on 2 cores, falls on
all four alike. Prints each way's img/s and minor page faults and its time ÷ the main thread's. A
reproducer for the CPU refit's forwards running slower than benchmarks/refit.py's pure forward
(issue 16): if the thread or DeviceIO were the cause, their ratio would show it here.
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    import torch

    from soapflow.backbones import load_backbone
    from soapflow.device_io import device_io

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    bb = load_backbone(a.backbone, layer=-1)
    x = torch.randn(a.batch, 3, bb.image_size, bb.image_size)
    io = device_io("cpu")
    ring = io.ring(2, (a.batch, *bb.grid, bb.dim), torch.float16)

    def through_io() -> None:
        io.forward(bb, x, None, ring).release()

    calls, results = queue.Queue(), queue.Queue()

    def worker() -> None:  # one long-lived thread, as the device scheduler's
        while (call := calls.get()) is not None:
            results.put(timed(call))

    def timed(call) -> tuple[float, int]:  # one way runs at a time: the process's faults are its own
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        call()
        return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    ways = {"main": (False, lambda: bb.tokens(x)), "thread": (True, lambda: bb.tokens(x)),
            "main+io": (False, through_io), "thread+io": (True, through_io)}
    for on_thread, call in ways.values():  # warm each thread's pools
        calls.put(call) if on_thread else call()
        if on_thread:
            results.get()
    seconds = dict.fromkeys(ways, 0.0)
    faults = dict.fromkeys(ways, 0)
    for r in range(a.rounds):
        for name, (on_thread, call) in ways.items():
            if on_thread:
                calls.put(call)
                s, f = results.get()
            else:
                s, f = timed(call)
            seconds[name] += s
            faults[name] += f
        print(f"round {r + 1}: " + " · ".join(f"{n} {seconds[n] / seconds['main']:.3f}×" for n in ways), flush=True)
    calls.put(None)
    images = a.rounds * a.batch
    print(f"{a.backbone} batch {a.batch}, {torch.get_num_threads()} torch threads, {a.rounds} rounds interleaved:")
    for name in ways:
        print(f"  {name:10s} {images / seconds[name]:7.2f} img/s  {seconds[name] / seconds['main']:.3f}× the main "
              f"thread's time  minor faults {faults[name] // a.rounds} per batch")


if __name__ == "__main__":
    main()
