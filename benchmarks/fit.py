"""`soap fit` on a multi-GB store vs an in-memory float64 NumPy computation of the same fit.

    .venv/bin/python benchmarks/fit.py [--gb 2.0] [--dim 384] [--grid 16] [--dir /tmp/soapflow-bench-fit]

Prints wall times, their ratio (goal ≤ 1.3×) and the peak RSS of the `soap fit` process
(goal ≤ 1.5 GB). The baseline holds all tokens in memory as float64 and is timed from
there on (no I/O): mean, XᵀX, eigh, and the sign projections of real and synthetic tokens.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from storage.feature_store import FeatureStore, open_store  # noqa: E402


def make_store(uri: Path, count: int, grid: int, dim: int, chunk: int, seed: int) -> None:
    if uri.exists():
        try:
            if open_store(str(uri)).count == count and not open_store(str(uri)).pending_chunks():
                return
        except Exception:
            pass
    pattern = np.random.default_rng(99).normal(size=(grid, grid, dim)).astype(np.float32) * 2
    store = FeatureStore.create(str(uri), count=count, grid=(grid, grid), dim=dim, chunk=chunk,
                                attrs={"backbone": "bench", "layer": 0})
    rng = np.random.default_rng(seed)
    for i in store.pending_chunks():
        rows = store.chunk_range(i)
        block = rng.standard_normal((len(rows), grid, grid, dim), dtype=np.float32) + pattern
        store.write_chunk(i, block)
    store.finalize()


def baseline(real_uri: Path, synth_uri: Path) -> tuple[float, float]:
    """In-memory float64 NumPy: (load seconds, arithmetic seconds), timed separately."""
    t_load = time.perf_counter()
    real = open_store(str(real_uri)).tokens[:].astype(np.float64)
    synth = open_store(str(synth_uri)).tokens[:].astype(np.float64)
    t_load = time.perf_counter() - t_load
    n, h, w, d = real.shape
    t0 = time.perf_counter()
    z = real.reshape(-1, d)
    mean = z.mean(axis=0)
    z -= mean  # in place: no second copy
    cov = (z.T @ z) / (len(z) - 1)  # NumPy calls BLAS syrk for this, as the fit does per block
    lam, vec = np.linalg.eigh(cov)
    v = vec[:, ::-1]
    step = 1 << 16  # project in slices so the projections need no second 8 GB array
    p = np.zeros((h * w, d), np.int64)
    for start in range(0, len(z), step):
        rows = z[start:start + step]
        p += np.count_nonzero(((rows @ v) > 0).reshape(-1, h * w, d), axis=0)
    zs = synth.reshape(-1, d)
    q = np.zeros((h * w, d), np.int64)
    for start in range(0, len(zs), step):
        rows = zs[start:start + step] - mean
        q += np.count_nonzero(((rows @ v) > 0).reshape(-1, h * w, d), axis=0)
    return t_load, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0, help="size of the real store (float16)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dir", default="/tmp/soapflow-bench-fit")
    args = ap.parse_args()
    root = Path(args.dir)
    per_image = args.grid * args.grid * args.dim * 2
    n_real = int(args.gb * 2**30 / per_image)
    n_synth = n_real // 4
    t = time.perf_counter()
    make_store(root / "real", n_real, args.grid, args.dim, args.chunk, seed=0)
    make_store(root / "synth", n_synth, args.grid, args.dim, args.chunk, seed=1)
    print(f"stores: real {n_real} images ({n_real * per_image / 2**30:.2f} GiB float16), "
          f"synthetic {n_synth} images; made in {time.perf_counter() - t:.0f} s")

    t = time.perf_counter()
    cmd = [sys.executable, "-m", "soapflow.cli", "fit", str(root / "real"), str(root / "synth"),
           "--out", str(root / "artifact"), "--overwrite", "--no-plots"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_fit = time.perf_counter() - t
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB → GiB

    t_load, t_base = baseline(root / "real", root / "synth")
    print(f"soap fit (out of core, float64, dask)  : {t_fit:7.1f} s   peak RSS {peak_rss:.2f} GiB (whole process)")
    print(f"in-memory float64 NumPy (XᵀX + proj.)  : {t_base:7.1f} s   (tokens preloaded, {n_real * per_image * 4 / 2**30:.1f} GiB as float64)")
    print(f"  + loading the stores into memory     : {t_load:7.1f} s")
    print(f"ratio soap fit / in-memory arithmetic  : {t_fit / t_base:7.2f}×   (goal ≤ 1.3×)")
    print(f"ratio soap fit / in-memory incl. load  : {t_fit / (t_base + t_load):7.2f}×")
    print(f"peak RSS / goal                        : {peak_rss / 1.5:7.2f}   (goal ≤ 1.5 GiB)")


if __name__ == "__main__":
    main()
