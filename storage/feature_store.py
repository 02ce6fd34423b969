"""Feature stores: a zarr v3 group holding ``tokens (N, H, W, D)`` chunked along N (SPEC §3).

Writers fill whole chunks only, one writer per chunk, then flag that chunk in ``complete``
(an array with one element per chunk, stored one element per zarr chunk so that two writers
never share a file). An interrupted job reopens the store and redoes only unflagged chunks.
``tokens`` is created with a NaN fill value, so a chunk that was never written reads as NaN
and the fit's finiteness check catches it even in stores written by other tools.

Readers accept any group holding just ``tokens``; every attribute is optional.

Creation writes the group attributes (with the ``soapflow_store`` marker) first, then
``tokens``, then ``complete``: a store whose creation was interrupted is recognised by the
marker and re-initialised, and a location holding anything else is never overwritten.

Writers hold a lease (``storage.lease.store_lease``): exclusive to create a store or run a
whole extraction, shared to fill chunks (the sharded tasks of one refit).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from soapflow.common import is_url, utc_now
from soapflow.errors import SoapError, io_error, io_reason
from soapflow.storage.artifact import final_norm_of
from soapflow.storage.lease import StoreBusy, lease_location, store_lease  # noqa: F401  (the store's writer lease)

SCHEMA_VERSION = 1
TOKENS = "tokens"
COMPLETE = "complete"
STORE_DTYPES = ("float16", "float32")

# Attributes that identify what a store holds: reopening a store to resume it with a
# different value for any of them would mix two datasets in one array.
IDENTITY_KEYS = ("backbone", "weights", "layer", "feature", "final_norm", "image_size", "source", "dtype")
# Attributes that must agree before two stores' tokens can be compared or combined.
COMPATIBLE_KEYS = ("backbone", "weights", "layer", "feature", "final_norm")


def _identity_value(attrs: dict, key: str):
    """An identity attribute as compared; ``final_norm`` has a value even where it is absent."""
    if key == "final_norm":
        return final_norm_of(attrs)
    return attrs.get(key)


def _has_identity(attrs: dict, key: str) -> bool:
    return key == "final_norm" or key in attrs


def _all_finite(a: np.ndarray) -> bool:
    if a.dtype == np.float16:  # numpy's float16 loops are scalar: test the exponent bits
        return not bool(((a.view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(a).all())


def _open_group(uri: str, mode: str, storage_options: dict | None, attributes: dict | None = None):
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if is_url(uri):
        kwargs["storage_options"] = storage_options or {}
    if attributes is not None:
        kwargs["attributes"] = attributes
    return zarr.open_group(str(uri), **kwargs)


def _open_existing_group(uri: str, mode: str, storage_options: dict | None):
    """The zarr group at ``uri``, or None where there is none; SoapError for anything unreadable."""
    try:
        return _open_group(uri, mode, storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    except zarr.errors.ContainsArrayError:
        raise SoapError(
            f"feature store {uri} is a single zarr array, not a group holding a '{TOKENS}' array"
        ) from None
    except (FileExistsError, NotADirectoryError):
        raise SoapError(f"feature store {uri} is a file, not a zarr group (a directory)") from None
    except SoapError:
        raise
    except Exception as exc:  # corrupt zarr.json (JSONDecodeError), unknown codecs, I/O errors
        raise SoapError(f"feature store {uri}: cannot read its zarr metadata: {io_reason(exc)}") from None


def _location_entries(uri: str, storage_options: dict | None) -> list[str]:
    """What lies at ``uri`` when it is not a zarr group (empty when nothing does)."""
    if is_url(uri):
        import fsspec

        fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
        try:
            return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        except FileNotFoundError:
            return []
    if not os.path.lexists(uri):
        return []
    if not os.path.isdir(uri):
        raise SoapError(f"feature store {uri} is a file, not a zarr group (a directory); choose another --out")
    return sorted(os.listdir(uri))


@dataclass
class FeatureStore:
    """An open feature store. ``uri`` is a local path or an fsspec URL."""

    uri: str
    group: Any
    storage_options: dict | None = None

    # --- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, uri: str, storage_options: dict | None = None, mode: str = "r") -> FeatureStore:
        group = _open_existing_group(uri, mode, storage_options)
        if group is None:
            raise SoapError(f"feature store {uri}: no zarr v3 group there")
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
        compress: bool = False,
    ) -> FeatureStore:
        """Create a store, or reopen it for resuming when it holds the same dataset.

        Runs under the store's exclusive writer lease; never overwrites a location that
        holds anything but a soapflow store whose creation was interrupted.

        ``tokens`` is uncompressed unless ``compress``: float16 ViT tokens barely compress, and
        the fit, which reads the real store twice, would pay for decoding. Readers take either."""
        if dtype not in STORE_DTYPES:
            raise SoapError(f"store dtype {dtype!r} not supported; use one of {STORE_DTYPES} (zarr has no bfloat16)")
        if count < 1 or chunk < 1:
            raise SoapError(f"feature store {uri}: need count ≥ 1 and chunk ≥ 1, got count={count}, chunk={chunk}")
        h, w = grid
        shape = (count, h, w, dim)
        attrs = {**(attrs or {}), "dtype": dtype}
        with store_lease(uri, storage_options):
            group = _open_existing_group(uri, "r+", storage_options)
            if group is None:
                entries = _location_entries(uri, storage_options)
                if entries:
                    shown = ", ".join(repr(e) for e in entries[:3]) + (", …" if len(entries) > 3 else "")
                    raise SoapError(
                        f"feature store {uri}: that location exists and is not a feature store "
                        f"({len(entries)} entries: {shown}); refusing to overwrite it — choose another --out"
                    )
            else:
                try:
                    keys = set(group.array_keys())
                    mine = dict(group.attrs)
                except Exception as exc:
                    raise SoapError(f"feature store {uri}: cannot read its zarr metadata: {io_reason(exc)}") from None
                if TOKENS in keys and COMPLETE in keys and "soapflow_store" in mine:
                    existing = cls(str(uri), group, storage_options)
                    existing._check_resumable(shape, chunk, attrs)
                    existing._remove_partial_writes()
                    return existing
                if COMPLETE not in keys and "soapflow_store" not in mine:
                    raise SoapError(
                        f"feature store {uri} exists and was not written by soapflow; refusing to overwrite it"
                    )
                # A soapflow store whose creation was interrupted (arrays are created after the
                # marker, and in older stores the attributes last): it never held a written chunk.
            try:
                return cls._initialise(uri, group, shape, chunk, dtype, attrs, storage_options, compress)
            except SoapError:
                raise
            except Exception as exc:
                raise io_error(f"feature store {uri}: cannot create it: {io_reason(exc)}", exc) from exc

    @classmethod
    def _initialise(cls, uri, group, shape, chunk, dtype, attrs, storage_options, compress) -> FeatureStore:
        count, h, w, dim = shape
        all_attrs = {
            "soapflow_store": SCHEMA_VERSION,
            "grid": [h, w],
            "dim": dim,
            "count": count,
            "created": utc_now(),
            **attrs,
        }
        if group is None:
            group = _open_group(uri, "w-", storage_options, attributes=all_attrs)
        else:
            for name in (TOKENS, COMPLETE):
                if name in group:
                    del group[name]
            group.attrs.put(all_attrs)
        group.create_array(
            TOKENS, shape=shape, chunks=(chunk, h, w, dim), dtype=dtype, fill_value=float("nan"),
            compressors="auto" if compress else None,
        )
        n_chunks = math.ceil(count / chunk)
        group.create_array(COMPLETE, shape=(n_chunks,), chunks=(1,), dtype="uint8", fill_value=0)
        return cls(str(uri), group, storage_options)

    def _remove_partial_writes(self) -> None:
        """Delete the temporary files of chunk writes a killed process left behind (local
        stores; zarr writes each chunk to ``*.partial`` and renames it into place). Only
        called under the exclusive lease, when no other local writer can be mid-write."""
        if is_url(self.uri):
            return
        for sub in (TOKENS, COMPLETE):
            for dirpath, _dirs, files in os.walk(os.path.join(self.uri, sub)):
                for name in files:
                    if name.endswith(".partial"):
                        with contextlib.suppress(OSError):
                            os.unlink(os.path.join(dirpath, name))

    # --- shape ----------------------------------------------------------------------------

    def _check_tokens(self) -> None:
        try:
            present = TOKENS in self.group.array_keys()
        except Exception as exc:
            raise SoapError(f"feature store {self.uri}: cannot read its zarr metadata: {io_reason(exc)}") from None
        if not present:
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
            if not (_has_identity(attrs, key) and _has_identity(mine, key)):
                continue
            have, want = _identity_value(mine, key), _identity_value(attrs, key)
            if have != want:
                raise SoapError(
                    f"feature store {self.uri} exists with {key}={have!r}, not {want!r}; "
                    "remove it or choose another --out"
                )

    def pending_chunks(self) -> list[int]:
        """Chunks not yet flagged complete (all chunks count as complete in foreign stores)."""
        if COMPLETE not in self.group.array_keys():
            return []
        done = self.group[COMPLETE][:]
        return [int(i) for i in np.flatnonzero(done == 0)]

    def write_chunk(self, i: int, tokens: np.ndarray, *, finite_before_cast: bool | None = None) -> None:
        """Write chunk ``i`` whole, then flag it complete (the flag is the commit point).

        ``finite_before_cast``: whether the tokens were finite before the caller cast them to
        the store's dtype (it tells a float16 overflow from a model's own NaN); by default it is
        read off ``tokens``."""
        try:
            # zarr would compare every chunk with the fill value (NaN) to skip writing "empty"
            # ones: for float16 that costs ten times the write itself. A chunk is never empty here.
            array = self.tokens.with_config({"write_empty_chunks": True})
            complete = self.group[COMPLETE]
        except Exception as exc:  # a lost connection while reading the arrays' metadata
            raise io_error(self._write_failure(f"cannot write chunk {i}", exc), exc) from exc
        size = array.chunks[0]
        rows = range(i * size, min(array.shape[0], (i + 1) * size))
        tokens = np.asarray(tokens)
        expected = (len(rows), *array.shape[1:])
        if tokens.shape != expected:
            raise SoapError(f"feature store {self.uri}: chunk {i} must be {expected}, got {tokens.shape}")
        stored = tokens.astype(array.dtype, copy=False)
        if not _all_finite(stored):
            if finite_before_cast is None:
                finite_before_cast = stored is not tokens and _all_finite(tokens)
            raise SoapError(
                f"feature store {self.uri}: chunk {i} has non-finite tokens after casting to {array.dtype}"
                + (" (float16 overflow? use --dtype float32)" if finite_before_cast else "")
            )
        try:
            array[rows.start : rows.stop] = stored
            complete[i] = 1
        except Exception as exc:  # disk full, lost connection, permissions
            raise io_error(self._write_failure(f"cannot write chunk {i}", exc), exc) from exc

    def _write_failure(self, what: str, exc: BaseException) -> str:
        kept = "complete chunks are kept"
        if not is_url(self.uri):  # (remotely, counting them would wait out the same outage)
            with contextlib.suppress(Exception):
                done = int(np.count_nonzero(self.group[COMPLETE][:]))
                kept = f"{done} of {self.n_chunks} chunks are complete and kept"
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return (
            f"feature store {self.uri}: {what}: {io_reason(exc)}; {kept} — "
            f"{'free some space' if full else 'fix the cause'} and rerun the same command to resume"
        )

    def note(self, **attrs) -> None:
        """Record attributes learnt while writing (e.g. what decoded the images)."""
        try:
            self.group.attrs.update(attrs)
        except Exception as exc:
            raise io_error(self._write_failure("cannot record its attributes", exc), exc) from exc

    def finalize(self, **attrs) -> None:
        """Record completion time and any summary attributes once every chunk is written."""
        pending = self.pending_chunks()
        if pending:
            raise SoapError(f"feature store {self.uri}: {len(pending)} chunks still pending, first {pending[0]}")
        try:
            self.group.attrs.update({"completed": utc_now(), **attrs})
        except Exception as exc:
            raise io_error(self._write_failure("cannot record completion", exc), exc) from exc

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
            "final_norm": final_norm_of(attrs),
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
        if not (_has_identity(attrs_a, key) and _has_identity(attrs_b, key)):
            continue
        va, vb = _identity_value(attrs_a, key), _identity_value(attrs_b, key)
        if va != vb:
            hint = " (tokens before vs after the model's final norm; extract both with the same --final-norm)" \
                if key == "final_norm" else ""
            raise SoapError(f"stores differ in {key}: {a.uri} has {va!r}, {b.uri} has {vb!r}{hint}")
