"""The device scheduler (fairness, ordering, failures), the host ring, the write pool's error paths
and the hybrid JPEG decode split: all on a CPU."""

import os
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from soapflow.device_io import DeviceIO, HostRing, HostTokens, device_io
from soapflow.errors import SoapError
from soapflow.extract import (
    cached_backbone,
    cached_source,
    default_chunk,
    default_cpu_decode_share,
    extract_chunks,
    open_store_for,
)
from soapflow.scheduler import DeviceScheduler, Job
from soapflow.sources import chunk_loader
from soapflow.sources.loader import cpu_decodes


@pytest.fixture(scope="module")
def bb():
    return cached_backbone("vit_tiny_patch16_224", "random", -1, "out", 64, "cpu")


def chunks(name, n, delay=0.0):
    for k in range(n):
        if delay:
            time.sleep(delay)
        yield k, torch.full((2,), float(k))


def run_jobs(jobs, scheduler=None):
    scheduler = scheduler or DeviceScheduler("test")
    scheduler.order = []
    for job in jobs:
        scheduler.submit(job)
    errors = []
    for job in jobs:
        try:
            job.result(timeout=30)
        except Exception as e:  # noqa: BLE001
            errors.append((job.name, e))
    return scheduler.order, errors


def job(name, items, seen, prefetch, **kw):
    return Job(items, forward=lambda x: x, done=lambda pos, out: seen.append((name, pos, out[0].item())),
               prefetch=prefetch, name=name, **kw)


@pytest.mark.parametrize("prefetch", [False, True])
def test_jobs_take_turns_and_keep_their_order(prefetch):
    seen = []
    started = threading.Event()
    # both jobs are in before the device thread picks one (it needs the scheduler's lock for that),
    # and no chunk goes before the test says so
    scheduler = DeviceScheduler("test", check=lambda: started.wait(10))
    jobs = [job("a", chunks("a", 5), seen, prefetch, depth=8), job("b", chunks("b", 3), seen, prefetch, depth=8)]
    scheduler.order = []
    with scheduler._cond:
        for j in jobs:
            scheduler.submit(j)
    if prefetch:  # every chunk made and waiting (and the end): the turns alone decide the order
        deadline = time.time() + 10
        while any(j._queue.qsize() < want for j, want in zip(jobs, (6, 4))) and time.time() < deadline:
            time.sleep(0.01)
    started.set()
    for j in jobs:
        j.result(timeout=30)
    order = scheduler.order
    assert order[:6] == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)], order
    assert order[6:] == [("a", 3), ("a", 4)]  # b is done: a alone, no waiting for it
    for name, n in (("a", 5), ("b", 3)):
        assert [p for j, p, _ in seen if j == name] == list(range(n))  # each job's chunks in order
        assert [v for j, _, v in seen if j == name] == [float(k) for k in range(n)]


def test_a_slow_input_does_not_hold_back_the_other_job():
    # b makes a chunk every 0.3 s, a has all of its chunks ready: a's chunks go while b's are made
    seen = []
    order, errors = run_jobs([job("a", chunks("a", 6), seen, True), job("b", chunks("b", 2, delay=0.3), seen, True)])
    assert not errors
    assert [p for j, p in order if j == "a"] == list(range(6))
    first_b = order.index(("b", 0))
    assert first_b >= 3, order  # a did not wait for b's turn


def test_a_job_without_room_to_write_waits_and_the_other_goes_on():
    seen = []
    room = threading.Event()  # a's disk is full until the other job is done
    a = job("a", chunks("a", 3), seen, True, room=room.is_set)
    b = job("b", chunks("b", 4), seen, True)
    scheduler = DeviceScheduler("test")
    scheduler.order = []
    scheduler.submit(a)
    scheduler.submit(b)
    b.result(timeout=30)
    assert [j for j, _ in scheduler.order] == ["b"] * 4
    room.set()
    scheduler.wake()
    a.result(timeout=30)
    assert scheduler.order[4:] == [("a", 0), ("a", 1), ("a", 2)]
    assert a.times.disk > 0 and b.times.forward >= 0


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_failing_input_fails_its_job_only(prefetch):
    def broken():
        yield 0, torch.zeros(2)
        raise SoapError("could not decode x.jpg")

    seen = []
    order, errors = run_jobs([job("a", broken(), seen, prefetch), job("b", chunks("b", 4), seen, prefetch)])
    assert [name for name, _ in errors] == ["a"] and "x.jpg" in str(errors[0][1])
    assert [p for j, p, _ in seen if j == "b"] == [0, 1, 2, 3]
    assert [p for j, p, _ in seen if j == "a"] == [0]


