"""The GPU decode path's DataLoader: JPEG bytes from a worker process to the extracting one.

    .venv/bin/python benchmarks/jpeg_loader.py [--n 2000] [--chunk 64] [--workers 1] [--repeat 3]

Now: `EncodedImageDataset` items are ``bytes``, so a chunk travels as one pickle. Before: each
item was a 1-D uint8 tensor, and torch moves every tensor through a shared-memory segment of its
own. Same files (--n JPEGs at 500x375, as benchmarks/refit.py --jpegs writes them), same worker
count, alternating, best of --repeat; what arrives is compared too. On a GPU this transport
feeds nvJPEG; at ~3k img/s from one worker it was the H100 check's input limit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from refit import write_jpegs
from soapflow.sources import EncodedImageDataset, open_source


class AsTensors(EncodedImageDataset):
    """The items as they were: each file's bytes in a tensor of its own."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return torch.frombuffer(bytearray(item), dtype=torch.uint8) if isinstance(item, bytes) else item


def drain(dataset, batches, workers) -> tuple[float, list[bytes]]:
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=list,
                                         prefetch_factor=2)
    t = time.perf_counter()
    got = [bytes(x) if isinstance(x, bytes) else x.numpy().tobytes() for batch in loader for x in batch]
    return time.perf_counter() - t, got


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="soapflow-bench-jpegs-") as d:
        src = open_source(write_jpegs(Path(d), args.n))
        files = src.dataset(224, (0.5,) * 3, (0.5,) * 3, "bicubic")
        batches = [list(range(s, min(len(src), s + args.chunk))) for s in range(0, len(src), args.chunk)]
        best, arrived = {}, {}
        for _ in range(args.repeat):
            for name, ds in (("tensors", AsTensors(files)), ("bytes", EncodedImageDataset(files))):
                t, arrived[name] = drain(ds, batches, args.workers)
                best[name] = min(best.get(name, 1e9), t)
        assert arrived["tensors"] == arrived["bytes"], "the two transports delivered different data"
    print(f"{len(src)} JPEGs (500x375), chunks of {args.chunk}, {args.workers} worker(s), best of {args.repeat}; "
          "same bytes arrive")
    for name in ("tensors", "bytes"):
        print(f"  {name:8s}: {len(src) / best[name]:8.0f} img/s")
    print(f"  speed-up: {best['tensors'] / best['bytes']:.1f}×")


if __name__ == "__main__":
    main()
