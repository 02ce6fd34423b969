"""End-to-end `soap refit` wall time ÷ pure forward time of the same backbone on the same images.

    .venv/bin/python benchmarks/refit.py [--backbone dinov2_vits14] [--data fashion-mnist:train]
                                         [--n 1500] [--image-size 224] [--chunk 64] [--server-run]

Pure forward: the same real + synthetic images, already decoded/generated and resident in
memory, through `Backbone.tokens` in chunk-sized batches — nothing else. Refit: the `soap refit`
command in a fresh process and a fresh work directory (imports, Prefect's ephemeral server,
model load, decoding, noise generation, store writes, the fit, the artifact and plots), as a
one-off (a temporary Prefect server boots beside the model load) and, with --server-run, also
against a running `prefect server` (what deployments and scheduled refits use). Each refit is
compared with the mean of the pure-forward runs just before and after it. Goal ≤ 1.10× (CPU here).

A refit of one chunk per store splits the overhead into a fixed part (imports, server, model
load, fit, exit: ~8 s on 2 CPU cores, so the ratio only means something at a few thousand
images, hence the default of 1500 + 1500) and a part that grows with the images.
With --device cuda the same script measures a GPU, e.g. the issue's check:
    benchmarks/refit.py --device cuda --backbone vit_base_patch16_224 --weights random --jpegs --n 2000
(the refit then decodes the JPEGs on the GPU; the pure forward is given them decoded).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # prefect_server: a throwaway server


def pure_forward(args, n: int) -> tuple[float, int]:
    import torch

    from soapflow.backbones import load_backbone
    from soapflow.sources import open_source

    bb = load_backbone(args.backbone, weights=args.weights, image_size=args.image_size, device=args.device)
    real = open_source(args.data, n=n)
    synth = open_source(f"noise:{args.generator}", n=len(real))
    batches = []
    for src in (real, synth):
        for start in range(0, len(src), args.chunk):
            idx = range(start, min(len(src), start + args.chunk))
            batches.append(src.batch(idx, bb.image_size, bb.mean, bb.std, device=args.device))
    bb.tokens(batches[0][:2])  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for x in batches:
        bb.tokens(x).cpu()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, sum(len(b) for b in batches)


def write_jpegs(folder: Path, count: int, seed: int = 0) -> str:
    """``count`` JPEGs of ImageNet's typical size (500x375, quality 90) for a throughput run
    where no photo collection is at hand: random crops of the bundled photos when there are
    any, else mixture noise."""
    import numpy as np
    from PIL import Image

    from noise_generators import generate
    from soapflow.sources import open_source

    rng = np.random.default_rng(seed)
    try:
        photos = open_source("photos")
        pictures = [Image.open(p).convert("RGB") for p in photos.paths]
    except Exception:  # noqa: BLE001 — no bundled photos on this machine
        pictures = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        if pictures:
            pic = pictures[i % len(pictures)]
            w, h = pic.size
            cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            pic = pic.crop((x0, y0, x0 + cw, y0 + ch))
        else:
            x = generate("mixture", 1, 375, seed=seed, start=i, mean=(0, 0, 0), std=(1, 1, 1))[0]
            pic = Image.fromarray((x.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())
        pic.resize((500, 375)).save(folder / f"{i:06d}.jpg", quality=90)
    return str(folder)


def refit_wall(args, n: int, api_url: str | None = None) -> float:
    with tempfile.TemporaryDirectory(prefix="soapflow-bench-refit-") as work:
        cmd = [sys.executable, "-m", "soapflow.cli", "refit", "--backbone", args.backbone, "--data", args.data,
               "--n-real", str(n), "--chunk", str(args.chunk), "--workdir", work, "--device", args.device]
        if args.weights:
            cmd += ["--weights", args.weights]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        if args.image_size:
            cmd += ["--image-size", str(args.image_size)]
        env = {**os.environ, "SOAPFLOW_REGISTRY": str(Path(work) / "registry")}  # not the user's registry
        if api_url:
            env["PREFECT_API_URL"] = api_url
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        return time.perf_counter() - t


@contextlib.contextmanager
def prefect_server():
    """A `prefect server start` on 127.0.0.1 with its own SQLite database, as a deployment has
    (the tests' throwaway server: stopped with SIGINT, then waited for)."""
    from prefect_server import PrefectServer

    with tempfile.TemporaryDirectory(prefix="soapflow-bench-prefect-") as home:
        server = PrefectServer(Path(home), Path(home))
        server.start()
        try:
            yield server.api_url
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default="fashion-mnist:train")
    ap.add_argument("--generator", default="mixture")
    ap.add_argument("--n", type=int, default=1500, help="real images (as many synthetic)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: the CLI's)")
    ap.add_argument("--server-run", action="store_true", help="also time a refit against a running Prefect server")
    ap.add_argument("--jpegs", action="store_true",
                    help="real images: --n JPEGs at 500x375 written to a temporary folder (decoded on the GPU with --device cuda)")
    args = ap.parse_args()
    if args.jpegs:
        jpeg_dir = tempfile.TemporaryDirectory(prefix="soapflow-bench-jpegs-")
        args.data = write_jpegs(Path(jpeg_dir.name), args.n)

    # fixed part: a refit of one chunk per store, less the forward of those images
    small = args.chunk
    fixed = refit_wall(args, small) - pure_forward(args, small)[0]
    # This machine's speed drifts by several % over minutes: every refit is timed between two
    # pure-forward runs and compared with their mean (both printed, to show the drift).
    forwards = [pure_forward(args, args.n)[0]]
    rows = [("soap refit, Prefect temporary server", refit_wall(args, args.n))]
    forwards.append(pure_forward(args, args.n)[0])
    if args.server_run:
        with prefect_server() as url:
            rows.append(("soap refit, running Prefect server", refit_wall(args, args.n, api_url=url)))
        forwards.append(pure_forward(args, args.n)[0])
    n_images = 2 * args.n
    print(f"{args.backbone} @ {args.image_size}px, {args.n} real ({args.data}) + {args.n} synthetic, device {args.device}")
    print(f"pure forward (runs before/after)      : {' / '.join(f'{t:.1f}' for t in forwards)} s")
    for i, (label, t) in enumerate(rows):
        base = (forwards[i] + forwards[i + 1]) / 2
        print(f"{label:38s}: {t:7.1f} s   {n_images / t:6.1f} img/s   ratio {t / base:5.2f}× of {base:.1f} s "
              f"(+{t - base:.1f} s; goal ≤ 1.10×)")
        print(f"{'':38s}  = fixed {fixed:.1f} s (refit of {small} + {small} images less their forward) "
              f"+ {100 * (t - base - fixed) / base:.1f} % of the forward")


if __name__ == "__main__":
    main()
