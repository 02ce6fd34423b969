"""Writing one chunk of tokens: what extraction does now against the plain way it did before.

    .venv/bin/python benchmarks/store_write.py [--chunk 64] [--grid 14] [--dim 768] [--repeat 15]

Plain: float32 tokens cast to float16 with NumPy, checked with ``np.isfinite``, written with
zarr's default config (which compares every chunk with the NaN fill value to skip "empty"
ones). Now: the cast in torch (where extraction's tokens are), ``FeatureStore.write_chunk``
(float16 checked on its exponent bits, zarr's comparison skipped). Same data, same store
layout, same process, alternating; best of ``--repeat``; the stored bytes are compared too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from soapflow.storage.feature_store import FeatureStore


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    shape = (args.chunk, args.grid, args.grid, args.dim)
    tokens = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="soapflow-bench-write-") as d:
        stores = [FeatureStore.create(f"{d}/{name}", count=args.chunk * args.repeat, grid=(args.grid, args.grid),
                                      dim=args.dim, chunk=args.chunk) for name in ("plain", "now")]
        plain, now = stores

        def write_plain(i):
            stored = tokens.numpy().astype(np.float16)
            assert np.isfinite(stored).all()
            plain.tokens[i * args.chunk:(i + 1) * args.chunk] = stored
            plain.group["complete"][i] = 1

        def write_now(i):
            now.write_chunk(i, tokens.to(torch.float16).numpy(), finite_before_cast=True)

        best = {"plain": 1e9, "now": 1e9}
        for i in range(args.repeat):
            for name, fn in (("plain", write_plain), ("now", write_now)):
                t = time.perf_counter()
                fn(i)
                best[name] = min(best[name], time.perf_counter() - t)
        assert np.array_equal(plain.tokens[:].view(np.uint16), now.tokens[:].view(np.uint16)), "stores differ"
    mb = tokens.numel() * 2 / 1e6
    print(f"one chunk {shape}, {mb:.0f} MB as float16, best of {args.repeat}; stored bytes identical")
    for name in ("plain", "now"):
        print(f"  {name:6s}: {1e3 * best[name]:7.1f} ms  {mb / best[name]:7.0f} MB/s")
    print(f"  speed-up: {best['plain'] / best['now']:.1f}×")


if __name__ == "__main__":
    main()
