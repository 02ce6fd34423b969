"""Throughput of ``generate("mixture", ...)`` against a straightforward per-image loop.

    .venv/bin/python benchmarks/noise.py [--count 64] [--size 224] [--repeat 3]

The loop is the obvious way to write SPEC §2's mixture: one numpy Generator per image,
scipy's idctn per image, float64 numpy throughout. All run in the same process, best of
``--repeat``; wall-clock and CPU time are printed. ``generate`` runs twice: on one thread (the
algorithmic gain) and on torch's thread count (all cores, blocks spread over them: what a user
gets; the images are bit-identical either way).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.fft
import torch

from soapflow.noise_generators import IMAGENET_MEAN, IMAGENET_STD, generate


def loop_mixture(count, size, seed=0, alpha=1.0, sigma=1.0, concentration=(1.0, 1.0, 2.0),
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
    mean = np.asarray(mean)[:, None, None]
    std = np.asarray(std)[:, None, None]
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    r2 = (i**2 + j**2).astype(float)
    r2[0, 0] = 1.0
    spectrum = r2 ** (-alpha / 2)
    y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.empty((count, 3, size, size), np.float32)
    for n in range(count):
        rng = np.random.default_rng((seed, n))
        w = rng.dirichlet(concentration)
        field = scipy.fft.idctn(rng.standard_normal((size, size)) * spectrum, norm="ortho")
        field /= field.std()
        modulated = np.clip(field * std + mean, 0, 1) * rng.standard_normal((3, size, size))
        pink = scipy.fft.idctn(rng.standard_normal((3, size, size)) * spectrum, axes=(-2, -1), norm="ortho")
        pink *= sigma / pink.std(axis=(-2, -1), keepdims=True)
        a, b, c = rng.random((3, 3, 1, 1))
        grad = (np.clip(a * x + b * y + c, 0, 1) - mean) / std
        out[n] = w[0] * modulated + w[1] * pink + w[2] * grad
    return torch.from_numpy(out)


def best_of(fn, repeat):
    wall, cpu = [], []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return min(wall), min(cpu), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n, s = args.count, args.size
    cores = torch.get_num_threads()
    generate("mixture", 4, s)  # warm-up: caches, thread pool, FFT plans
    loop_mixture(2, s)
    slow = best_of(lambda: loop_mixture(n, s), args.repeat)
    rows = [("per-image loop", slow)]
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        generate("mixture", 4, s)
        rows.append((f"generate, {threads} thread{'s' * (threads > 1)}",
                     best_of(lambda: generate("mixture", n, s), args.repeat)))
    torch.set_num_threads(cores)
    print(f"mixture, {n} images of {s}x{s}; the loop is single-threaded NumPy/SciPy")
    for label, (wall, cpu, x) in rows:
        print(f"  {label:20s} {n / wall:9.1f} images/s wall   {1e3 * cpu / n:7.3f} ms CPU/image"
              f"   (pixel mean {x.mean():+.3f}, std {x.std():.3f})")
    for label, (wall, cpu, _) in rows[1:]:
        print(f"  speed-up, {label}: {slow[0] / wall:.2f}x wall, {slow[1] / cpu:.2f}x CPU time   (goal ≥ 3x)")


if __name__ == "__main__":
    main()
