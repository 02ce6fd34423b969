"""Transient failures inside a running flow are retried by Prefect and the flow completes:
an exception thrown once by the extraction task, and an S3 endpoint that drops every
connection in the middle of writing a chunk. The retry redoes only unflagged chunks."""

from __future__ import annotations

import numpy as np
import pytest

import soapflow.extract as ex
from soapflow.config import BackboneSpec, RefitConfig
from soapflow.errors import SoapError, TransientError
from soapflow.storage.feature_store import FeatureStore
from tests.faults.helpers import DroppableEndpoint, same_bits

SPEC = BackboneSpec("vit_tiny_patch16_224", weights="random", layer=11, image_size=32, device="cpu")
REFIT = dict(backbone="vit_tiny_patch16_224", weights="random", image_size=32, n_real=24, chunk=8, progress=False)


def test_refit_retries_a_failing_extraction_and_matches_dask_runner(images, tmp_path, monkeypatch):
    from prefect_dask import DaskTaskRunner

    from soapflow.flows.refit import refit

    real_extract = ex.extract_chunks
    calls = []

    def fails_once(store, backbone, source, chunks=None, **kw):
        if source.kind == "files":  # the real store's shard (the synthetic one runs beside it)
            calls.append((store.uri, list(chunks) if chunks is not None else None))
        if source.kind == "files" and len(calls) == 1:
            real_extract(store, backbone, source, list(chunks)[:1], **kw)  # one chunk done, then the failure
            raise ConnectionResetError("injected: the worker lost its connection")
        return real_extract(store, backbone, source, chunks, **kw)

    monkeypatch.setattr(ex, "extract_chunks", fails_once)
    first = refit(RefitConfig.from_flat(dict(data=str(images), workdir=str(tmp_path / "a"), **REFIT)))
    assert len(calls) == 2 and calls[0] == calls[1]  # the failed attempt and Prefect's retry
    # the retry redid the two unflagged chunks only: 16 of the 24 images
    assert first["extraction"]["real"]["written_images"] == 16
    assert FeatureStore.open(first["stores"]["real"]).pending_chunks() == []
    monkeypatch.undo()

    # the same refit, no failure, on a DaskTaskRunner: the same artifact, bit for bit
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": 2, "processes": False,
                                            "dashboard_address": None})
    second = refit.with_options(task_runner=runner)(RefitConfig.from_flat(dict(data=str(images),
                                                                               workdir=str(tmp_path / "b"), **REFIT)))
    assert second["extraction"]["real"]["written_images"] == 24
    assert second["content_hash"] == first["content_hash"]
    assert same_bits(np.asarray(FeatureStore.open(first["stores"]["real"]).tokens[:]),
                     np.asarray(FeatureStore.open(second["stores"]["real"]).tokens[:]))


@pytest.fixture
def s3_outage(monkeypatch):
    """A moto S3 server behind a proxy that can drop every connection (see DroppableEndpoint);
    botocore gives up after one attempt, so the failure reaches the task within seconds."""
    import s3fs

    from s3server import DUMMY_ENV, S3Server

    server = S3Server().start()
    proxy = DroppableEndpoint(int(server.endpoint_url.rsplit(":", 1)[1]))
    for key, value in {**DUMMY_ENV, "AWS_ENDPOINT_URL": proxy.endpoint_url, "AWS_MAX_ATTEMPTS": "1"}.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    yield server, proxy
    s3fs.S3FileSystem.clear_instance_cache()
    proxy.close()
    server.stop()


