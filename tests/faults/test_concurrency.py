"""Two writers of one feature store never corrupt it: the second refuses at once, naming the
store and the first writer, or (for the sharded tasks of refits) fills chunks beside it.
The lease never outlives a killed holder. Eight concurrent publishes stay distinct."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from soapflow.config import BackboneSpec

from soapflow.errors import SoapError
from soapflow.storage import lease as lease_module
from soapflow.storage.feature_store import FeatureStore
from soapflow.storage.lease import StoreBusy, lease_location, store_lease
from tests.faults.conftest import extract_args
from tests.faults.helpers import (
    ENV, REPO, assert_clean_error, killer_cmd, same_bits, soap_cmd, tokens_of, wait_for,
)

TINY = dict(backbone=BackboneSpec("vit_tiny_patch16_224", weights="random", image_size=32), progress=False)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_second_extraction_of_a_store_refuses_while_the_first_runs(images, reference, tmp_path):
    out = tmp_path / "store"
    arrived, gate = tmp_path / "arrived", tmp_path / "gate"
    # the first writer stops in the middle of its run (before flagging chunk 2) until the gate opens
    spec = {"target": "zarr.storage._local:_put", "when": "wait", "match": "/complete/c/2",
            "arrived": str(arrived), "gate": str(gate)}
    first = subprocess.Popen(killer_cmd(spec, *extract_args(images, out)), env=ENV, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(arrived.exists, timeout=120)
        # the same extraction, and another dataset into the same path, while the first runs
        late = [subprocess.Popen(soap_cmd(*extract_args(images, out, *extra)), env=ENV, cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for extra in ((), ("--n", "50"))]
        second, other = map(_finish, late)
        line = assert_clean_error(second, str(out), "is being written", f"pid {first.pid}")
        assert_clean_error(other, str(out), "is being written")
    finally:
        gate.touch()
        stdout, stderr = first.communicate(timeout=180)
    assert first.returncode == 0, stderr[-3000:]
    assert same_bits(tokens_of(out), reference.tokens())
    assert not Path(lease_location(str(out))).exists()
    print("\n" + line)


def test_a_killed_holder_never_wedges_the_lease(tmp_path):
    """The lease of a kill -9'ed process is free at once (the kernel drops its lock)."""
    uri = str(tmp_path / "store")
    code = ("import sys, time; from storage.feature_store import store_lease\n"
            "with store_lease(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, uri], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreBusy, match=f"pid {holder.pid} on "):
            with store_lease(uri):
                pass
        with pytest.raises(StoreBusy):
            with store_lease(uri, shared=True):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert Path(lease_location(uri)).exists()  # left behind by the killed holder ...
    with store_lease(uri):  # ... and free at once
        pass
    assert not Path(lease_location(uri)).exists()


def test_lease_rules_within_one_process(tmp_path, no_leftover_leases):
    uri = str(tmp_path / "store")
    errors = []

    def other_thread(shared):
        try:
            with store_lease(uri, shared=shared):
                pass
        except StoreBusy as exc:
            errors.append(str(exc))

    with store_lease(uri):
        with store_lease(uri):  # re-entrant in the holding thread
            with store_lease(uri, shared=True):
                pass
        for shared in (False, True):
            t = threading.Thread(target=other_thread, args=(shared,))
            t.start()
            t.join()
    assert len(errors) == 2 and all("another thread of this process" in e for e in errors)
    errors.clear()
    with store_lease(uri, shared=True):  # shard writers share the lease ...
        t = threading.Thread(target=other_thread, args=(True,))
        t.start()
        t.join()
        assert not errors
        t = threading.Thread(target=other_thread, args=(False,))  # ... which keeps exclusive writers out
        t.start()
        t.join()
    assert len(errors) == 1


def test_two_refits_fill_one_store_without_corrupting_it(tmp_path, no_leftover_leases):
    """Two refits of the same inputs started together, each running the refit's own tasks
    (prepare-store, then two extract-chunks shards, then finalize-store) in threads: each
    either refuses (the other holds the store) or fills chunks beside the other; the store
    ends complete and identical to a single run's."""
    from soapflow.extract import extract
    from soapflow.tasks.extract import extract_shard, finalize_store, prepare_store

    spec = BackboneSpec("vit_tiny_patch16_224", weights="random", layer=11, image_size=32, device="cpu")
    source, n, chunk = "noise:mixture", 24, 4
    single, _ = extract(**TINY, source_spec=source, out=str(tmp_path / "single"), n=n, chunk=chunk)
    uri = str(tmp_path / "shared")
    start = threading.Barrier(2)
    outcomes = {}

    def refit_like(who):
        try:
            start.wait()
            plan = prepare_store.fn(uri, spec, source, n, 0, chunk, "float16", 2)
            results, errors = [None, None], []

            def shard(k):
                try:
                    results[k] = extract_shard.fn(plan.uri, plan.created, plan.shards[k], spec, source, n,
                                                  0, 0, progress=False)
                except StoreBusy as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=shard, args=(k,)) for k in range(len(plan.shards))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            finalize_store.fn(uri, results)
            outcomes[who] = "completed"
        except StoreBusy as exc:
            outcomes[who] = f"refused: {exc}"

    threads = [threading.Thread(target=refit_like, args=(w,)) for w in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "completed" in outcomes.values(), outcomes
    store = FeatureStore.open(uri)
    store.require_complete()
    assert same_bits(store.tokens[:], single.tokens[:])
    print("\n", outcomes)

    # both refits past prepare-store, then all four shards at once: they share the lease and
    # fill (some of) the same chunks twice, each write whole and atomic
    uri2 = str(tmp_path / "shared2")
    plans = [prepare_store.fn(uri2, spec, source, n, 0, chunk, "float16", 2) for _ in range(2)]
    go = threading.Barrier(4)
    done = []

    def shard(plan, k):
        go.wait()
        done.append(extract_shard.fn(plan.uri, plan.created, plan.shards[k], spec, source, n, 0, 0,
                                     progress=False))

    threads = [threading.Thread(target=shard, args=(p, k)) for p in plans for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 4
    finalize_store.fn(uri2, done)
    assert same_bits(FeatureStore.open(uri2).tokens[:], single.tokens[:])


def test_same_path_other_dataset_is_refused_not_mixed(tmp_path, no_leftover_leases):
    from soapflow.extract import extract

    out = str(tmp_path / "store")
    first, _ = extract(**TINY, source_spec="noise:pink", out=out, n=12, chunk=4)
    before = first.tokens[:]
    with pytest.raises(SoapError, match=r"exists with .*remove it or choose another --out"):
        extract(**TINY, source_spec="noise:pink", out=out, n=16, chunk=4)
    with pytest.raises(SoapError, match="exists with"):
        extract(**TINY, source_spec="noise:mixture", out=out, n=12, chunk=4)
    assert same_bits(FeatureStore.open(out).tokens[:], before)


# ---------------------------------------------------------------------------- S3 leases


@pytest.fixture(scope="module")
def s3():
    from s3server import S3Server

    server = S3Server().start()
    yield server
    server.stop()


def _s3_options(server):
    return {"endpoint_url": server.endpoint_url, "key": "testing", "secret": "testing"}


def test_object_store_lease(s3, no_leftover_leases):
    """Conditional-put lease on S3: a live lease refuses, a stale or dead one is taken over."""
    import fsspec

    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/stores/real"
    opts = _s3_options(s3)
    other = lambda: lease_module._ObjectLease(lease_location(uri), uri, opts)  # noqa: E731  (another process)
    fs, key = fsspec.core.url_to_fs(lease_location(uri), **opts)
    assert lease_location(uri) == f"s3://{bucket}/stores/.real.soapflow-lease"

    with store_lease(uri, opts):
        doc = json.loads(fs.cat_file(key))
        assert doc["pid"] == os.getpid()
        for mode in ("exclusive", "shared"):
            with pytest.raises(StoreBusy, match=f"pid {os.getpid()}"):
                other().acquire(mode)
    assert not fs.exists(key)

    def plant(**fields):
        fs.pipe_file(key, json.dumps({"pid": 1, "host": "elsewhere", "since": "earlier", "token": "x",
                                      "renewed": time.time(), "ttl": 120, **fields}).encode())

    plant()  # live, on another host
    with pytest.raises(StoreBusy, match="pid 1 on elsewhere"):
        with store_lease(uri, opts):
            pass
    plant(renewed=time.time() - 1000)  # not renewed for longer than its ttl: its writer is gone
    with store_lease(uri, opts):
        assert json.loads(fs.cat_file(key))["pid"] == os.getpid()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    plant(pid=int(dead.stdout), host=socket.gethostname())  # renewed just now, but its process is gone
    with store_lease(uri, opts):
        pass
    assert not fs.exists(key)


def test_a_lease_that_cannot_renew_says_so(s3, monkeypatch, caplog, no_leftover_leases):
    """An outage while the lease is held: each failed renewal is a warning naming the store and
    the reason; once the ttl has passed, an error that the lease expired; a lease another writer
    took over is reported as lost."""
    import logging

    import fsspec

    monkeypatch.setattr(lease_module, "LEASE_TTL_S", 0.8)  # renewed every 0.2 s
    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/stores/real"
    opts = _s3_options(s3)
    fs, key = fsspec.core.url_to_fs(lease_location(uri), **opts)
    caplog.set_level(logging.WARNING, logger="soapflow.storage.lease")
    with store_lease(uri, opts):
        held = lease_module._LEASES[lease_location(uri)].backend

        def outage(*args, **kw):
            raise ConnectionResetError(104, "Connection reset by peer")

        monkeypatch.setattr(held.fs, "pipe_file", outage)
        assert wait_for(lambda: held.lost is not None, timeout=10)
        monkeypatch.undo()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert warnings and all(uri in w and "cannot renew its writer lease" in w and "ECONNRESET" in w for w in warnings)
    assert any(uri in e and "writer lease expired" in e for e in errors), errors
    assert held.lost.startswith("expired")
    caplog.clear()

    monkeypatch.setattr(lease_module, "LEASE_TTL_S", 0.8)
    with store_lease(uri, opts):
        held = lease_module._LEASES[lease_location(uri)].backend
        fs.pipe_file(key, json.dumps({"pid": 1, "host": "elsewhere", "token": "theirs", "renewed": time.time(),
                                      "ttl": 120}).encode())  # taken over by another writer after a stall
        assert wait_for(lambda: held.lost is not None, timeout=10)
    assert held.lost == "taken over by another writer"
    assert any("writer lease lost (taken over by another writer)" in r.getMessage() for r in caplog.records)
    fs.rm_file(key)


def test_extraction_to_s3_holds_and_releases_its_lease(s3, tmp_path, no_leftover_leases):
    import fsspec

    from soapflow.extract import extract

    bucket = s3.new_bucket()
    uri = f"s3://{bucket}/store"
    opts = _s3_options(s3)
    remote, _ = extract(**TINY, source_spec="noise:pink", out=uri, n=12, chunk=4, storage_options=opts)
    local, _ = extract(**TINY, source_spec="noise:pink", out=str(tmp_path / "local"), n=12, chunk=4)
    assert same_bits(np.asarray(remote.tokens[:]), np.asarray(local.tokens[:]))
    fs, key = fsspec.core.url_to_fs(lease_location(uri), **opts)
    assert not fs.exists(key)


# ---------------------------------------------------------------------------- registry


PUBLISH = """
import sys
from soapflow.storage.registry import Registry
res = Registry(sys.argv[1]).publish(sys.argv[2], name=sys.argv[3])
print(res.version, res.created, res.content_hash)
"""


def _artifacts(tmp_path, count):
    from soapflow.storage.artifact import TENSOR_NAMES, write_artifact

    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        tensors = {k: rng.normal(size=(4, 4)).astype(np.float32) for k in TENSOR_NAMES}
        paths.append(write_artifact(tmp_path / f"art{i}", tensors, {"backbone": "test-vit", "layer": 3}))
    return paths


def test_eight_concurrent_publishes_stay_distinct(tmp_path):
    from soapflow.storage.registry import Registry

    root = tmp_path / "registry"
    arts = _artifacts(tmp_path, 8)
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISH, str(root), str(a), "team/model"], env=ENV, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in arts]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        version, created, digest = out.split()
        results.append((int(version), created == "True", digest))
    assert sorted(v for v, _, _ in results) == list(range(1, 9))
    assert all(created for _, created, _ in results)
    reg = Registry(root)
    assert reg.versions("team/model") == list(range(1, 9))
    for (version, _, digest), art in zip(results, arts):
        assert reg.content_hash(f"team/model:{version}") == digest == json.loads((art / "manifest.json").read_text())["content_hash"]
        reg.verify(f"team/model:{version}")
    # the same content published by 8 processes at once: every committed version verifies,
    # and none is lost or half-visible (how many versions result is reported, not required)
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISH, str(root), str(arts[0]), "team/same"], env=ENV, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(8)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    same = reg.versions("team/same")
    for v in same:
        reg.verify(f"team/same:{v}")
    print(f"\n8 concurrent publishes of one content → versions {same}")