def test_a_failing_check_stops_every_job():
    # the cancel flag's check runs before every chunk: what it raises ends all jobs at once
    count = {"n": 0}

    def check():
        count["n"] += 1
        if count["n"] > 3:
            raise SoapError("cancelled")

    seen = []
    order, errors = run_jobs([job("a", chunks("a", 50), seen, False), job("b", chunks("b", 50), seen, True)],
                             DeviceScheduler("test", check=check))
    assert sorted(name for name, _ in errors) == ["a", "b"] and all("cancelled" in str(e) for _, e in errors)
    assert len(order) == 3


def test_a_jobs_own_check_stops_it_before_its_next_chunk():
    seen = []
    stop = threading.Event()

    def check():
        if stop.is_set():
            raise SoapError("interrupted")

    def items():
        for k, x in chunks("a", 50):
            if k == 4:
                stop.set()  # Ctrl-C while chunk 4 is being made
            yield k, x

    order, errors = run_jobs([job("a", items(), seen, False, check=check), job("b", chunks("b", 3), seen, False)])
    assert [name for name, _ in errors] == ["a"] and "interrupted" in str(errors[0][1])
    assert [p for j, p, _ in seen if j == "a"] == [0, 1, 2, 3, 4]  # the chunk in hand is finished, no more
    assert [p for j, p, _ in seen if j == "b"] == [0, 1, 2]


def test_host_ring_lends_each_buffer_once():
    ring = HostRing(2, (3, 4), torch.float16, pin=False)
    a, b = ring.acquire(), ring.acquire()
    assert a != b and not ring.available()
    with pytest.raises(RuntimeError):
        ring.acquire()
    ring.release(a)
    assert ring.available() and ring.acquire() == a
    with pytest.raises(RuntimeError, match="twice"):
        ring.release(b) or ring.release(b)


def test_forward_into_the_ring_casts_and_reports_finiteness(bb):
    io = device_io("cpu")
    ring = io.ring(2, (4, *bb.grid, bb.dim), torch.float16)
    x = torch.randn(3, 3, 64, 64)
    host = io.forward(bb, x, None, ring)
    tokens, finite = host.wait()
    assert finite and tokens.shape == (3, *bb.grid, bb.dim) and tokens.dtype == np.float16
    np.testing.assert_array_equal(tokens, bb.tokens(x).numpy().astype(np.float16))
    host.release()
    bad = io.forward(bb, x, None, ring, tokens_of=lambda im: torch.full((3, *bb.grid, bb.dim), float("nan")))
    assert bad.wait()[1] is False


def test_slow_writes_with_a_small_ring_give_the_same_store(tmp_path, bb, monkeypatch):
    # one writer, a ring of three buffers, a slow disk: a buffer lent out again before its chunk
    # was written would put one chunk's tokens into another's place
    src = cached_source("noise:pink", 14, 0)
    plain = open_store_for(str(tmp_path / "plain"), bb, src, chunk=2)
    extract_chunks(plain, bb, src, progress=False)
    slow = open_store_for(str(tmp_path / "slow"), bb, src, chunk=2)
    write = slow.write_chunk
    monkeypatch.setattr(slow, "write_chunk", lambda i, t, **kw: (time.sleep(0.05 * (i % 3)), write(i, t, **kw)))
    stats = extract_chunks(slow, bb, src, progress=False, writers=1, read_ahead=True)
    assert stats.chunks == 7 and slow.pending_chunks() == []
    np.testing.assert_array_equal(slow.tokens[:], plain.tokens[:])


