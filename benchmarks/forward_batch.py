"""CPU forward of `Backbone.tokens` (micro-batched) against one forward of the whole batch.

    .venv/bin/python benchmarks/forward_batch.py [--backbone dinov2_vits14] [--weights W]
                                                 [--batch 64] [--image-size 224] [--repeat 3]

Both run the same model on the same random images in this process, alternating, best of
``--repeat``. The whole-batch forward is what `Backbone.tokens` did before it split CPU batches
into micro-batches whose widest activation stays under glibc's mmap threshold; the tokens of
both are compared too.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from soapflow.backbones import load_backbone


def timed(fn) -> tuple[float, int, torch.Tensor]:
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    bb = load_backbone(args.backbone, weights=args.weights, image_size=args.image_size, device="cpu")
    x = torch.randn(args.batch, 3, bb.image_size, bb.image_size)
    whole = lambda: bb._extract_batch(x, [bb.layer])[bb.layer]  # noqa: E731 — the pre-split forward
    split = lambda: bb.tokens(x)  # noqa: E731
    bb.tokens(x[:2])  # warm-up
    runs = {"whole batch": [], "micro-batched": []}
    for _ in range(args.repeat):
        runs["whole batch"].append(timed(whole))
        runs["micro-batched"].append(timed(split))
    best = {k: min(v, key=lambda r: r[0]) for k, v in runs.items()}
    print(f"{args.backbone} @ {bb.image_size}px, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"micro-batch {bb._cpu_micro_batch()}")
    for label, (t, faults, _) in best.items():
        print(f"  {label:14s} {args.batch / t:7.1f} images/s   {faults / 1e3:8.0f}k page faults")
    a, b = best["whole batch"][2], best["micro-batched"][2]
    print(f"  speed-up: {best['whole batch'][0] / best['micro-batched'][0]:.2f}x   "
          f"max |Δtoken| / max |token| = {float((a - b).abs().max() / a.abs().max()):.1e}")


if __name__ == "__main__":
    main()
