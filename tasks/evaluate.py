"""Prefect tasks for the zero-shot evaluations: thin wrappers over ``soapflow.evaluation.run``.

Tasks exchange refs, paths and JSON-able reports, never arrays or models. Tokens are shared
between tasks through an on-disk token cache (``cache_dir``), so one flow run extracts each
dataset once; the backbone is loaded once per process (``_context``).
"""

from __future__ import annotations

import functools

from prefect import task
from prefect.cache_policies import NO_CACHE

__all__ = ["resolve_head_task", "salient_task", "knn_seg_task", "knn_cls_task", "record_task"]


@functools.lru_cache(maxsize=4)
def _context(head_ref: str, registry: str | None, weights: str | None, image_size: int | None, device: str):
    from soapflow.evaluation.run import load_context

    return load_context(head_ref, registry=registry, weights=weights, image_size=image_size, device=device)


@task(name="resolve-head", cache_policy=NO_CACHE)
def resolve_head_task(head_ref: str, registry: str | None = None) -> dict:
    """Pin the head: a registry ref becomes ``name:version`` (so ``@latest`` cannot move under a
    running evaluation); a directory stays a directory."""
    import os

    if os.path.isdir(head_ref):
        from soapflow.storage.artifact import read_manifest

        manifest = read_manifest(head_ref)
        return {"ref": head_ref, "pinned": head_ref, "from_registry": False, "manifest": _small(manifest)}
    from soapflow.storage.registry import Registry

    reg = Registry(registry)
    name, version = reg.resolve(head_ref)
    pinned = f"{name}:{version}"
    from soapflow.consume import load_head

    head = load_head(pinned, registry=reg)
    return {"ref": head_ref, "pinned": pinned, "from_registry": True, "registry": reg.root,
            "manifest": _small(head.manifest)}


def _small(manifest: dict) -> dict:
    keys = ("name", "version", "content_hash", "backbone", "weights", "layer", "feature", "image_size", "grid", "dim",
            "mu", "n_suppressed")
    return {k: manifest.get(k) for k in keys}


@task(name="eval-salient", cache_policy=NO_CACHE)
def salient_task(head_ref: str, *, registry=None, weights=None, image_size=None, device="cpu", **kwargs) -> dict:
    from soapflow.evaluation.run import run_salient

    return run_salient(_context(head_ref, registry, weights, image_size, device), **kwargs)


@task(name="eval-knn-seg", cache_policy=NO_CACHE)
def knn_seg_task(head_ref: str, *, registry=None, weights=None, image_size=None, device="cpu", **kwargs) -> dict:
    from soapflow.evaluation.run import run_knn_seg

    return run_knn_seg(_context(head_ref, registry, weights, image_size, device), **kwargs)


@task(name="eval-knn-cls", cache_policy=NO_CACHE)
def knn_cls_task(head_ref: str, *, registry=None, weights=None, image_size=None, device="cpu", **kwargs) -> dict:
    from soapflow.evaluation.run import run_knn_cls

    return run_knn_cls(_context(head_ref, registry, weights, image_size, device), **kwargs)


@task(name="record-evaluation", cache_policy=NO_CACHE)
def record_task(pinned_ref: str, registry: str | None, reports: dict[str, dict]) -> dict:
    """Write the reports into the registry version's record (one evaluation key each)."""
    from soapflow.storage.registry import Registry

    reg = Registry(registry)
    reg.record_evaluation(pinned_ref, reports)
    return {"ref": pinned_ref, "registry": reg.root, "keys": sorted(reports)}