def test_flow_survives_a_dropped_s3_connection(s3_outage, tmp_path, monkeypatch):
    from prefect import flow

    from soapflow.tasks.extract import extract_shard, finalize_store, prepare_store

    server, proxy = s3_outage
    uri = f"s3://{server.new_bucket()}/stores/synthetic"
    source, n, chunk = "noise:pink", 16, 4

    @flow(name="extract-to-s3")
    def extract_to_s3():
        plan = prepare_store.submit(uri, SPEC, source, n, 0, chunk, "float16", 1).result()
        shards = [extract_shard.submit(plan.uri, plan.created, c, SPEC, source, n, 0, 0, False)
                  for c in plan.shards]
        return finalize_store.submit(uri, shards).result()

    real_write, real_extract = FeatureStore.write_chunk, ex.extract_chunks
    attempts, seen = [], []

    def write_chunk(self, i, tokens, **kw):
        if i == 2 and not proxy.drops:
            proxy.drop()  # the endpoint goes away just as chunk 2 is written
        return real_write(self, i, tokens, **kw)

    def extract_chunks(*args, **kw):
        attempts.append(1)
        try:
            return real_extract(*args, **kw)
        except Exception as exc:
            seen.append(str(exc))
            proxy.restore()  # ... and comes back while Prefect waits to retry
            raise

    monkeypatch.setattr(FeatureStore, "write_chunk", write_chunk)
    monkeypatch.setattr(ex, "extract_chunks", extract_chunks)
    result = extract_to_s3()
    assert proxy.drops == 1 and len(attempts) == 2, (attempts, seen)
    assert uri in seen[0] and "cannot write chunk 2" in seen[0], seen
    assert result.stats.images == 8  # chunks 0 and 1 were kept, only 2 and 3 redone
    monkeypatch.undo()

    store = FeatureStore.open(uri)
    store.require_complete()
    local, _ = ex.extract(BackboneSpec("vit_tiny_patch16_224", weights="random", image_size=32), source,
                          str(tmp_path / "local"), n=n, chunk=chunk, progress=False)
    assert same_bits(np.asarray(store.tokens[:]), np.asarray(local.tokens[:]))


def test_transient_errors_are_told_from_input_errors():
    import errno

    import botocore.exceptions

    from soapflow.errors import io_error, is_transient

    assert is_transient(OSError(errno.ENOSPC, "No space left on device"))
    assert is_transient(ConnectionResetError("peer reset")) and is_transient(TimeoutError())
    assert is_transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"))
    assert not is_transient(PermissionError(errno.EACCES, "Permission denied"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "gone"))
    assert not is_transient(botocore.exceptions.NoCredentialsError())
    assert not is_transient(SoapError("bad input")) and not is_transient(ZeroDivisionError())
    full = io_error("store x: cannot write chunk 0", OSError(errno.ENOSPC, "full"))
    assert isinstance(full, TransientError) and not isinstance(full, ValueError)
    assert isinstance(io_error("store x: cannot write", PermissionError(errno.EACCES, "no")), SoapError)


@pytest.mark.parametrize("error, attempts", [
    (SoapError("feature store x: chunk 0 must be (4, 2, 2, 192)"), 1),  # input: the same again, not retried
    (TransientError("feature store x: cannot write chunk 0: No space left on device (ENOSPC)"), 3),  # 1 + 2 retries
])
def test_tasks_retry_transient_errors_only(error, attempts, tmp_path, monkeypatch):
    from prefect import flow
    from prefect.states import State

    from soapflow.storage.registry import Registry
    from soapflow.tasks.extract import extract_shard, prepare_store
    from soapflow.tasks.publish import publish_artifact

    monkeypatch.setattr("soapflow.tasks.extract.extract_shard.retry_delay_seconds", 0)
    monkeypatch.setattr("soapflow.tasks.publish.publish_artifact.retry_delay_seconds", 0)
    calls = {"extract": 0, "publish": 0}

    def failing(what):
        def fail(*args, **kw):
            calls[what] += 1
            raise error
        return fail

    monkeypatch.setattr(ex, "extract_chunks", failing("extract"))
    monkeypatch.setattr(Registry, "publish", failing("publish"))
    uri = str(tmp_path / "store")

    @flow(name="retry-check")
    def tasks_that_fail():
        plan = prepare_store.submit(uri, SPEC, "noise:pink", 8, 0, 4, "float16", 1).result()
        extracted = extract_shard.submit(plan.uri, plan.created, plan.shards[0], SPEC, "noise:pink", 8, 0, 0, False)
        published = publish_artifact.submit(str(tmp_path / "artifact"), str(tmp_path / "reg"), None, {})
        return [extracted.wait() or extracted.state, published.wait() or published.state]

    states: list[State] = tasks_that_fail()
    assert all(s.is_failed() for s in states)
    assert calls == {"extract": attempts, "publish": attempts}
    for s in states:
        with pytest.raises(type(error), match=str(error)[:20].replace("(", r"\(")):
            s.result()
