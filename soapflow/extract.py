"""Feature extraction: images from a source → backbone tokens → one feature-store chunk at a time.

The unit of work is one store chunk: decode (DataLoader workers) → forward → write the
chunk whole → flag it complete. Decoding runs ahead in worker processes (on a GPU, where
they only read JPEGs for nvJPEG; on a CPU it runs in this process, beside the other
extraction's forward pass) and writing runs behind in a thread, so the forward pass never
waits on either. A rerun skips flagged chunks; since every image is a pure function of
the source and its index, a resumed store is identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, fields
from functools import lru_cache

from soapflow.errors import SoapError
from storage.feature_store import FeatureStore, store_lease

DEFAULT_CHUNK = 64

# One forward pass at a time per device in this process: concurrent extractions (real ∥
# synthetic) then interleave their chunks instead of oversubscribing the cores or the GPU,
# while decoding and writing keep running beside them.
_DEVICE_LOCKS: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)


_BACKBONE_LOCK = threading.Lock()


def cached_backbone(name: str, weights: str | None, layer: int, feature: str, image_size: int | None, device: str,
                    final_norm: str | bool = "auto"):
    """One loaded model per process and configuration: mapped tasks reuse it. Tasks running
    at once in threads wait for one load instead of each loading (and holding) a copy."""
    from soapflow.backbones import parse_final_norm

    final_norm = parse_final_norm(final_norm)
    with _BACKBONE_LOCK:
        return _cached_backbone(name, weights, layer, feature, image_size, device, final_norm)


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


def extract_chunks(store: FeatureStore, backbone, source, chunks: list[int] | None = None, *,
                   num_workers: int | None = None, progress: bool = True, desc: str | None = None,
                   read_ahead: bool | None = None) -> ExtractStats:
    """Fill the given chunks (default: all pending ones); already complete chunks are skipped.

    ``read_ahead`` (default: on a GPU) makes the next chunk's images in a thread of their own
    while this chunk's forward pass runs: there nvJPEG decoding and noise generation would
    otherwise wait for the forward, and the forward for them. On a CPU they would only take
    cores from the forward (there they hold the device lock instead).

    Holds the store's lease shared: shards of one run fill chunks side by side, while a
    concurrent exclusive writer (``extract`` or creating the store) is refused."""
    import torch
    from tqdm.auto import tqdm

    with store_lease(store.uri, store.storage_options, shared=True):
        pending = set(store.pending_chunks())
        todo = [c for c in (chunks if chunks is not None else sorted(pending)) if c in pending]
        stats = ExtractStats()
        if not todo:
            return stats
        device = backbone.device
        _note_decoder(store, source, backbone)
        dtype = getattr(torch, str(store.tokens.dtype))  # float16 or float32
        ranges = [store.chunk_range(c) for c in todo]
        lock = _WaitedLock(_DEVICE_LOCKS[str(device)])
        if read_ahead is None:
            read_ahead = not str(device).startswith("cpu")
        # (a loader reading ahead waits for the lock in its own thread, uncounted: this thread's
        # waits are what "device busy" reports)
        loader = _loader(source, ranges, backbone, num_workers, device, None if read_ahead else lock)
        loader = contextlib.closing(_read_ahead(loader) if read_ahead else loader)
        bar = tqdm(total=sum(len(r) for r in ranges), desc=desc or f"extract {source.spec}", unit="img",
                   disable=not progress, smoothing=0.1)
        start = time.perf_counter()
        try:  # close the bar even on failure: an error message then starts on a line of its own
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer") as writer, loader as chunks_in:
                in_flight: list[Future] = []
                t = time.perf_counter()
                for position, images in chunks_in:
                    waited = lock.waited()  # (noise is made, and CPUs decode, holding the lock)
                    stats.input_seconds += time.perf_counter() - t - waited
                    stats.device_wait_seconds += waited
                    t = time.perf_counter()
                    with lock:
                        tokens, copied = _forward_to_host(backbone, images, dtype)
                    finite = copied()  # outside the lock: the other extraction queues its work meanwhile
                    waited = lock.waited()
                    stats.forward_seconds += time.perf_counter() - t - waited
                    stats.device_wait_seconds += waited
                    in_flight.append(writer.submit(store.write_chunk, todo[position], tokens,
                                                   finite_before_cast=finite))
                    # keep at most two chunks waiting on the disk: memory stays bounded
                    t = time.perf_counter()
                    while len(in_flight) > 2:
                        in_flight.pop(0).result()
                    stats.write_wait_seconds += time.perf_counter() - t
                    stats.images += len(tokens)
                    stats.chunks += 1
                    bar.update(len(tokens))
                    t = time.perf_counter()
                for f in in_flight:
                    f.result()
        finally:
            bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _note_decoder(store: FeatureStore, source, backbone) -> None:
    """Add what decodes this run's images to the store's ``decoded_by`` before writing a chunk: a
    store resumed on another device has some chunks from each (nvJPEG and Pillow differ by
    ~0.5 grey levels on average)."""
    from soapflow.sources import decoder_name

    name = decoder_name(source, backbone.device, backbone.interpolation or "bicubic")
    known = list(store.attrs.get("decoded_by") or [])
    if name is not None and name not in known:
        store.note(decoded_by=sorted([*known, name]))


def _forward_to_host(backbone, images, dtype):
    """Tokens of one chunk, cast to the store's ``dtype`` where they are (torch casts to float16
    ~10x faster than numpy, and a GPU then copies half the bytes), as a host array; and a function
    that waits until they are there and says whether they were finite before the cast. On CUDA
    the copy goes asynchronously into pinned memory, so the caller can let go of the device lock
    before the GPU has finished: the GPU then never idles between chunks."""
    import numpy as np
    import torch

    tokens = backbone.tokens(images.to(backbone.device, non_blocking=True))
    if tokens.device.type != "cuda":
        tokens = tokens.cpu()
        finite = bool(np.isfinite(tokens.numpy()).all())  # numpy's test, unlike its cast, is fast
        return tokens.to(dtype).numpy(), lambda: finite
    host = torch.empty(tokens.shape, dtype=dtype, pin_memory=True)
    host.copy_(tokens.to(dtype), non_blocking=True)
    finite = torch.empty((), dtype=torch.bool, pin_memory=True)
    finite.copy_(torch.isfinite(tokens).all(), non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tokens.device))
    return host.numpy(), lambda: done.synchronize() or bool(finite)


_END = object()


def _read_ahead(items):
    """Iterate ``items`` one item ahead, in a thread of its own: the next item is being made
    while the caller works on this one. (On CUDA the two threads share the default stream, so
    the kernels stay in order; nvJPEG and the DataLoader's waits release the GIL. DataLoader
    workers are forked from a plain thread all the same: see ``sources.loader._start_workers``.)"""
    it = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        upcoming = pool.submit(next, it, _END)
        try:
            while (item := upcoming.result()) is not _END:
                upcoming = pool.submit(next, it, _END)
                yield item
        finally:
            # stopped early (an error downstream): let the item being made finish, then close
            # the source, so its DataLoader workers stop now and not at garbage collection
            wait([upcoming])
            close = getattr(it, "close", None)
            if close is not None:
                close()


class _WaitedLock:
    """A lock that adds up the seconds spent waiting for it."""

    def __init__(self, lock: threading.Lock):
        self._lock, self._seconds = lock, 0.0

    def __enter__(self):
        t = time.perf_counter()
        self._lock.acquire()
        self._seconds += time.perf_counter() - t

    def __exit__(self, *exc):
        self._lock.release()

    def waited(self) -> float:
        """Seconds spent waiting since the last call."""
        seconds, self._seconds = self._seconds, 0.0
        return seconds


def _loader(source, ranges, backbone, num_workers, device, lock=None):
    import multiprocessing

    from soapflow.sources import chunk_loader

    if num_workers is None:
        # On a CPU, decode processes would run on the cores the forward pass is using, and
        # every slice they take stalls all of its threads: decoding in this process measured
        # 2–3 % faster end to end (refit, 2 cores). A GPU leaves the CPU to decoding.
        num_workers = 0 if str(device).startswith("cpu") else 1
    if multiprocessing.current_process().daemon:
        # dask worker processes are daemonic and may not fork DataLoader workers; the
        # cluster's own worker processes give the parallelism there.
        num_workers = 0
    # On a CPU, noise and decoding would fight the other extraction's forward for the cores. On a
    # GPU the lock would only make the other extraction wait while nvJPEG decodes (its Huffman
    # stage runs on the CPU) and while noise kernels launch: 1.14-1.24x on an H100 without it.
    if not str(device).startswith("cpu"):
        lock = contextlib.nullcontext()
    elif lock is None:
        lock = _DEVICE_LOCKS[str(device)]
    return chunk_loader(source, ranges, backbone.image_size, backbone.mean, backbone.std,
                        num_workers=num_workers, device=device, interpolation=backbone.interpolation or "bicubic",
                        device_lock=lock)


def split_chunks(chunks: list[int], parts: int) -> list[list[int]]:
    """Round-robin split of chunk indices into at most ``parts`` non-empty groups."""
    parts = max(1, min(parts, len(chunks)))
    return [chunks[i::parts] for i in range(parts)] if chunks else []


def extract(backbone_name: str, source_spec: str, out: str, *, weights: str | None = None, layer: int = -1,
            feature: str = "out", n: int | None = None, image_size: int | None = None,
            chunk: int = DEFAULT_CHUNK, seed: int = 0, dtype: str = "float16", device: str | None = None,
            num_workers: int | None = None, storage_options: dict | None = None, progress: bool = True,
            compress: bool = False, final_norm: str | bool = "auto"):
    """Extract one complete feature store; returns ``(store, stats)``. ``compress``: zstd on the
    tokens (a new store only). ``final_norm``: auto / on / off (``soapflow.backbones``)."""
    backbone = cached_backbone(backbone_name, weights, layer, feature, image_size, device or default_device(),
                               final_norm)
    source = cached_source(source_spec, n, seed)
    # one extraction per store at a time: a second one refuses at once, naming the first
    with store_lease(out, storage_options):
        store = open_store_for(out, backbone, source, chunk=chunk, dtype=dtype, storage_options=storage_options,
                               compress=compress)
        stats = extract_chunks(store, backbone, source, num_workers=num_workers, progress=progress)
        store.finalize(count=store.count)
    return store, stats

