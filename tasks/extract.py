"""Prefect tasks for feature extraction: thin wrappers over ``soapflow.extract``.

Tasks exchange store URIs and small records (``soapflow.results``), never arrays or models;
each worker process loads the backbone once (``soapflow.extract.load``).
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from soapflow import extract as ex
from soapflow.config import BackboneSpec
from soapflow.errors import retry_transient
from soapflow.results import ExtractResult, PreparedStore


@task(name="prepare-store", cache_policy=NO_CACHE)
def prepare_store(uri: str, spec: BackboneSpec, source: str, n: int | None, seed: int, chunk: int, dtype: str,
                  shards: int) -> PreparedStore:
    """Create (or reopen) the store and list its pending chunks, split into shards."""
    backbone = ex.load(spec)
    src = ex.cached_source(source, n, seed)
    store = ex.open_store_for(uri, backbone, src, chunk=chunk, dtype=dtype)
    pending = store.pending_chunks()
    return PreparedStore(uri=store.uri, source=source, count=store.count, chunk=store.chunk,
                         created=store.attrs["created"], pending=len(pending),
                         shards=ex.split_chunks(pending, shards), fingerprint=store.attrs.get("fingerprint"),
                         skipped=len(src.skipped))


# Cached on inputs + source: `created` changes whenever the store is recreated, so a
# cache hit can only skip chunks that really are in this store. Retried on transient I/O
# errors only (a dropped connection, a full disk): an input error would fail the same way again.
@task(name="extract-chunks", tags=["gpu"], retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient,
      cache_policy=(INPUTS - "progress") + TASK_SOURCE, persist_result=True)
def extract_shard(uri: str, created: str, chunks: list[int], spec: BackboneSpec, source: str, n: int | None,
                  seed: int, num_workers: int | None, progress: bool = True,
                  cpu_decode_share: float | None = None) -> ex.ExtractStats:
    from soapflow.storage.feature_store import FeatureStore

    backbone = ex.load(spec)
    src = ex.cached_source(source, n, seed)
    store = FeatureStore.open(uri, mode="r+")
    return ex.extract_chunks(store, backbone, src, chunks, num_workers=num_workers, progress=progress,
                             desc=f"extract {source}", cpu_decode_share=cpu_decode_share)


@task(name="finalize-store", cache_policy=NO_CACHE)
def finalize_store(uri: str, shard_results: list[ex.ExtractStats]) -> ExtractResult:
    from soapflow.storage.feature_store import FeatureStore

    store = FeatureStore.open(uri, mode="r+")
    store.finalize()
    return ExtractResult.of_shards(uri, store.count, shard_results)
