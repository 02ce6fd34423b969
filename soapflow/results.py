"""What the pipeline's tasks hand each other: small typed records instead of string-keyed dicts.

Each holds paths, counts and JSON-able summaries, never arrays or models, so it crosses process
boundaries (a dask worker, Prefect's result store) as cheaply as the dicts it replaces.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from soapflow.extract import TIMINGS, ExtractStats


@dataclass(frozen=True)
class PreparedStore:
    """A store created (or reopened to resume), with its pending chunks split into shards."""

    uri: str
    source: str
    count: int
    chunk: int
    created: str  # the store's creation time: part of an extraction's cache key
    pending: int
    shards: list[list[int]]
    fingerprint: str | None
    skipped: int  # unreadable source images, listed in the store's attributes


@dataclass(frozen=True)
class ExtractResult:
    """One complete store and what this run's shards did to fill it."""

    uri: str
    count: int
    stats: ExtractStats  # summed over the shards; ``images`` = written now

    @classmethod
    def of_shards(cls, uri: str, count: int, shards: list[ExtractStats]) -> ExtractResult:
        total = ExtractStats(images=sum(s.images for s in shards), chunks=sum(s.chunks for s in shards))
        for name in TIMINGS:
            setattr(total, name, sum(getattr(s, name) for s in shards))
        return cls(uri, count, total)

    def summary(self) -> dict:
        """The JSON-able form a flow returns: uri, count, written_images and the timings."""
        return {"uri": self.uri, "count": self.count, "written_images": self.stats.images,
                **{name: getattr(self.stats, name) for name in TIMINGS}}


@dataclass(frozen=True)
class FitResult:
    """A written artifact: its directory, manifest and the most invariant components."""

    path: str
    manifest: dict
    top: list[dict]  # rank, si_score, weight, explained_variance of the 8 highest SI scores
    warnings: list[str] = dataclasses.field(default_factory=list)  # soapflow.fit.fit_warnings

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]


@dataclass(frozen=True)
class Published:
    """An artifact's registry version (``created`` false: identical content was already there)."""

    ref: str
    name: str
    version: int
    created: bool
    registry: str

    def asdict(self) -> dict:
        return dataclasses.asdict(self)
