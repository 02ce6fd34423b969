"""Extraction into feature stores and the refit flow, with a small random ViT."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from soapflow.config import BackboneSpec, RefitConfig
import torch

from soapflow.extract import cached_backbone, cached_source, extract, extract_chunks, open_store_for
from soapflow.storage.artifact import read_artifact
from soapflow.storage.feature_store import open_store

TINY = dict(backbone=BackboneSpec("vit_tiny_patch16_224", weights="random", image_size=64))


@pytest.fixture(scope="module")
def bb():
    return cached_backbone("vit_tiny_patch16_224", "random", -1, "out", 64, "cpu")


def test_store_holds_backbone_tokens_with_provenance(tmp_path, bb):
    store, stats = extract(**TINY, source_spec="photos", out=str(tmp_path / "s"), n=10, chunk=4, progress=False)
    assert store.shape == (10, 4, 4, 192) and store.tokens.chunks == (4, 4, 4, 192)
    assert stats.images == 10 and stats.chunks == 3
    src = cached_source("photos", 10, 0)
    expected = bb.tokens(src.batch(range(10), 64, bb.mean, bb.std)).numpy().astype(np.float16)
    np.testing.assert_array_equal(store.tokens[:], expected)
    attrs = store.attrs
    assert attrs["backbone"] == "vit_tiny_patch16_224" and attrs["weights"] == "random"
    assert attrs["layer"] == 11 and attrs["grid"] == [4, 4] and attrs["dim"] == 192
    assert attrs["image_size"] == 64 and attrs["source"]["spec"] == "photos" and attrs["count"] == 10
    assert len(attrs["fingerprint"]) == 64 and "completed" in attrs and attrs["soapflow_version"]
    assert attrs["decoded_by"] == ["pillow"]
    assert 0 < stats.forward_seconds + stats.input_seconds + stats.write_wait_seconds <= stats.seconds
    assert re.fullmatch(r"forward \d+ % · input \d+ % · disk \d+ % · device busy \d+ %", stats.breakdown())


def test_last_block_store_holds_forward_features_tokens(tmp_path, bb):
    """SPEC §1 step 1: by default the last block's store holds timm's forward_features patch tokens
    (after the final norm); --final-norm off gives the block output as stores held it before;
    earlier blocks are before the norm unless it is asked for."""
    src = cached_source("photos", 6, 0)
    x = src.batch(range(6), 64, bb.mean, bb.std)
    model = bb.model
    with torch.inference_mode():
        after = model.forward_features(x)[:, 1:].reshape(6, 4, 4, 192).numpy()
        before = dict(zip((8, 11), model.forward_intermediates(x, indices=[8, 11], output_fmt="NLC",
                                                               intermediates_only=True)))
        before = {k: v.reshape(6, 4, 4, 192).numpy() for k, v in before.items()}
    close = lambda store, ref: np.testing.assert_allclose(  # noqa: E731  float16 rounding
        store.tokens[:].astype(np.float32), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
    cases = [("default", {}, after, True), ("off", {"final_norm": "off"}, before[11], False),
             ("L8", {"layer": 8}, before[8], False), ("L8on", {"layer": 8, "final_norm": "on"}, None, True)]
    for name, kw, ref, normed in cases:
        store, _ = extract(dataclasses.replace(TINY["backbone"], **kw), source_spec="photos", out=str(tmp_path / name),
                           n=6, chunk=4, progress=False)
        assert store.attrs["final_norm"] is normed, name
        if ref is not None:
            close(store, ref)
    with torch.inference_mode():
        close(open_store(str(tmp_path / "L8on")), model.norm(torch.from_numpy(before[8])).numpy())
    assert not np.allclose(after, before[11], atol=1e-2)
    from soapflow.errors import SoapError

    with pytest.raises(SoapError, match="exists with final_norm=True, not False"):
        extract(dataclasses.replace(TINY["backbone"], final_norm="off"), source_spec="photos",
                out=str(tmp_path / "default"), n=6, chunk=4, progress=False)


def test_extract_stats_say_where_the_time_went(tmp_path, bb, monkeypatch):
    import soapflow.extract as ex

    src = cached_source("noise:pink", 12, 0)
    store = open_store_for(str(tmp_path / "s"), bb, src, chunk=2)
    loader, write = ex._loader, store.write_chunk

    def slow_loader(*args):  # 0.1 s per chunk to decode
        for item in loader(*args):
            time.sleep(0.1)
            yield item

    monkeypatch.setattr(ex, "_loader", slow_loader)
    monkeypatch.setattr(store, "write_chunk", lambda i, t, **kw: (time.sleep(0.3), write(i, t, **kw)))  # a slow disk
    stats = extract_chunks(store, bb, src, progress=False, writers=1)  # one writer: the disk is the limit
    assert stats.chunks == 6 and store.pending_chunks() == []
    assert stats.input_seconds >= 0.6 and stats.write_wait_seconds >= 0.5  # 6 × 0.3 s behind 0.6 s of input
    assert stats.forward_seconds + stats.input_seconds + stats.write_wait_seconds <= stats.seconds
    shares = dict(re.findall(r"(\w+) (\d+) %", stats.breakdown()))
    assert int(shares["input"]) >= 25 and int(shares["disk"]) >= 20, stats.breakdown()


def test_extract_stats_count_waiting_for_the_other_extraction(tmp_path, bb, monkeypatch):
    # as in a refit on a CPU: two extractions take turns on the device (0.2 s per forward here)
    from concurrent.futures import ThreadPoolExecutor

    tokens = bb.tokens
    monkeypatch.setattr(bb, "tokens", lambda x: (time.sleep(0.2), tokens(x))[1])
    specs = ["photos", "noise:pink"]
    sources = [cached_source(spec, 6, 0) for spec in specs]
    stores = [open_store_for(str(tmp_path / f"s{k}"), bb, sources[k], chunk=2) for k in range(2)]
    with ThreadPoolExecutor(2) as pool:
        stats = list(pool.map(lambda k: extract_chunks(stores[k], bb, sources[k], progress=False), range(2)))
    for st in stats:
        assert st.chunks == 3 and st.forward_seconds >= 0.6  # its own three forwards, not the other's
        accounted = st.forward_seconds + st.input_seconds + st.write_wait_seconds + st.device_wait_seconds
        assert accounted <= st.seconds
    # 1.2 s of forwards one at a time: the two waited ~0.6 s between them, counted as "device busy"
    assert sum(st.device_wait_seconds for st in stats) >= 0.4, [st.breakdown() for st in stats]
    for st, k in zip(stats, range(2)):
        np.testing.assert_array_equal(stores[k].tokens[:], tokens(sources[k].batch(range(6), 64, bb.mean, bb.std))
                                      .numpy().astype(np.float16))


def test_decode_processes_give_the_same_store(tmp_path, monkeypatch):
    import soapflow.sources as sources

    seen = []
    real_loader = sources.chunk_loader

    def spy(*args, num_workers=0, **kwargs):
        seen.append(num_workers)
        return real_loader(*args, num_workers=num_workers, **kwargs)

    monkeypatch.setattr(sources, "chunk_loader", spy)
    here, _ = extract(**TINY, source_spec="photos", out=str(tmp_path / "here"), n=9, chunk=4, progress=False)
    procs, _ = extract(**TINY, source_spec="photos", out=str(tmp_path / "procs"), n=9, chunk=4, progress=False,
                       num_workers=2)
    assert seen == [0, 2]  # on a CPU the default decodes in this process
    np.testing.assert_array_equal(here.tokens[:], procs.tokens[:])


def test_read_ahead_makes_the_next_chunk_during_the_forward_and_gives_the_same_store(tmp_path, bb, monkeypatch):
    # read-ahead (the default on a GPU), forced on here: while chunk k's forward runs, the loader is
    # already making chunk k+1 in its own thread. Each forward waits for that to start; serially
    # (read_ahead=False) it never would, and the test would fail on the timeout.
    import threading

    import soapflow.extract as ex

    started = {}
    loader, tokens = ex._loader, bb.tokens

    def watched_loader(*args):
        it = loader(*args)
        for k in range(len(args[1])):
            started.setdefault(k, threading.Event()).set()
            yield next(it)

    forwards = []

    def forward(x):
        k = len(forwards)
        forwards.append(threading.current_thread().name)
        if k + 1 < 3:  # 3 chunks
            assert started.setdefault(k + 1, threading.Event()).wait(10), f"chunk {k + 1} not begun during forward {k}"
        return tokens(x)

    for spec in ("photos", "noise:mixture"):
        src = cached_source(spec, 10, 0)
        plain = open_store_for(str(tmp_path / f"plain-{spec}"), bb, src, chunk=4)
        extract_chunks(plain, bb, src, progress=False, read_ahead=False)
        started.clear()
        forwards.clear()
        monkeypatch.setattr(ex, "_loader", watched_loader)
        monkeypatch.setattr(bb, "tokens", forward)
        ahead = open_store_for(str(tmp_path / f"ahead-{spec}"), bb, src, chunk=4)
        stats = extract_chunks(ahead, bb, src, progress=False, read_ahead=True)
        monkeypatch.undo()
        assert stats.chunks == 3 and ahead.pending_chunks() == [] and len(forwards) == 3
        assert not any(name.startswith("read-ahead") for name in forwards)  # forwards stay in this thread
        np.testing.assert_array_equal(ahead.tokens[:], plain.tokens[:])


@pytest.mark.parametrize("read_ahead", [True, False])
def test_decode_workers_exit_cleanly_from_any_thread(tmp_path, bb, monkeypatch, read_ahead):
    # DataLoader workers forked from a ThreadPoolExecutor's thread (read-ahead's, Prefect's task
    # threads) exit with code 1, which torch's SIGCHLD handler (installed by any DataLoader
    # iterated in the main thread before) raises in the main thread as "worker exited
    # unexpectedly": the workers must exit with 0, here called from an executor's thread
    from concurrent.futures import ThreadPoolExecutor

    from torch.utils.data import dataloader

    workers, shutdown = {}, dataloader._MultiProcessingDataLoaderIter._shutdown_workers

    def spy(self):  # (called at the end of the iteration, and again by chunk_loader)
        workers.update((w.pid, w) for w in self._workers)
        shutdown(self)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers", spy)
    src = cached_source("photos", 6, 0)
    store = open_store_for(str(tmp_path / "s"), bb, src, chunk=2)
    with ThreadPoolExecutor(1) as task_thread:
        stats = task_thread.submit(extract_chunks, store, bb, src, num_workers=2, progress=False,
                                   read_ahead=read_ahead).result()
    assert stats.chunks == 3 and len(workers) == 2
    for w in workers.values():
        w.join(10)
        assert w.exitcode == 0, (w, w.exitcode)


@pytest.mark.parametrize("fail", ["decode", "write"])
def test_read_ahead_failure_stops_the_decode_workers(tmp_path, bb, monkeypatch, fail):
    # a file changed after the scan (decoding fails in a worker), or a disk that fails: the error
    # comes out as it would without read-ahead, the chunks before it are kept, and the DataLoader
    # worker processes are gone when extract_chunks returns, not at garbage collection
    import multiprocessing
    import shutil

    from soapflow.errors import SoapError

    photos = cached_source("photos", 8, 0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, path in enumerate(photos.paths):
        shutil.copy(path, folder / f"{k:02d}{os.path.splitext(path)[1]}")
    src = cached_source(str(folder), None, 0)
    store = open_store_for(str(tmp_path / "s"), bb, src, chunk=1)
    if fail == "decode":
        victim = src.paths[5]
        with open(victim, "r+b") as f:  # same size, garbage inside: passes the resume checks, fails to decode
            f.write(b"\0" * os.path.getsize(victim))
        expected = re.escape(victim)
    else:
        write = store.write_chunk
        # chunk 1 fails; that surfaces two chunks later, with four still to decode
        monkeypatch.setattr(store, "write_chunk", lambda i, t, **kw: 1 / 0 if i == 1 else write(i, t, **kw))
        expected = "division by zero"
    others = set(multiprocessing.active_children())  # (a cluster another test left running)
    try:
        extract_chunks(store, bb, src, num_workers=1, progress=False, read_ahead=True)
    except (SoapError, ZeroDivisionError) as e:  # (while its traceback, and its frames, are alive)
        assert re.search(expected, str(e)), e
        assert set(multiprocessing.active_children()) <= others
    else:
        pytest.fail("no error")
    pending = store.pending_chunks()
    assert 0 not in pending and (5 in pending if fail == "decode" else 1 in pending), pending


def test_interrupted_extraction_resumes_identically(tmp_path, bb):
    full, _ = extract(**TINY, source_spec="noise:mixture", out=str(tmp_path / "full"), n=22, chunk=5, progress=False)
    src = cached_source("noise:mixture", 22, 0)
    partial = open_store_for(str(tmp_path / "part"), bb, src, chunk=5)
    extract_chunks(partial, bb, src, [1, 3], progress=False)  # a run that died after two chunks
    assert partial.pending_chunks() == [0, 2, 4]
    resumed, stats = extract(**TINY, source_spec="noise:mixture", out=str(tmp_path / "part"), n=22, chunk=5,
                             progress=False)
    assert stats.chunks == 3 and stats.images == 12  # only the missing chunks were redone
    np.testing.assert_array_equal(resumed.tokens[:], full.tokens[:])
    assert "decoded_by" not in resumed.attrs  # nothing decoded from files


def test_one_pass_over_several_blocks_writes_each_store_as_extract_does(tmp_path, bb):
    from concurrent.futures import ThreadPoolExecutor

    from soapflow.extract import extract_layers
    from soapflow.storage.feature_store import StoreBusy, store_lease

    src = cached_source("photos", 10, 0)
    uris = {l: str(tmp_path / f"L{l}") for l in (3, -1)}
    # block 3's store was begun by an interrupted run: only its missing chunks are written
    partial = open_store_for(uris[3], cached_backbone("vit_tiny_patch16_224", "random", 3, "out", 64, "cpu"), src,
                             chunk=4)
    extract_chunks(partial, cached_backbone("vit_tiny_patch16_224", "random", 3, "out", 64, "cpu"), src, [1],
                   progress=False)
    with store_lease(uris[-1]), ThreadPoolExecutor(1) as other, pytest.raises(StoreBusy):  # soap extract's lease
        other.submit(extract_layers, bb, src, uris, chunk=4, progress=False).result()
    stores, stats = extract_layers(bb, src, uris, chunk=4, progress=False)
    assert sorted(stores) == [3, 11] and stats.chunks == 3 and stats.images == 10
    for layer, store in stores.items():
        alone, _ = extract(TINY["backbone"].at(layer), source_spec="photos", out=str(tmp_path / f"alone{layer}"), n=10,
                           chunk=4, progress=False)
        np.testing.assert_array_equal(store.tokens[:], alone.tokens[:])
        assert store.pending_chunks() == [] and store.attrs["layer"] == layer == alone.attrs["layer"]
        assert {k: v for k, v in store.attrs.items() if k not in ("created", "completed")} == \
            {k: v for k, v in alone.attrs.items() if k not in ("created", "completed")}


def test_store_records_every_decoder_that_wrote_it(tmp_path, bb, monkeypatch):
    # begun with Pillow (a CPU), resumed where JPEGs are decoded on the device (as on a GPU; here
    # torchvision's decode_jpeg on the CPU): the store says both
    import soapflow.sources.loader as loader

    src = cached_source("photos", 10, 0)
    store = open_store_for(str(tmp_path / "s"), bb, src, chunk=4)
    extract_chunks(store, bb, src, [0], progress=False)
    assert store.attrs["decoded_by"] == ["pillow"]
    monkeypatch.setattr(loader, "decodes_on_device", lambda *a: True)
    extract_chunks(store, bb, src, progress=False)
    assert store.pending_chunks() == [] and store.attrs["decoded_by"] == ["decode_jpeg:cpu", "pillow"]


def test_unreadable_files_are_skipped_and_listed(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 50, 3), 40 * i, np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    store, _ = extract(**TINY, source_spec=str(folder), out=str(tmp_path / "s"), chunk=2, progress=False)
    assert store.count == 5
    skipped = {item["path"].split("/")[-1]: item["reason"] for item in store.attrs["skipped"]}
    assert set(skipped) == {"broken.jpg", "empty.png"} and store.attrs["n_skipped"] == 2


def test_cli_extract_and_bad_backbone(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "soapflow.cli", "extract", *a],  # noqa: E731
                                    capture_output=True, text=True)
    ok = run("--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "32", "--source",
             "noise:pink", "--n", "6", "--chunk", "4", "--out", str(tmp_path / "s"))
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"wrote 6 images in 2 chunks \([\d.]+ img/s: forward \d+ % · input \d+ % · disk \d+ % · "
                     r"device busy \d+ %\)",
                     ok.stdout), ok.stdout
    assert "(uncompressed)" in ok.stdout
    packed = run("--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "32", "--source",
                 "noise:pink", "--n", "6", "--chunk", "4", "--out", str(tmp_path / "z"), "--compress")
    assert packed.returncode == 0 and "(ZstdCodec)" in packed.stdout, packed.stderr
    z, s = open_store(str(tmp_path / "z")), open_store(str(tmp_path / "s"))
    assert [type(c).__name__ for c in z.tokens.compressors] == ["ZstdCodec"] and s.tokens.compressors == ()
    np.testing.assert_array_equal(z.tokens[:], s.tokens[:])
    bad = run("--backbone", "vit_nonexistent_9000", "--source", "photos", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "vit_nonexistent_9000" in bad.stderr and "Traceback" not in bad.stderr
    nonoise = run("--backbone", "vit_tiny_patch16_224", "--weights", "random", "--source", "noise:pink",
                  "--out", str(tmp_path / "c"))
    assert nonoise.returncode == 2 and "Traceback" not in nonoise.stderr
    assert "block 11 after the final norm" in ok.stdout and s.attrs["final_norm"] is True
    off = run("--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "32", "--source",
              "noise:pink", "--n", "6", "--chunk", "4", "--out", str(tmp_path / "o"), "--final-norm", "off")
    assert off.returncode == 0 and "block 11 before the final norm" in off.stdout, off.stderr
    assert open_store(str(tmp_path / "o")).attrs["final_norm"] is False
    badnorm = run("--backbone", "vit_tiny_patch16_224", "--weights", "random", "--source", "noise:pink", "--n", "2",
                  "--out", str(tmp_path / "x"), "--final-norm", "maybe")
    assert badnorm.returncode == 2 and "error: --final-norm must be one of auto, on, off, got 'maybe'" in badnorm.stderr
    assert "Traceback" not in badnorm.stderr


def _refit(tmp, **kw):
    from soapflow.flows.refit import refit

    return refit(RefitConfig.from_flat(dict(backbone="vit_tiny_patch16_224", weights="random", image_size=64,
                                            data="photos", n_real=12, chunk=4, workdir=str(tmp), progress=False,
                                            **kw)))


def test_refit_flow_thread_pool_and_dask_runner_agree(tmp_path):
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from soapflow.flows.refit import refit

    first = _refit(tmp_path / "a")
    art = read_artifact(first["artifact"])
    assert art.manifest["n_real_images"] == 12 and art.manifest["n_synth_images"] == 12
    assert art.manifest["lineage"]["flow_run_id"]
    # the last block after the final norm (auto): in the manifest, its lineage and the store names
    assert art.manifest["final_norm"] is True and art.manifest["lineage"]["final_norm"] is True
    assert all("-L11-out-norm" in uri for uri in first["stores"].values())
    assert (first["extraction"]["real"]["written_images"], first["extraction"]["synthetic"]["written_images"]) == (12, 12)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        flow = refit.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        second = flow(RefitConfig.from_flat(dict(
            backbone="vit_tiny_patch16_224", weights="random", image_size=64, data="photos", n_real=12, chunk=4,
            shards=2, workdir=str(tmp_path / "b"), progress=False, dask_address=cluster.scheduler_address)))
    assert second["content_hash"] == first["content_hash"]
    # a second refit on the same inputs reuses both stores
    again = _refit(tmp_path / "a")
    assert again["extraction"]["real"]["written_images"] == 0 and again["content_hash"] == first["content_hash"]


def test_cli_refit_prints_summary(tmp_path):
    result = subprocess.run([sys.executable, "-m", "soapflow.cli", "refit", "--backbone", "vit_tiny_patch16_224",
                             "--weights", "random", "--image-size", "32", "--n-real", "8", "--chunk", "4",
                             "--workdir", str(tmp_path), "--mu", "auto"], capture_output=True, text=True,
                            env={**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"})  # to see the server start and stop
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Top SI scores" in out and "components suppressed" in out and "artifact:" in out
    for kind in ("real", "synthetic"):  # extraction speed and where its time went, per store
        assert re.search(rf"{kind} +store: .*\(8 images; 8 extracted now, [\d.]+ img/s: forward \d+ % · input \d+ % · "
                         r"disk \d+ % · device busy \d+ %\)", out), out
    path = out.split("artifact:")[1].split()[0]
    assert read_artifact(path).manifest["mu_mode"] == "auto"
    # the process skips interpreter teardown at exit, but only after Prefect stopped its server
    port = re.search(r"Starting temporary server on http://127\.0\.0\.1:(\d+)", result.stderr).group(1)
    assert f"Stopping temporary server on http://127.0.0.1:{port}" in result.stderr
    alive = subprocess.run(["pgrep", "-f", f"create_app.*--port {port}"], capture_output=True, text=True)
    assert alive.returncode == 1 and not alive.stdout, f"temporary server on port {port} outlived the CLI"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_extraction_matches_cpu(tmp_path):
    # the GPU path end to end: nvJPEG decode and resize, noise made on the GPU, bf16 forward,
    # tokens copied back asynchronously while the other extraction runs (two at once, as in refit)
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    skdata = pytest.importorskip("skimage.data")
    photo = Image.fromarray(skdata.astronaut())
    (tmp_path / "jpegs").mkdir()
    for k in range(12):  # two sizes, different content
        photo.crop((16 * k, 8 * k, 16 * k + 300, 8 * k + (220 if k % 2 else 260))).save(
            tmp_path / "jpegs" / f"{k:02d}.jpg", quality=90)
    specs = [str(tmp_path / "jpegs"), "noise:mixture"]

    def tokens(device, k):
        bb = cached_backbone("vit_small_patch16_224", "random", -1, "out", 96, device)
        src = cached_source(specs[k], 12, 0)
        store = open_store_for(str(tmp_path / f"{device}{k}"), bb, src, chunk=5)
        extract_chunks(store, bb, src, num_workers=1, progress=False)
        assert store.pending_chunks() == []
        assert store.attrs.get("decoded_by") == ([f"decode_jpeg:{device}" if device == "cuda" else "pillow"]
                                                 if k == 0 else None)
        return store.tokens[:].astype(np.float32).reshape(12, -1)

    cpu = [tokens("cpu", k) for k in range(2)]
    with ThreadPoolExecutor(2) as pool:
        gpu = list(pool.map(lambda k: tokens("cuda", k), range(2)))
    for spec, a, b in zip(specs, gpu, cpu):
        assert np.isfinite(a).all(), spec
        err = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
        assert err.max() < 0.05, (spec, err)  # bf16 and a decode a grey level apart
        # and every image's tokens are in their own place: the neighbour's are much further away
        shifted = np.linalg.norm(a - np.roll(b, 1, axis=0), axis=1) / np.linalg.norm(b, axis=1)
        assert shifted.min() > 2 * err.max(), (spec, err, shifted)
