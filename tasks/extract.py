"""Prefect tasks for feature extraction: thin wrappers over ``soapflow.extract``.

Tasks exchange store URIs and small dicts, never arrays or models; each worker process
loads the backbone once (``cached_backbone``).
"""

from __future__ import annotations

import dataclasses

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE

from soapflow import extract as ex


@task(name="prepare-store", cache_policy=NO_CACHE)
def prepare_store(uri: str, spec: dict, source: str, n: int | None, seed: int, chunk: int, dtype: str,
                  shards: int) -> dict:
    """Create (or reopen) the store and list its pending chunks, split into shards."""
    backbone = ex.cached_backbone(**spec)
    src = ex.cached_source(source, n, seed)
    store = ex.open_store_for(uri, backbone, src, chunk=chunk, dtype=dtype)
    pending = store.pending_chunks()
    return {
        "uri": store.uri,
        "source": source,
        "count": store.count,
        "chunk": store.chunk,
        "created": store.attrs["created"],
        "pending": len(pending),
        "shards": ex.split_chunks(pending, shards),
        "fingerprint": store.attrs.get("fingerprint"),
        "skipped": len(src.skipped),
    }


def _retry_transient(task, task_run, state) -> bool:
    """Retry what may pass on a second try (I/O, a lost worker), not bad input or Ctrl-C."""
    from soapflow.cancel import Interrupted, requested
    from soapflow.errors import SoapError

    exc = state.result(raise_on_failure=False)
    if requested() or isinstance(exc, Interrupted):
        return False
    return not isinstance(exc, SoapError) or _io_cause(exc)


def _io_cause(exc: BaseException) -> bool:
    """A SoapError that wraps an I/O failure (a lost connection, a full disk) may pass on a retry;
    one about the input never does."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        names = {k.__name__ for k in type(seen).__mro__}
        if isinstance(seen, OSError) or names & {"ConnectionError", "EndpointConnectionError", "ReadTimeoutError",
                                                 "ConnectTimeoutError", "ClientError"}:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


# Cached on inputs + source: `created` changes whenever the store is recreated, so a
# cache hit can only skip chunks that really are in this store.
@task(name="extract-chunks", tags=["gpu"], retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_transient,
      cache_policy=(INPUTS - "progress") + TASK_SOURCE, persist_result=True)
def extract_shard(uri: str, created: str, chunks: list[int], spec: dict, source: str, n: int | None,
                  seed: int, num_workers: int | None, progress: bool = True,
                  cpu_decode_share: float | None = None) -> dict:
    from storage.feature_store import FeatureStore

    backbone = ex.cached_backbone(**spec)
    src = ex.cached_source(source, n, seed)
    store = FeatureStore.open(uri, mode="r+")
    stats = ex.extract_chunks(store, backbone, src, chunks, num_workers=num_workers, progress=progress,
                              desc=f"extract {source}", cpu_decode_share=cpu_decode_share)
    return dataclasses.asdict(stats)  # images, chunks and ex.TIMINGS


@task(name="finalize-store", cache_policy=NO_CACHE)
def finalize_store(uri: str, shard_results: list[dict]) -> dict:
    from storage.feature_store import FeatureStore

    store = FeatureStore.open(uri, mode="r+")
    store.finalize()
    return {"uri": uri, "count": store.count, "written_images": sum(r["images"] for r in shard_results),
            **{k: sum(r.get(k, 0.0) for r in shard_results) for k in ex.TIMINGS}}
