"""Feature extraction: images from a source → backbone tokens → one feature-store chunk at a time.

The unit of work is one store chunk: decode or generate → forward → write the chunk whole → flag
it complete. One scheduler thread per device runs the forwards of every extraction in this process
(real ∥ synthetic in a refit), taking their ready chunks in turn (``soapflow.scheduler``); on a GPU
the chunks are made ahead in threads of their own (nvJPEG beside Pillow in decode processes, noise
on the GPU), copies in and out overlap the forward on streams of their own
(``soapflow.device_io``), and a pool of threads writes several chunks at once, so the forward
waits on neither side. A rerun skips flagged chunks; since every image is a pure function of the
source, its index and the settings, a resumed store is identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import lru_cache

from soapflow import cancel
from soapflow import config
from soapflow.config import BackboneSpec
from soapflow.errors import SoapError
from soapflow.storage.feature_store import FeatureStore, store_lease

DEFAULT_CHUNK = config.DEFAULT_CHUNK
DEFAULT_GPU_CHUNK = 256  # on a GPU, where a small chunk leaves it idle between forwards
DEFAULT_WRITERS = 4  # threads writing chunks: several in flight, never on the forward's path

#: What one H200 did, each part alone (benchmarks/gpu_check.sh; issue 16), in images per second:
#: the basis of ``default_cpu_decode_share``.
GPU_RATES = {"forward": 8700, "nvjpeg": 8600, "noise": 19400, "pillow_per_process": 175}


def default_chunk(device: str | None) -> int:
    """Images per store chunk by default on ``device``."""
    return DEFAULT_GPU_CHUNK if str(device or "cpu").startswith("cuda") else DEFAULT_CHUNK


_BACKBONE_LOCK = threading.Lock()


def cached_backbone(name: str, weights: str | None, layer: int, feature: str, image_size: int | None, device: str,
                    final_norm: str | bool = "auto"):
    """One loaded model per process and configuration: mapped tasks reuse it. Tasks running
    at once in threads wait for one load instead of each loading (and holding) a copy."""
    from soapflow.backbones import parse_final_norm

    final_norm = parse_final_norm(final_norm)
    with _BACKBONE_LOCK:
        return _cached_backbone(name, weights, layer, feature, image_size, device, final_norm)


def load(spec: BackboneSpec):
    """The backbone ``spec`` names, loaded once per process (``cached_backbone``)."""
    spec = spec.on_device()
    return cached_backbone(spec.name, spec.weights, spec.layer, spec.feature, spec.image_size, spec.device,
                           spec.final_norm)


@lru_cache(maxsize=4)
def _cached_backbone(name, weights, layer, feature, image_size, device, final_norm):
    from soapflow.backbones import load_backbone

    return load_backbone(name, weights=weights, layer=layer, feature=feature, image_size=image_size, device=device,
                         final_norm=final_norm)


@lru_cache(maxsize=16)
def cached_source(spec: str, n: int | None, seed: int):
    """Scanning a folder is not free; tasks of one run share the scan."""
    from soapflow.sources import open_source

    return open_source(spec, n=n, seed=seed)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def store_attributes(backbone, source, dtype: str) -> dict:
    """Provenance written into the store (SPEC §3)."""
    from soapflow import __version__

    return {
        **backbone.info(),  # backbone, layer, feature, final_norm, image_size, grid, dim, mean, std, …
        "weights": backbone.weights_sha256,
        "source": {"spec": source.spec, "kind": source.kind, **source.fingerprint},
        "fingerprint": source_fingerprint(source),
        "skipped": source.skipped,
        "n_skipped": len(source.skipped),
        "soapflow_version": __version__,
        "dtype": dtype,
    }


def source_fingerprint(source) -> str:
    """A short stable hash of a source's provenance, used to match fits to data."""
    import hashlib
    import json

    blob = json.dumps({"spec": source.spec, **source.fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def open_store_for(uri: str, backbone, source, *, chunk: int = DEFAULT_CHUNK, dtype: str = "float16",
                   storage_options: dict | None = None, compress: bool = False) -> FeatureStore:
    """Create the store for (backbone, source), or reopen it to resume (as it was created:
    ``compress`` only applies to a new store)."""
    if len(source) == 0:
        raise SoapError(f"source {source.spec} has no usable images ({len(source.skipped)} skipped)")
    return FeatureStore.create(
        uri, count=len(source), grid=backbone.grid, dim=backbone.dim, chunk=chunk, dtype=dtype,
        attrs=store_attributes(backbone, source, dtype), storage_options=storage_options, compress=compress,
    )


@dataclass
class ExtractStats:
    images: int = 0
    chunks: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0  # forward and copy to host, waiting for the GPU included
    input_seconds: float = 0.0  # waiting for the next chunk's images (decode, noise)
    write_wait_seconds: float = 0.0  # waiting for the disk (more than two chunks behind)
    device_wait_seconds: float = 0.0  # waiting while another extraction had the device

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0

    def breakdown(self) -> str:
        """Where the time went, e.g. "forward 51 % · input 6 % · disk 1 % · device busy 41 %": the
        largest share after the forward is the bottleneck to look at ("device busy": the other
        extraction of a refit had it, as it should on a CPU)."""
        if not self.seconds:
            return "nothing extracted"
        parts = (("forward", self.forward_seconds), ("input", self.input_seconds), ("disk", self.write_wait_seconds),
                 ("device busy", self.device_wait_seconds))
        return " · ".join(f"{name} {100 * t / self.seconds:.0f} %" for name, t in parts)


#: ExtractStats' times, as tasks report them (summed over shards) and the CLI reads them back.
TIMINGS = tuple(f.name for f in fields(ExtractStats) if f.name.endswith("seconds"))


def default_cpu_decode_share(device, num_workers: int) -> float:
    """The share of JPEGs that decode processes take with Pillow beside nvJPEG (``cpu_decodes``):
    on CUDA, where ``GPU_RATES`` says the CPU and the GPU would finish a refit's mix of JPEGs and
    noise together; 0 elsewhere (on a CPU every image is Pillow's anyway). A function of the
    settings only, never of timings: two runs split the same way."""
    if not str(device).startswith("cuda") or num_workers < 1:
        return 0.0
    r = GPU_RATES
    gpu = 2 / r["forward"] + 1 / r["noise"] + 1 / r["nvjpeg"]  # seconds per JPEG + noise pair if s = 0
    share = gpu / (1 / (num_workers * r["pillow_per_process"]) + 1 / r["nvjpeg"])
    return round(min(0.9, share), 2)


def default_workers(device) -> int:
    """Decode processes: none on a CPU (they would take the forward's cores); on a GPU all cores
    but two (the device thread and the writers), for the hybrid decode."""
    if str(device).startswith("cpu"):
        return 0
    return max(1, min(16, (os.cpu_count() or 1) - 2))


def extract_chunks(store: FeatureStore, backbone, source, chunks: list[int] | None = None, *,
                   num_workers: int | None = None, progress: bool = True, desc: str | None = None,
                   read_ahead: bool | None = None, cpu_decode_share: float | None = None,
                   writers: int | None = None) -> ExtractStats:
    """Fill the given chunks (default: all pending ones); already complete chunks are skipped.

    The forward passes run on the device's scheduler thread (``soapflow.scheduler``), which takes
    this extraction's chunks in turn with those of any other extraction on the device.
    ``read_ahead`` (default: on a GPU) makes the chunks in a thread of their own, ahead of the
    forward: there nvJPEG decoding and noise generation would otherwise wait for the forward, and
    the forward for them. On a CPU they are made on the device thread, in their turn, where they
    take no cores from a forward. ``writers`` threads (default ``DEFAULT_WRITERS``) write the
    chunks, several at a time, off the forward's path; a chunk is flagged complete only once
    written. ``cpu_decode_share``: see ``default_cpu_decode_share``.

    Holds the store's lease shared: shards of one run fill chunks side by side, while a
    concurrent exclusive writer (``extract`` or creating the store) is refused."""
    return _fill({None: store}, backbone, source, chunks, num_workers=num_workers, progress=progress, desc=desc,
                 read_ahead=read_ahead, cpu_decode_share=cpu_decode_share, writers=writers)


def _fill(stores: dict, backbone, source, chunks: list[int] | None, *, num_workers: int | None, progress: bool,
          desc: str | None, read_ahead: bool | None, cpu_decode_share: float | None = None,
          writers: int | None = None) -> ExtractStats:
    """``extract_chunks`` for one forward pass feeding several stores: ``stores`` maps a block
    index to its store (``{None: store}``: the backbone's own block, through ``backbone.tokens``).
    Several blocks go through the device scheduler as one job whose forward runs the backbone
    once and copies each block's tokens into that block's own host ring."""
    import torch
    from tqdm.auto import tqdm

    from soapflow.device_io import device_io
    from soapflow.scheduler import Job, device_scheduler

    with contextlib.ExitStack() as held:
        for store in stores.values():
            held.enter_context(store_lease(store.uri, store.storage_options, shared=True))
        pending = {key: set(store.pending_chunks()) for key, store in stores.items()}
        anywhere = set().union(*pending.values())
        todo = [c for c in (chunks if chunks is not None else sorted(anywhere)) if c in anywhere]
        stats = ExtractStats()
        if not todo:
            return stats
        device = backbone.device
        first = next(iter(stores.values()))
        workers = _decode_workers(num_workers, device)
        share = default_cpu_decode_share(device, workers) if cpu_decode_share is None else cpu_decode_share
        for store in stores.values():
            _note_decoder(store, source, backbone, share)
        dtype = getattr(torch, str(first.tokens.dtype))  # float16 or float32
        layers = None if None in stores else sorted(stores)
        ranges = [first.chunk_range(c) for c in todo]
        if read_ahead is None:
            read_ahead = not str(device).startswith("cpu")
        io = device_io(device)
        loader = io.on_producer_stream(_loader(source, ranges, backbone, workers, device, share),
                                       io.producer_stream())
        writers = max(1, int(writers or DEFAULT_WRITERS))
        rings = {key: io.ring(writers + 2, (store.chunk, *store.tokens.shape[1:]), dtype)
                 for key, store in stores.items()}
        scheduler = device_scheduler(device)
        bar = tqdm(total=sum(len(r) for r in ranges), desc=desc or f"extract {source.spec}", unit="img",
                   disable=not progress, smoothing=0.1)
        counted = threading.Lock()
        left = {}  # position -> stores still to write for that chunk

        def forward(item):
            images, ready = item
            if layers is None:
                return {None: io.forward(backbone, images, ready, rings[None])}
            # one backbone pass; each block's tokens then go through the ring copy of its own
            outputs = {}

            def tokens_of(x, layer):
                if not outputs:
                    outputs.update(backbone.tokens_multi(x, layers))
                return outputs[layer]

            return {l: io.forward(backbone, images, ready, rings[l], tokens_of=lambda x, l=l: tokens_of(x, l))
                    for l in layers}

        def write(position, key, host):
            c = todo[position]
            try:
                tokens, finite = host.wait()
                if c in pending[key]:
                    stores[key].write_chunk(c, tokens, finite_before_cast=finite)
            except BaseException as e:  # the chunk stays unflagged; the extraction stops with it
                job.fail(e)
                raise
            finally:
                host.release()
                scheduler.wake()
            with counted:
                left[position] -= 1
                last = left[position] == 0
                if last:
                    stats.images += host.rows
                    stats.chunks += 1
            if last:
                bar.update(host.rows)

        def done(position, hosts):
            if job.failed():
                for host in hosts.values():
                    host.release()
                return
            with counted:
                left[position] = len(hosts)
            for key, host in hosts.items():
                pool.submit(write, position, key, host)

        # Ctrl-C: the job stops before its next chunk; the chunks written so far stay flagged
        job = Job(loader, forward, done, prefetch=read_ahead,
                  room=lambda: all(r.available() for r in rings.values()), name=f"{source.spec}",
                  check=cancel.check)
        start = time.perf_counter()
        try:  # close the bar even on failure: an error message then starts on a line of its own
            with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="store-writer") as pool:
                scheduler.submit(job)
                try:
                    times = job.result()
                except BaseException as e:  # Ctrl-C here, say: the device thread drops the job too
                    job.fail(e)
                    job.wait_finished()
                    raise
                finally:
                    t = time.perf_counter()
                    pool.shutdown(wait=True)  # every chunk handed over is written (and flagged) or failed
                    stats.write_wait_seconds += time.perf_counter() - t
            job.result()  # a write that failed after the last chunk's forward
        finally:
            bar.close()
    stats.forward_seconds += times.forward
    stats.input_seconds += times.input
    stats.write_wait_seconds += times.disk
    stats.device_wait_seconds += times.device_busy
    stats.seconds = time.perf_counter() - start
    return stats


def _note_decoder(store: FeatureStore, source, backbone, cpu_decode_share: float = 0.0) -> None:
    """Add what decodes this run's images to the store's ``decoded_by`` before writing a chunk: a
    store resumed on another device (or with another split) has some chunks from each, and
    nvJPEG's pixels differ slightly from Pillow's."""
    from soapflow.sources import decoder_name

    name = decoder_name(source, backbone.device, backbone.interpolation or "bicubic", cpu_decode_share)
    known = list(store.attrs.get("decoded_by") or [])
    if name is not None and name not in known:
        store.note(decoded_by=sorted([*known, name]))


def _decode_workers(num_workers, device) -> int:
    import multiprocessing

    if multiprocessing.current_process().daemon:
        # dask worker processes are daemonic and may not fork DataLoader workers; the
        # cluster's own worker processes give the parallelism there.
        return 0
    return default_workers(device) if num_workers is None else max(0, int(num_workers))


def _loader(source, ranges, backbone, num_workers, device, cpu_decode_share: float = 0.0):
    from soapflow.sources import chunk_loader

    return chunk_loader(source, ranges, backbone.image_size, backbone.mean, backbone.std,
                        num_workers=_decode_workers(num_workers, device), device=device,
                        interpolation=backbone.interpolation or "bicubic", cpu_decode_share=cpu_decode_share)


def split_chunks(chunks: list[int], parts: int) -> list[list[int]]:
    """Round-robin split of chunk indices into at most ``parts`` non-empty groups."""
    parts = max(1, min(parts, len(chunks)))
    return [chunks[i::parts] for i in range(parts)] if chunks else []


def extract(backbone: BackboneSpec, source_spec: str, out: str, *, n: int | None = None, chunk: int | None = None,
            seed: int = 0, dtype: str = "float16", num_workers: int | None = None,
            storage_options: dict | None = None, progress: bool = True, compress: bool = False,
            cpu_decode_share: float | None = None):
    """Extract one complete feature store; returns ``(store, stats)``. ``chunk``: default by device
    (``default_chunk``); ``compress``: zstd on the tokens (a new store only)."""
    backbone = load(backbone)
    device = backbone.device
    source = cached_source(source_spec, n, seed)
    # one extraction per store at a time: a second one refuses at once, naming the first
    with store_lease(out, storage_options):
        store = open_store_for(out, backbone, source, chunk=chunk or default_chunk(device), dtype=dtype,
                               storage_options=storage_options, compress=compress)
        stats = extract_chunks(store, backbone, source, num_workers=num_workers, progress=progress,
                               cpu_decode_share=cpu_decode_share)
        store.finalize(count=store.count)
    return store, stats


def extract_layers(backbone, source, uris: dict[int, str], *, chunk: int | None = None, dtype: str = "float16",
                   num_workers: int | None = None, storage_options: dict | None = None, progress: bool = True,
                   desc: str | None = None, cpu_decode_share: float | None = None) -> tuple[dict[int, FeatureStore], ExtractStats]:
    """Several blocks' tokens from one pass over ``source``: block ``l`` into the complete store
    ``uris[l]`` (one forward pass per chunk for all of them; each store as ``extract`` writes
    it for that block, resumable the same way). Returns ``({layer: store}, stats)``."""
    import dataclasses

    layers = sorted({backbone.resolve_layer(int(l)) for l in uris})
    if len(layers) != len(uris):
        raise SoapError(f"two store paths name the same block: {sorted(uris)} on a {backbone.depth}-block backbone")
    uris = {backbone.resolve_layer(int(l)): uri for l, uri in uris.items()}
    with contextlib.ExitStack() as held:
        stores = {}
        for l in layers:
            held.enter_context(store_lease(uris[l], storage_options))
            stores[l] = open_store_for(uris[l], dataclasses.replace(backbone, layer=l), source,
                                       chunk=chunk or default_chunk(backbone.device), dtype=dtype, storage_options=storage_options)
        stats = _fill(stores, backbone, source, None, num_workers=num_workers, progress=progress, desc=desc,
                      read_ahead=None, cpu_decode_share=cpu_decode_share)
        for store in stores.values():
            store.finalize(count=store.count)
    return stores, stats