class _LateCopy:
    """A fake device's copy to the host: it lands only when waited for, some time later."""

    def __init__(self, land):
        self.land = land

    def synchronize(self):
        time.sleep(0.02)
        self.land()


class _AsyncCopyIO(DeviceIO):
    """A CPU whose tokens reach the ring asynchronously, as from a GPU's d2h stream."""

    def forward(self, backbone, images, ready, ring, tokens_of=None):
        slot = ring.acquire()
        out, finite = ring.buffer(slot)
        out.fill_(float("nan"))  # what a reader that did not wait would see
        tokens = backbone.tokens(images)
        rows = len(tokens)

        def land():
            out[:rows].copy_(tokens)
            finite.fill_(True)

        return HostTokens(ring, slot, rows, _LateCopy(land))


def test_writes_wait_for_the_copy_to_the_host(tmp_path, bb, monkeypatch):
    # stream ordering on a fake device: a writer that read its ring buffer before the copy out had
    # landed would write NaNs (refused) or another chunk's tokens
    import soapflow.device_io as dio

    src = cached_source("noise:pink", 10, 0)
    plain = open_store_for(str(tmp_path / "plain"), bb, src, chunk=2)
    extract_chunks(plain, bb, src, progress=False)
    monkeypatch.setitem(dio._IO, "cpu", _AsyncCopyIO("cpu"))
    late = open_store_for(str(tmp_path / "late"), bb, src, chunk=2)
    stats = extract_chunks(late, bb, src, progress=False, writers=3, read_ahead=True)
    assert stats.chunks == 5 and late.pending_chunks() == []
    np.testing.assert_array_equal(late.tokens[:], plain.tokens[:])


@pytest.mark.parametrize("writers", [1, 4])
def test_a_failed_write_fails_the_chunk_and_never_flags_it(tmp_path, bb, writers):
    # a real failure on disk: a folder where chunk 2's file goes, so zarr cannot write it
    src = cached_source("noise:pink", 16, 0)
    full = open_store_for(str(tmp_path / "full"), bb, src, chunk=2)
    extract_chunks(full, bb, src, progress=False)
    store = open_store_for(str(tmp_path / "s"), bb, src, chunk=2)
    blocker = tmp_path / "s" / "tokens" / "c" / "2" / "0" / "0" / "0"
    blocker.mkdir(parents=True)
    (blocker / "x").write_text("in the way")
    with pytest.raises(SoapError, match="cannot write chunk 2"):
        extract_chunks(store, bb, src, progress=False, writers=writers)
    pending = store.pending_chunks()
    assert 2 in pending and 0 not in pending, pending  # chunks before it are kept
    assert np.isnan(store.tokens[4:6].astype(np.float32)).all()
    shutil.rmtree(blocker)
    stats = extract_chunks(store, bb, src, progress=False, writers=writers)  # resumed: only the missing chunks
    assert stats.chunks == len(pending) and store.pending_chunks() == []
    np.testing.assert_array_equal(store.tokens[:], full.tokens[:])


# ------------------------------------------------------------------------ hybrid decode


