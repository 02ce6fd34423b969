"""End-to-end `soap refit` wall time ÷ pure forward time of the same backbone on the same images.

    .venv/bin/python benchmarks/refit.py [--backbone dinov2_vits14] [--data fashion-mnist:train]
                                         [--n 1500] [--image-size 224] [--chunk 64] [--server-run]
                                         [--extraction] [--jpegs] [--device cuda] [--against TREE]

Pure forward: the same real + synthetic images, already decoded/generated and resident in
memory, through `Backbone.tokens` in chunk-sized batches — nothing else (on a GPU the tokens stay
there: not even the copy to host memory that extraction must make). Refit: the `soap refit`
command in a fresh process and a fresh work directory (imports, Prefect's ephemeral server,
model load, decoding, noise generation, store writes, the fit, the artifact and plots), as a
one-off (a temporary Prefect server boots beside the model load) and, with --server-run, also
against a running `prefect server` (what deployments and scheduled refits use). Each refit is
compared with the mean of the pure-forward runs just before and after it. Goal ≤ 1.10× (CPU here).
--against TREE also times another checkout's refit (``git worktree add /tmp/old <commit>``), in
the order A B | B A with pure forwards before, between and after, for a same-run comparison.

A refit of one chunk per store splits the overhead into a fixed part (imports, server, model
load, fit, exit: ~8 s on 2 CPU cores, so the ratio only means something at a few thousand
images, hence the default of 1500 + 1500) and a part that grows with the images.
With --device cuda the same script measures a GPU (benchmarks/gpu_check.sh runs the issue's check):
    benchmarks/refit.py --device cuda --backbone vit_base_patch16_224 --weights random --jpegs --n 2000 --extraction
(the refit then decodes the JPEGs on the GPU; the pure forward is given them decoded). There a
forward of a few thousand images takes a second or two, well under the fixed part, so the GPU's
figure is --extraction's: both extractions in this process, img/s against the pure forward's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # prefect_server: a throwaway server


@functools.lru_cache(maxsize=1)
def backbone(args_key: tuple):
    from soapflow.backbones import load_backbone

    name, weights, image_size, device = args_key
    return load_backbone(name, weights=weights, image_size=image_size, device=device)


@functools.lru_cache(maxsize=2)
def resident_batches(args_key: tuple, data: str, generator: str, n: int, chunk: int) -> list:
    """The real + synthetic images, decoded/generated once and kept on the device."""
    from soapflow.sources import open_source

    bb = backbone(args_key)
    real = open_source(data, n=n)
    synth = open_source(f"noise:{generator}", n=len(real))
    batches = []
    for src in (real, synth):
        for start in range(0, len(src), chunk):
            idx = range(start, min(len(src), start + chunk))
            batches.append(src.batch(idx, bb.image_size, bb.mean, bb.std, device=bb.device))
    return batches


def key(args) -> tuple:
    return (args.backbone, args.weights, args.image_size, args.device)


def pure_forward(args, n: int, to_host: bool = False) -> tuple[float, int]:
    """The forward pass alone; on a GPU the tokens stay there unless ``to_host`` (float32,
    pageable memory: what a plain ``.cpu()`` does). On a thread that exits after, as the
    extraction's device thread runs it: the main thread keeps no OpenMP team that would make the
    in-process extraction's workers sleep between ops (soapflow/threads.py)."""
    from soapflow.threads import on_passing_thread

    return on_passing_thread(_pure_forward, args, n, to_host)


def _pure_forward(args, n: int, to_host: bool) -> tuple[float, int]:
    import torch

    bb = backbone(key(args))
    batches = resident_batches(key(args), args.data, args.generator, n, args.chunk)
    bb.tokens(batches[0][:2])  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    for x in batches:
        tokens = bb.tokens(x)
        if to_host:
            tokens.cpu()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, sum(len(b) for b in batches)


def extraction(args, n: int, work: Path, read_ahead: bool | None = None,
               workers: int | None = None) -> tuple[float, list]:
    """Both stores extracted in this process as the refit flow's tasks do (one thread per store,
    the model already loaded): decode/generate → forward → write, without imports, Prefect or
    the fit. ``workers``: decode processes, if not ``--workers``. Returns the wall time and each
    store's `ExtractStats`."""
    from soapflow.extract import cached_source, extract_chunks, open_store_for

    workers = args.workers if workers is None else workers
    bb = backbone(key(args))
    sources = [cached_source(args.data, n, 0), cached_source(f"noise:{args.generator}", n, 0)]
    stores = [open_store_for(str(work / f"store{k}"), bb, src, chunk=args.chunk) for k, src in enumerate(sources)]
    with ThreadPoolExecutor(2) as pool:
        t = time.perf_counter()
        stats = list(pool.map(lambda k: extract_chunks(stores[k], bb, sources[k], num_workers=workers,
                                                       progress=False, read_ahead=read_ahead), range(2)))
        return time.perf_counter() - t, stats


