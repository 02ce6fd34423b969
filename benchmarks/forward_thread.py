"""A CPU forward on a thread that holds the process's only OpenMP team, vs the same forward while
another live thread keeps a team of its own (what the device thread met in a refit while the model
had been loaded on the main thread; see soapflow/threads.py).

    .venv/bin/python benchmarks/forward_thread.py [--backbone dinov2_vits14] [--batch 64] [--rounds 3]

Each round runs one batch both ways in turn, each on a new thread (as the device scheduler's), so
the box's drift, which moves a whole run by ±10 % on 2 cores, falls on both alike. For the second
way a holder thread first runs one multi-threaded op, which gives it a team, and waits until the
forward is done. Prints each way's img/s, CPU use (process CPU time ÷ wall time: at most the
number of torch threads) and voluntary context switches per batch (the workers' sleeps), and the
second way's time ÷ the first's.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def timed(call) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds of the whole process, voluntary context switches."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    call()
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, after.ru_nvcsw - before.ru_nvcsw


def main() -> None:
    import torch

    from soapflow.backbones import load_backbone
    from soapflow.threads import on_passing_thread

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if torch.get_num_threads() < 2:
        sys.exit("torch runs one thread here: there are no OpenMP teams to compare")
    bb = load_backbone(a.backbone, layer=-1)
    # made on a passing thread too: the main thread must hold no team of its own
    x = on_passing_thread(lambda: torch.randn(a.batch, 3, bb.image_size, bb.image_size))

    def forward() -> None:
        bb.tokens(x)

    def beside_a_team() -> tuple[float, float, int]:
        has_team, done = threading.Event(), threading.Event()

        def hold() -> None:
            torch.ones(1 << 22).add_(1)  # multi-threaded: this thread now has a team, until it exits
            has_team.set()
            done.wait()

        holder = threading.Thread(target=hold, daemon=True)
        holder.start()
        has_team.wait()
        try:
            return on_passing_thread(timed, forward)
        finally:
            done.set()
            holder.join()

    ways = {"alone": lambda: on_passing_thread(timed, forward), "beside a team": beside_a_team}
    on_passing_thread(forward)  # warm-up
    totals = {name: [0.0, 0.0, 0] for name in ways}
    ratios = []
    for r in range(a.rounds):
        walls = {}
        for name, way in ways.items():
            walls[name], *_ = measured = way()
            for k, v in enumerate(measured):
                totals[name][k] += v
        ratios.append(walls["beside a team"] / walls["alone"])
        print(f"round {r + 1}: beside a team {ratios[-1]:.3f}× the time alone", flush=True)
    images = a.rounds * a.batch
    print(f"{a.backbone} batch {a.batch}, {torch.get_num_threads()} torch threads, {a.rounds} rounds interleaved:")
    for name, (wall, cpu, switches) in totals.items():
        print(f"  {name:14s} {images / wall:7.2f} img/s  CPU use {cpu / wall:4.2f}  "
              f"{switches // a.rounds:6d} voluntary switches per batch  "
              f"{wall / totals['alone'][0]:.3f}× the time alone")
    print(f"  per round: median {statistics.median(ratios):.3f}×, {sum(r > 1 for r in ratios)} of {len(ratios)} "
          "rounds slower beside a team")


if __name__ == "__main__":
    main()