def test_cpu_decode_split_is_a_pure_even_function_of_the_index():
    for percent in (0, 1, 25, 33, 50, 76, 100):
        picks = [cpu_decodes(i, percent) for i in range(1000)]
        assert sum(picks) == 10 * percent  # exactly the share, over any 100 consecutive images
        assert all(sum(picks[s : s + 100]) == percent for s in range(0, 900, 37))
    assert [i for i in range(12) if cpu_decodes(i, 25)] == [3, 7, 11]
    assert default_cpu_decode_share("cpu", 4) == 0.0
    share = default_cpu_decode_share("cuda", 14)
    assert 0.5 < share <= 0.9 and share == default_cpu_decode_share("cuda", 14)
    assert default_cpu_decode_share("cuda", 1) < share
    assert default_chunk("cuda") == 256 and default_chunk("cuda:1") == 256 and default_chunk("cpu") == 64


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    from PIL import Image

    skdata = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skdata.astronaut())
    d = tmp_path_factory.mktemp("hybrid")
    for k in range(10):
        photo.crop((20 * k, 10 * k, 20 * k + 300, 10 * k + 240)).save(d / f"{k:02d}.jpg", quality=90)
    return cached_source(str(d), None, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_hybrid_chunk_takes_each_image_from_its_decoder(jpegs, workers):
    args = (jpegs, [range(0, 4), range(4, 10)], 64, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    pillow = torch.cat([x for _, x in chunk_loader(*args, device_decode=False)])
    device = torch.cat([x for _, x in chunk_loader(*args, device_decode=True)])
    hybrid = torch.cat([x for _, x in chunk_loader(*args, workers, device_decode=True, cpu_decode_share=0.4)])
    assert not torch.equal(pillow, device)  # two decoders: the split shows
    for i in range(10):
        expected = pillow[i] if cpu_decodes(i, 40) else device[i]
        assert torch.equal(hybrid[i], expected), i


def test_resumed_hybrid_extraction_equals_an_uninterrupted_one(tmp_path, bb, jpegs, monkeypatch):
    # the device's decoder here is torchvision's decode_jpeg on the CPU, as nvJPEG on a GPU
    import soapflow.sources.loader as loader

    monkeypatch.setattr(loader, "decodes_on_device", lambda *a: True)
    full = open_store_for(str(tmp_path / "full"), bb, jpegs, chunk=3)
    extract_chunks(full, bb, jpegs, progress=False, cpu_decode_share=0.5)
    part = open_store_for(str(tmp_path / "part"), bb, jpegs, chunk=3)
    extract_chunks(part, bb, jpegs, [1, 3], progress=False, cpu_decode_share=0.5)  # died after two chunks
    stats = extract_chunks(part, bb, jpegs, progress=False, cpu_decode_share=0.5, num_workers=1)
    assert stats.chunks == 2 and part.pending_chunks() == []
    np.testing.assert_array_equal(part.tokens[:], full.tokens[:])
    assert part.attrs["decoded_by"] == full.attrs["decoded_by"] == ["decode_jpeg:cpu+pillow@0.50"]
    other = open_store_for(str(tmp_path / "other"), bb, jpegs, chunk=3)
    extract_chunks(other, bb, jpegs, progress=False, cpu_decode_share=0.0)
    assert not np.array_equal(other.tokens[:], full.tokens[:])
    assert other.attrs["decoded_by"] == ["decode_jpeg:cpu"]
    with pytest.raises(SoapError, match="from 0 to 1"):
        extract_chunks(open_store_for(str(tmp_path / "bad"), bb, jpegs, chunk=3), bb, jpegs, progress=False,
                       cpu_decode_share=1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streams_and_pinned_ring_give_the_plain_forward():
    # chunks from host memory (pinned, copied on the h2d stream) and made on the GPU on a producer
    # stream, all issued before any is waited for: each ring buffer holds its own chunk's tokens
    bb = cached_backbone("vit_small_patch16_224", "random", -1, "out", 96, "cuda")
    io = device_io("cuda")
    ring = io.ring(6, (4, *bb.grid, bb.dim), torch.float16)
    producer = io.producer_stream()
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(4, 3, 96, 96, generator=gen) for _ in range(6)]
    expected = [bb.tokens(x.cuda()).to(torch.float16).cpu().numpy() for x in inputs]
    made = list(io.on_producer_stream(((k, x.cuda() if k % 2 else x.pin_memory()) for k, x in enumerate(inputs)),
                                      producer))
    hosts = [io.forward(bb, images, event, ring) for _, (images, event) in made]
    for host, want in zip(hosts, expected):
        tokens, finite = host.wait()
        assert finite
        np.testing.assert_allclose(tokens.astype(np.float32), want.astype(np.float32), rtol=0, atol=2e-2)
        host.release()
    assert ring.available()