def _extract_in_process(args, n: int, work: Path, k: int, barrier) -> tuple[float, float, object]:
    from soapflow.extract import cached_source, extract_chunks, open_store_for
    from soapflow.threads import on_passing_thread

    bb = backbone(key(args))
    src = cached_source([args.data, f"noise:{args.generator}"][k], n, 0)
    store = open_store_for(str(work / f"store{k}"), bb, src, chunk=args.chunk)
    # warm-up, on a passing thread (see pure_forward)
    on_passing_thread(lambda: bb.tokens(src.batch(range(2), bb.image_size, bb.mean, bb.std, device=bb.device)))
    barrier.wait()
    start = time.time()
    stats = extract_chunks(store, bb, src, num_workers=args.workers, progress=False)
    return start, time.time(), stats


def extraction_in_processes(args, n: int, work: Path) -> tuple[float, list]:
    """`extraction`, but the two stores in two processes of their own (each with its model, as on a
    dask cluster of two workers): no GIL or Python threads shared. Timed from the moment both
    have their model loaded."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # CUDA does not survive a fork
    with ctx.Manager() as manager, ProcessPoolExecutor(2, mp_context=ctx) as pool:
        barrier = manager.Barrier(2)
        done = list(pool.map(_extract_in_process, [args] * 2, [n] * 2, [work] * 2, range(2), [barrier] * 2))
    return max(end for _, end, _ in done) - min(start for start, _, _ in done), [st for _, _, st in done]


def input_only(args, n: int) -> list[float]:
    """Seconds each source's images take to reach the device with no forward pass: the
    extraction's own loader (decode/generate, resize, normalize), on a passing thread too."""
    from soapflow.threads import on_passing_thread

    return on_passing_thread(_input_only, args, n)


def _input_only(args, n: int) -> list[float]:
    import torch

    from soapflow.extract import _decode_workers, _loader, cached_source, default_cpu_decode_share

    bb = backbone(key(args))
    times = []
    for spec in (args.data, f"noise:{args.generator}"):
        src = cached_source(spec, n, 0)
        ranges = [range(s, min(len(src), s + args.chunk)) for s in range(0, len(src), args.chunk)]
        t = time.perf_counter()
        share = default_cpu_decode_share(bb.device, _decode_workers(args.workers, bb.device))
        for _ in _loader(src, ranges, bb, args.workers, bb.device, share):
            pass
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def _write_jpeg_range(folder: Path, indices: range, seed: int) -> None:
    import numpy as np
    from PIL import Image

    from soapflow.noise_generators import generate
    from soapflow.sources import open_source

    try:
        pictures = [Image.open(p).convert("RGB") for p in open_source("photos").paths]
    except Exception:  # noqa: BLE001 — no bundled photos on this machine
        pictures = []
    for i in indices:
        rng = np.random.default_rng([seed, i])  # each image on its own: any split of the work gives the same files
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


