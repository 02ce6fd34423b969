"""Prefect task that publishes an artifact directory to the registry (``storage.registry``)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from soapflow.errors import retry_transient
from soapflow.results import Published


# Retried on transient I/O errors only (an object store's outage): publishing is idempotent.
@task(name="publish-artifact", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def publish_artifact(artifact_dir: str, registry: str | None, name: str | None, lineage: dict,
                     storage_options: dict | None = None) -> Published:
    """Publish (idempotent: identical content returns the existing version)."""
    from soapflow.storage.registry import Registry

    reg = Registry(registry, storage_options)
    res = reg.publish(artifact_dir, name=name, lineage=lineage)
    return Published(ref=res.ref, name=res.name, version=res.version, created=res.created, registry=str(reg.root))
