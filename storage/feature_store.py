"""Feature stores: a zarr v3 group holding ``tokens (N, H, W, D)`` chunked along N (SPEC §3).

Writers fill whole chunks only, one writer per chunk, then flag that chunk in ``complete``
(an array with one element per chunk, stored one element per zarr chunk so that two writers
never share a file). An interrupted job reopens the store and redoes only unflagged chunks.
``tokens`` is created with a NaN fill value, so a chunk that was never written reads as NaN
and the fit's finiteness check catches it even in stores written by other tools.

Readers accept any group holding just ``tokens``; every attribute is optional.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from soapflow.errors import SoapError

SCHEMA_VERSION = 1
TOKENS = "tokens"
COMPLETE = "complete"
STORE_DTYPES = ("float16", "float32")

# Attributes that identify what a store holds: reopening a store to resume it with a
# different value for any of them would mix two datasets in one array.
IDENTITY_KEYS = ("backbone", "weights", "layer", "feature", "image_size", "source", "dtype")
# Attributes that must agree before two stores' tokens can be compared or combined.
COMPATIBLE_KEYS = ("backbone", "weights", "layer", "feature")


def _utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _is_url(uri: str) -> bool:
    return "://" in str(uri)


def _open_group(uri: str, mode: str, storage_options: dict | None):
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if _is_url(uri):
        kwargs["storage_options"] = storage_options or {}
    return zarr.open_group(str(uri), **kwargs)


@dataclass
class FeatureStore:
    """An open feature store. ``uri`` is a local path or an fsspec URL."""

    uri: str
    group: Any
    storage_options: dict | None = None

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None, mode: str = "r") -> FeatureStore:
        try:
            group = _open_group(uri, mode, storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise SoapError(f"feature store {uri}: no zarr v3 group there ({exc.__class__.__name__})") from None
        store = cls(str(uri), group, storage_options)
        store._check_tokens()
        return store

    @classmethod
    def create(
        cls,
        uri: str,
        *,
        count: int,
        grid: tuple[int, int],
        dim: int,
        chunk: int,
        dtype: str = "float16",
        attrs: dict | None = None,
        storage_options: dict | None = None,
    ) -> FeatureStore:
        """Create a store, or reopen it for resuming when it holds the same dataset."""
        if dtype not in STORE_DTYPES:
            raise SoapError(f"store dtype {dtype!r} not supported; use one of {STORE_DTYPES} (zarr has no bfloat16)")
        if count < 1 or chunk < 1:
            raise SoapError(f"feature store {uri}: need count ≥ 1 and chunk ≥ 1, got count={count}, chunk={chunk}")
        h, w = grid
        shape = (count, h, w, dim)
        attrs = {**(attrs or {}), "dtype": dtype}
        try:
            existing = cls.open(uri, storage_options, mode="r+")
        except SoapError:
            existing = None
        if existing is not None:
            existing._check_resumable(shape, chunk, attrs)
            return existing
        group = _open_group(uri, "w", storage_options)
        group.create_array(
            TOKENS, shape=shape, chunks=(chunk, h, w, dim), dtype=dtype, fill_value=float("nan"),
        )
        n_chunks = math.ceil(count / chunk)
        group.create_array(COMPLETE, shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
        group.attrs.update(
            {
                "soapflow_store": SCHEMA_VERSION,
                "grid": [h, w],
                "dim": dim,
                "count": count,
                "created": _utcnow(),
                **attrs,
            }
        )
        return cls(str(uri), group, storage_options)

    # --- shape ----------------------------------------------------------------------------

    def _check_tokens(self) -> None:
        if TOKENS not in self.group.array_keys():
            raise SoapError(f"feature store {self.uri}: no '{TOKENS}' array")
        if self.tokens.ndim != 4:
            raise SoapError(
                f"feature store {self.uri}: '{TOKENS}' must be (N, H, W, D), got shape {self.tokens.shape}"
            )

    @property
    def tokens(self):
        return self.group[TOKENS]

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.tokens.shape)

    @property
    def count(self) -> int:
        return self.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.shape[1], self.shape[2]

    @property
    def dim(self) -> int:
        return self.shape[3]

    @property
    def chunk(self) -> int:
        return self.tokens.chunks[0]

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.count / self.chunk)

    def chunk_range(self, i: int) -> range:
        return range(i * self.chunk, min(self.count, (i + 1) * self.chunk))

    # --- writing --------------------------------------------------------------------------

    def _check_resumable(self, shape, chunk, attrs) -> None:
        if COMPLETE not in self.group.array_keys():
            raise SoapError(f"feature store {self.uri} exists and was not written by soapflow; refusing to overwrite it")
        if self.shape != shape or self.chunk != chunk:
            raise SoapError(
                f"feature store {self.uri} exists with shape {self.shape} and chunk {self.chunk}, "
                f"not {shape} and chunk {chunk}; remove it or choose another --out"
            )
        mine = self.attrs
        for key in IDENTITY_KEYS:
            if key in attrs and key in mine and attrs[key] != mine[key]:
                raise SoapError(
                    f"feature store {self.uri} exists with {key}={mine[key]!r}, not {attrs[key]!r}; "
                    "remove it or choose another --out"
                )

    def pending_chunks(self) -> list[int]:
        """Chunks not yet flagged complete (all chunks count as complete in foreign stores)."""
        if COMPLETE not in self.group.array_keys():
            return []
        done = self.group[COMPLETE][:]
        return [int(i) for i in np.flatnonzero(done == 0)]

    def write_chunk(self, i: int, tokens: np.ndarray) -> None:
        """Write chunk ``i`` whole, then flag it complete (the flag is the commit point)."""
        rows = self.chunk_range(i)
        tokens = np.asarray(tokens)
        expected = (len(rows), *self.shape[1:])
        if tokens.shape != expected:
            raise SoapError(f"feature store {self.uri}: chunk {i} must be {expected}, got {tokens.shape}")
        stored = tokens.astype(self.tokens.dtype, copy=False)
        if not np.isfinite(stored).all():
            raise SoapError(
                f"feature store {self.uri}: chunk {i} has non-finite tokens after casting to {self.tokens.dtype}"
                + (" (float16 overflow? use --dtype float32)" if np.isfinite(tokens).all() else "")
            )
        self.tokens[rows.start : rows.stop] = stored
        self.group[COMPLETE][i] = 1

    def finalize(self, **attrs) -> None:
        """Record completion time and any summary attributes once every chunk is written."""
        pending = self.pending_chunks()
        if pending:
            raise SoapError(f"feature store {self.uri}: {len(pending)} chunks still pending, first {pending[0]}")
        self.group.attrs.update({"completed": _utcnow(), **attrs})

    # --- reading --------------------------------------------------------------------------

    def require_complete(self) -> None:
        if self.count == 0:
            raise SoapError(f"feature store {self.uri} is empty (0 images)")
        pending = self.pending_chunks()
        if pending:
            raise SoapError(
                f"feature store {self.uri} is incomplete: {len(pending)} of {self.n_chunks} chunks "
                f"not written (first: chunk {pending[0]}); rerun the extraction to finish it"
            )

    def to_dask(self):
        """The tokens as a dask array chunked exactly like the store."""
        import dask.array as da

        return da.from_zarr(self.tokens)

    def describe(self) -> dict:
        """What a manifest records about a store: where, what shape, and its provenance."""
        attrs = self.attrs
        return {
            "uri": self.uri,
            "count": self.count,
            "grid": list(self.grid),
            "dim": self.dim,
            "dtype": str(self.tokens.dtype),
            "source": attrs.get("source"),
            "fingerprint": attrs.get("fingerprint"),
            "created": attrs.get("created"),
        }


def open_store(uri: str, storage_options: dict | None = None) -> FeatureStore:
    return FeatureStore.open(uri, storage_options)


def check_compatible(a: FeatureStore, b: FeatureStore) -> None:
    """Two stores can be fitted together only if their tokens live in the same space."""
    if a.dim != b.dim:
        raise SoapError(f"stores differ in token dim D: {a.uri} has {a.dim}, {b.uri} has {b.dim}")
    if a.grid != b.grid:
        raise SoapError(f"stores differ in grid: {a.uri} has {list(a.grid)}, {b.uri} has {list(b.grid)}")
    attrs_a, attrs_b = a.attrs, b.attrs
    for key in COMPATIBLE_KEYS:
        if key in attrs_a and key in attrs_b and attrs_a[key] != attrs_b[key]:
            raise SoapError(
                f"stores differ in {key}: {a.uri} has {attrs_a[key]!r}, {b.uri} has {attrs_b[key]!r}"
            )
