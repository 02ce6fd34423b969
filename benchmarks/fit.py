"""`soap fit` on a multi-GB store vs an in-memory float64 NumPy computation of the same fit.

    .venv/bin/python benchmarks/fit.py [--gb 2.0] [--dim 384] [--grid 16] [--dir /tmp/soapflow-bench-fit]

Prints wall times, their ratio (goal ≤ 1.3×) and the peak RSS of the `soap fit` process
(goal ≤ 1.5 GB). The baseline holds all tokens in memory as float64 and is timed from
there on (no I/O): mean, XᵀX, eigh, and the sign projections of real and synthetic tokens.

    .venv/bin/python benchmarks/fit.py --scale [--n 8000] [--devices cpu,cuda,load]

For a many-core or GPU machine: ViT-B/16-shaped stores (14×14×768 float16, --n real + --n
synthetic images), fitted in this process on a local cluster with 4 task threads (the fixed
count before the thread count followed the machine: the baseline), with the threads the
machine allows, and on CUDA where present (twice: the first pays CUDA's start-up). Prints
each fit's time, each pass's GB/s of float16 tokens, the speed-up over the baseline, and how
far each artifact is from the baseline's (goal: projector 1e-6, scores 1e-9, P and Q equal).
`load` in --devices adds the all-core CPU fit beside a process doing what a CPU extraction does
to the cores (torch GEMMs of ViT-B size on all of them): both slow-downs are printed.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from soapflow.storage.feature_store import FeatureStore, open_store  # noqa: E402


def _complete(uri: Path, count: int) -> bool:
    """A store of ``count`` images left complete by an earlier run is reused."""
    if not uri.exists():
        return False
    try:
        store = open_store(str(uri))
        return store.count == count and not store.pending_chunks()
    except Exception:  # unreadable or of another layout: make it again
        return False


def make_store(uri: Path, count: int, grid: int, dim: int, chunk: int, seed: int) -> None:
    if _complete(uri, count):
        return
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


def make_scale_store(uri: Path, count: int, grid: int, dim: int, chunk: int, seed: int) -> None:
    """A few random chunks, scaled differently per chunk, written by every core (fast to make)."""
    from concurrent.futures import ThreadPoolExecutor

    from soapflow.cluster import machine

    if _complete(uri, count):
        return
    rng = np.random.default_rng(seed)
    pattern = np.random.default_rng(99).normal(size=(grid, grid, dim)).astype(np.float32) * 2
    bases = [rng.standard_normal((chunk, grid, grid, dim), dtype=np.float32) for _ in range(4)]
    store = FeatureStore.create(str(uri), count=count, grid=(grid, grid), dim=dim, chunk=chunk,
                                attrs={"backbone": "bench-vit-b", "layer": 0})

    def write(i: int) -> None:
        rows = store.chunk_range(i)
        block = bases[i % len(bases)][: len(rows)] * np.float32(1 + 0.37 * ((i * 7919) % 13) / 13) + pattern
        store.write_chunk(i, block)

    with ThreadPoolExecutor(machine()[0]) as pool:
        list(pool.map(write, store.pending_chunks()))
    store.finalize()


# A CPU extraction's forward as far as the cores see it: ViT-B-sized GEMMs on torch's threads.
LOAD = """
import sys, time, torch
x, w = torch.randn(2048, 768), torch.randn(3072, 768)
while True:
    torch.nn.functional.linear(x, w)
    print(time.monotonic(), flush=True)
"""


def _rate(stamps: list[float], start: float, stop: float) -> float:
    inside = [t for t in stamps if start <= t < stop]
    return len(inside) / (stop - start) if stop > start else 0.0


def scale(args) -> None:
    import torch

    from soapflow.cluster import dask_client, local_threads
    from soapflow.fit import LEAF_BYTES, fit_stores

    root = Path(args.dir)
    grid, dim = 14, 768
    t = time.perf_counter()
    make_scale_store(root / "real", args.n, grid, dim, args.chunk, seed=0)
    make_scale_store(root / "synth", args.n, grid, dim, args.chunk, seed=1)
    gb = args.n * grid * grid * dim * 2 / 1e9
    print(f"stores: {args.n} + {args.n} images of {grid}×{grid}×{dim} float16 ({gb:.2f} GB each); "
          f"made in {time.perf_counter() - t:.0f} s; cores {os.cpu_count()}, "
          f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    devices = args.devices.split(",")
    runs = [("cpu, 4 threads (baseline)", "cpu", 4), (f"cpu, {local_threads(LEAF_BYTES)} threads", "cpu", None)]
    if "cuda" in devices and torch.cuda.is_available():
        runs += [("cuda (first: CUDA start-up)", "cuda", None), ("cuda", "cuda", None)]
    if "load" in devices:
        runs.append((f"cpu, {local_threads(LEAF_BYTES)} threads + load", "load", None))
    runs = [r for r in runs if r[1] in devices]
    reference, base_time = None, None
    for label, device, threads in runs:
        load = None
        if device == "load":
            import threading

            device, stamps = "cpu", []
            load = subprocess.Popen([sys.executable, "-c", LOAD], stdout=subprocess.PIPE, text=True)
            reader = threading.Thread(target=lambda: stamps.extend(float(line) for line in load.stdout), daemon=True)
            reader.start()
            deadline = time.monotonic() + 120
            while not stamps and time.monotonic() < deadline:  # torch's import
                time.sleep(0.1)
            t_alone = time.monotonic()
            time.sleep(4)  # the load alone, for its rate
        with dask_client(threads=threads, thread_bytes=LEAF_BYTES) as client:
            nthreads = sum(client.nthreads().values())
            t = time.perf_counter()
            t_mono = time.monotonic()
            fit, inputs = fit_stores(str(root / "real"), str(root / "synth"), client=client, device=device,
                                     progress=False)
            seconds = time.perf_counter() - t
        if load is not None:
            t_end = time.monotonic()
            load.kill()
            reader.join(2)
            alone, beside = _rate(stamps, t_alone, t_mono), _rate(stamps, t_mono, t_end)
            label += f" (load: {beside / alone if alone else 0:.2f}× its rate alone)"
        base_time = base_time or seconds
        passes = "; ".join(f"{p.name} {p.seconds:5.1f} s {p.gb_per_s:5.2f} GB/s" for p in inputs.passes)
        print(f"{label:30s}: {seconds:6.1f} s ({nthreads} threads)  {base_time / seconds:5.2f}× the baseline  [{passes}]")
        if reference is None:
            reference = fit
        else:
            same = np.array_equal(fit.p, reference.p) and np.array_equal(fit.q, reference.q)
            print(f"{'':30s}  vs baseline: projector {np.abs(fit.projector - reference.projector).max():.1e}, "
                  f"scores {np.abs(fit.scores - reference.scores).max():.1e}, P and Q "
                  f"{'equal' if same else 'DIFFER'}  (goal 1e-6, 1e-9, equal)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", action="store_true", help="the many-core / GPU benchmark (see above)")
    ap.add_argument("--n", type=int, default=8000, help="--scale: images per store")
    ap.add_argument("--devices", default="cpu,cuda,load", help="--scale: which fits to run")
    ap.add_argument("--gb", type=float, default=2.0, help="size of the real store (float16)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--dir", default="/tmp/soapflow-bench-fit")
    args = ap.parse_args()
    if args.scale:
        if args.dir == ap.get_default("dir"):
            args.dir = "/tmp/soapflow-bench-fit-scale"
        return scale(args)
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