def write_jpegs(folder: Path, count: int, seed: int = 0) -> str:
    """``count`` JPEGs of ImageNet's typical size (500x375, quality 90) for a throughput run
    where no photo collection is at hand: random crops of the bundled photos when there are
    any, else mixture noise. Written by one process per core."""
    folder.mkdir(parents=True, exist_ok=True)
    procs = max(1, min(os.cpu_count() or 1, count // 100))
    with ProcessPoolExecutor(procs) as pool:
        list(pool.map(_write_jpeg_range, [folder] * procs, [range(k, count, procs) for k in range(procs)],
                      [seed] * procs))
    return str(folder)


def refit_wall(args, n: int, api_url: str | None = None, tree: str | None = None) -> tuple[float, list[str]]:
    """``soap refit`` in a fresh process; ``tree``: run another checkout's code (its folder)."""
    with tempfile.TemporaryDirectory(prefix="soapflow-bench-refit-") as work:
        cmd = [sys.executable, "-m", "soapflow.cli", "refit", "--backbone", args.backbone, "--data", args.data,
               "--n-real", str(n), "--chunk", str(args.chunk), "--workdir", work, "--device", args.device]
        if args.weights:
            cmd += ["--weights", args.weights]
        if args.workers is not None:
            cmd += ["--workers", str(args.workers)]
        if args.image_size:
            cmd += ["--image-size", str(args.image_size)]
        # not the user's registry; the refit prints where its time went (soapflow.timeline)
        env = {**os.environ, "SOAPFLOW_REGISTRY": str(Path(work) / "registry"), "SOAPFLOW_TIMELINE": "1"}
        if api_url:
            env["PREFECT_API_URL"] = api_url
        t = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tree)
        wall = time.perf_counter() - t
        if done.returncode:
            sys.exit(f"soap refit failed ({done.returncode}):\n{done.stderr[-3000:]}")
        # the flow's own account of each extraction (img/s and where the time went), and its timeline
        timeline = [line for line in done.stderr.splitlines() if line.startswith("timeline: ")]
        return wall, [re.sub(r"store: \S+\s+", "", line.strip()) for line in done.stdout.splitlines()
                      if " store: " in line] + timeline[-1:]


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


THIS_TREE = "soap refit, Prefect temporary server"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--data", default="fashion-mnist:train")
    ap.add_argument("--generator", default="mixture")
    ap.add_argument("--n", type=int, default=1500, help="real images (as many synthetic)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--chunk", type=int, default=None, help="images per chunk (default: the CLI's for --device)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=None, help="decode processes (default: the CLI's)")
    ap.add_argument("--server-run", action="store_true", help="also time a refit against a running Prefect server")
    ap.add_argument("--extraction", action="store_true",
                    help="also time both extractions in this process, without imports, Prefect or the fit "
                         "(the GPU check: extraction img/s vs pure-forward img/s)")
    ap.add_argument("--no-refit", action="store_true", help="skip the `soap refit` runs (with --extraction)")
    ap.add_argument("--jpegs", action="store_true",
                    help="real images: --n JPEGs at 500x375 written to a temporary folder (decoded on the GPU with --device cuda)")
    ap.add_argument("--variants", action=argparse.BooleanOptionalAction, default=None,
                    help="with --extraction, also time it without read-ahead, in two processes and with 2 and 4 "
                         "decode processes (default: on a GPU)")
    ap.add_argument("--against", default=None, metavar="TREE",
                    help="also time the refit of another checkout (e.g. a git worktree of an older commit), "
                         "interleaved A B | B A between pure forwards, so the box's drift falls on both alike")
    ap.add_argument("--project", type=int, default=None, metavar="N",
                    help="print the projected time of a whole refit of N + N images, from the measured fixed part "
                         "and per-image time (the GPU check: 50000)")
    args = ap.parse_args()
    if args.chunk is None:
        from soapflow.extract import default_chunk

        args.chunk = default_chunk(args.device)
    if args.variants is None:
        args.variants = args.device.startswith("cuda")
    if args.jpegs:
        jpeg_dir = tempfile.TemporaryDirectory(prefix="soapflow-bench-jpegs-")
        args.data = write_jpegs(Path(jpeg_dir.name), args.n)

    if args.no_refit and not args.extraction:
        sys.exit("--no-refit leaves nothing to time without --extraction")
    # This machine's speed drifts by several % over minutes: every refit is timed between two
    # pure-forward runs and compared with their mean (both printed, to show the drift).
    forwards = [pure_forward(args, args.n)[0]]
    rows = []  # (label, wall, the store and timeline lines, index of the pure forward just before it)
    other_tree = f"  the same, {args.against}"
    if not args.no_refit:
        # fixed part: a refit of one chunk per store, less the forward of those images
        small = args.chunk
        fixed_wall, fixed_lines = refit_wall(args, small)
        fixed = fixed_wall - pure_forward(args, small)[0]
        fixed_timeline = fixed_lines[-1] if fixed_lines and fixed_lines[-1].startswith("timeline: ") else None
        print(f"(so far: pure forward {forwards[0]:.1f} s, fixed part {fixed:.1f} s)", file=sys.stderr, flush=True)
        rows.append((THIS_TREE, *refit_wall(args, args.n), 0))
        print(f"(so far: refit {rows[-1][1]:.1f} s)", file=sys.stderr, flush=True)
        if args.against:
            rows.append((other_tree, *refit_wall(args, args.n, tree=args.against), 0))
        forwards.append(pure_forward(args, args.n)[0])
        if args.against:
            rows.append((other_tree, *refit_wall(args, args.n, tree=args.against), 1))
            rows.append((THIS_TREE, *refit_wall(args, args.n), 1))
            forwards.append(pure_forward(args, args.n)[0])
    if args.server_run and not args.no_refit:
        with prefect_server() as url:
            rows.append(("soap refit, running Prefect server", *refit_wall(args, args.n, api_url=url), len(forwards) - 1))
        forwards.append(pure_forward(args, args.n)[0])
    variants = []  # (label, wall, stats): the default, then what a GPU run should also be compared with
    if args.extraction:
        runs = [("extraction in-process, real ∥ synth", lambda work: extraction(args, args.n, work))]
        if args.variants:
            runs += [("  the same, no read-ahead", lambda work: extraction(args, args.n, work, read_ahead=False)),
                     ("  the same, in two processes", lambda work: extraction_in_processes(args, args.n, work))]
            # is one decode process the real store's limit?
            runs += [(f"  the same, --workers {w}", lambda work, w=w: extraction(args, args.n, work, workers=w))
                     for w in sorted({2, 4} - {args.workers})]
        for label, run in runs:
            with tempfile.TemporaryDirectory(prefix="soapflow-bench-extract-") as work:
                variants.append((label, *run(Path(work))))
        inputs = input_only(args, args.n)
        forwards.append(pure_forward(args, args.n)[0])
    n_images = 2 * args.n
    print(f"{args.backbone} @ {args.image_size}px, {args.n} real ({args.data}) + {args.n} synthetic, "
          f"chunk {args.chunk}, device {args.device}")
    print(f"pure forward (runs before/after)      : {' / '.join(f'{t:.2f}' for t in forwards)} s   "
          f"{n_images / forwards[0]:6.1f} img/s (first run)")
    for i, (label, t, stores, k) in enumerate(rows):
        base = (forwards[k] + forwards[k + 1]) / 2  # the pure forwards just before and after it
        print(f"{label:38s}: {t:7.1f} s   {n_images / t:6.1f} img/s   ratio {t / base:5.2f}× of {base:.1f} s "
              f"(+{t - base:.1f} s; goal ≤ 1.10× on the CPU)")
        if label != other_tree:  # the fixed part was measured on this tree
            print(f"{'':38s}  = fixed {fixed:.1f} s (refit of {small} + {small} images less their forward) "
                  f"+ {100 * (t - base - fixed) / base:.1f} % of the forward")
        if fixed_timeline and i == 0:
            print(f"{'':38s}  fixed part's {fixed_timeline}")
        if args.project and i == 0:
            per_image = (t - fixed) / n_images  # forward, input, writes and the fit, per image
            projected = fixed + per_image * 2 * args.project
            label = f"projected refit of {args.project} + {args.project}"
            if per_image > 0:
                print(f"{label:38s}: {projected:7.1f} s   (fixed {fixed:.1f} s + {1000 * per_image:.3f} ms per image, "
                      f"linear from this run)")
            else:
                print(f"{label:38s}: n/a (this run is within the fixed part's noise; use a larger --n)")
        for line in stores:
            print(f"{'':38s}  {line}")
    if args.extraction:
        base = (forwards[-2] + forwards[-1]) / 2
        for label, wall, stats in variants:
            print(f"{label:38s}: {wall:7.2f} s   {n_images / wall:6.1f} img/s   {base / wall:5.2f}× the pure "
                  f"forward's {n_images / base:.1f} img/s (goal on an H200: ≥ 6000 img/s)")
            for name, st in zip(("real", "synthetic"), stats):
                print(f"{'':38s}  {name:9s}: {st.images} images, {st.images_per_second:.1f} img/s: {st.breakdown()}")
        print(f"{'input alone (no forward), real / synth':38s}: {inputs[0]:7.2f} / {inputs[1]:.2f} s   "
              f"{args.n / inputs[0]:6.1f} / {args.n / inputs[1]:.1f} img/s")
        if args.device.startswith("cuda"):
            t = pure_forward(args, args.n, to_host=True)[0]
            print(f"{'pure forward + .cpu() of its tokens':38s}: {t:7.2f} s   {n_images / t:6.1f} img/s   "
                  f"(float32 into pageable memory, for comparison)")


if __name__ == "__main__":
    main()
