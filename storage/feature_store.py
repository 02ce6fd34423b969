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

Writers hold a lease (``store_lease``): exclusive to create a store or run a whole
extraction, shared to fill chunks (the sharded tasks of one refit). The lease is a hidden
sibling of the store. Locally it is a POSIX record lock (``lockf``) on
``.<name>.soapflow-lock``, which the kernel drops when its process dies, so a crash never
leaves it wedged; on an object store it is ``.<name>.soapflow-lease`` created with a
conditional put, renewed by its holder and taken over once not renewed for
``LEASE_TTL_S`` seconds (or at once if its holder was on this host and is gone).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from soapflow.errors import SoapError
from storage.artifact import final_norm_of

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


def _utcnow() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _all_finite(a: np.ndarray) -> bool:
    if a.dtype == np.float16:  # numpy's float16 loops are scalar: test the exponent bits (~6x faster)
        return not bool(((a.view(np.uint16) & 0x7C00) == 0x7C00).any())
    return bool(np.isfinite(a).all())


def _is_url(uri: str) -> bool:
    return "://" in str(uri)


def _open_group(uri: str, mode: str, storage_options: dict | None, attributes: dict | None = None):
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if _is_url(uri):
        kwargs["storage_options"] = storage_options or {}
    if attributes is not None:
        kwargs["attributes"] = attributes
    return zarr.open_group(str(uri), **kwargs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _reason(exc: BaseException) -> str:
    """One line for an I/O failure: 'No space left on device (ENOSPC)', or the type and message."""
    if isinstance(exc, OSError) and exc.errno in errno.errorcode:
        return f"{os.strerror(exc.errno)} ({errno.errorcode[exc.errno]})"
    msg = _first_line(exc)
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


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
        raise SoapError(f"feature store {uri}: cannot read its zarr metadata: {_reason(exc)}") from None


def _location_entries(uri: str, storage_options: dict | None) -> list[str]:
    """What lies at ``uri`` when it is not a zarr group (empty when nothing does)."""
    if _is_url(uri):
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


# --- writer lease -------------------------------------------------------------------------

LEASE_TTL_S = 120.0


class StoreBusy(SoapError):
    """Another writer holds the store's lease."""


def lease_location(uri: str) -> str:
    """Where the writer lease of the store at ``uri`` lives: a hidden sibling of the store."""
    if _is_url(uri):
        base = str(uri).rstrip("/")
        proto, _, path = base.partition("://")
        head, sep, name = path.rpartition("/")
        if not sep:  # a store at the root of a bucket
            return f"{base}/.soapflow-lease"
        return f"{proto}://{head}/.{name}.soapflow-lease"
    path = os.path.abspath(os.path.expanduser(str(uri)))
    parent, name = os.path.split(path.rstrip(os.sep) or os.sep)
    return os.path.join(os.path.realpath(parent), f".{name}.soapflow-lock")


def _holder_note(mode: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": _utcnow(), "mode": mode,
            "command": " ".join(sys.argv)[:300]}


def _describe_holder(doc: dict | None) -> str:
    if not doc or "pid" not in doc:
        return "another process"
    since = f" since {doc['since']}" if doc.get("since") else ""
    return f"pid {doc['pid']} on {doc.get('host', '?')}{since}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _busy(uri: str, holder: str, shared: bool) -> StoreBusy:
    what = "being written" if not shared else "being filled by other writers"
    return StoreBusy(
        f"feature store {uri} is {what} ({holder}); wait for that run to finish or choose another "
        "output — a run that was killed releases the store by itself"
    )


class _FileLease:
    """A POSIX record lock on a sibling file: shared or exclusive, dropped by the kernel when
    the holding process dies. The file is removed by the last holder; a holder re-checks that
    the path still names the inode it locked, so removal never lets two writers in."""

    def __init__(self, path: str, uri: str, storage_options: dict | None):
        self.path, self.uri, self.fd = path, uri, None

    def acquire(self, mode: str) -> None:
        import fcntl

        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as exc:
            raise SoapError(f"feature store {self.uri}: cannot create its folder: {_reason(exc)}") from None
        flag = fcntl.LOCK_SH if mode == "shared" else fcntl.LOCK_EX
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise SoapError(
                    f"feature store {self.uri}: cannot open its writer lease {self.path}: {_reason(exc)}"
                ) from None
            try:
                fcntl.lockf(fd, flag | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EAGAIN):
                    try:
                        note = json.loads(os.pread(fd, 4096, 0) or b"{}")
                    except (OSError, ValueError):
                        note = None
                    os.close(fd)
                    raise _busy(self.uri, _describe_holder(note), shared=False) from None
                os.close(fd)  # a file system without POSIX locks: write without a lease
                return
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the last holder removed the file meanwhile: lock the new one
        self.fd = fd
        if mode == "exclusive":
            with contextlib.suppress(OSError):  # the note only names the holder in messages
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(_holder_note(mode)).encode(), 0)

    def release(self) -> None:
        import fcntl

        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            # remove the file only while holding it exclusively (no one else has it locked)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)


class _ObjectLease:
    """A marker object created with a conditional put (``If-None-Match: *``) and renewed by a
    background thread; one not renewed for its ``ttl`` (or left by a dead process on this
    host) is taken over. Shared writers only check that no live exclusive lease exists."""

    def __init__(self, url: str, uri: str, storage_options: dict | None):
        import fsspec

        self.uri = uri
        self.fs, self.path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.token = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            self.fs.invalidate_cache()
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}
        except Exception as exc:
            raise SoapError(f"feature store {self.uri}: cannot read its writer lease: {_reason(exc)}") from None

    def _doc(self) -> bytes:
        return json.dumps({**_holder_note("exclusive"), "token": self.token, "renewed": time.time(),
                           "ttl": LEASE_TTL_S}).encode()

    @staticmethod
    def _stale(doc: dict) -> bool:
        try:
            if time.time() - float(doc.get("renewed", 0)) > float(doc.get("ttl", LEASE_TTL_S)):
                return True
        except (TypeError, ValueError):
            return True
        return doc.get("host") == socket.gethostname() and "pid" in doc and not _pid_alive(doc["pid"])

    def acquire(self, mode: str) -> None:
        current = self._read()
        if mode == "shared":
            if current is not None and not self._stale(current):
                raise _busy(self.uri, _describe_holder(current), shared=False)
            return
        for _ in range(5):
            try:
                self.fs.pipe_file(self.path, self._doc(), mode="create")
                break
            except FileExistsError:
                current = self._read()
                if current is not None and not self._stale(current):
                    raise _busy(self.uri, _describe_holder(current), shared=False) from None
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self.path)  # a dead writer's lease: take it over
            except (TypeError, NotImplementedError, ValueError):
                # a file system without conditional puts: best effort
                self.fs.pipe_file(self.path, self._doc())
                break
            except Exception as exc:
                raise SoapError(f"feature store {self.uri}: cannot take its writer lease: {_reason(exc)}") from None
        else:
            raise _busy(self.uri, "another process", shared=False)
        self.held = True
        self._thread = threading.Thread(target=self._renew, name="store-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_TTL_S / 4):
            try:
                current = self._read()
                if not current or current.get("token") != self.token:
                    return  # lost (taken over after a long stall): stop renewing someone else's
                self.fs.pipe_file(self.path, self._doc())
            except Exception:  # a transient outage: try again next period
                continue

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            current = self._read()
            if current and current.get("token") == self.token:
                self.fs.rm_file(self.path)


@dataclass
class _Held:
    backend: Any
    mode: str
    owners: dict = field(default_factory=dict)  # thread ident -> nesting depth


_LEASES: dict[str, _Held] = {}
_LEASES_LOCK = threading.Lock()


@contextlib.contextmanager
def store_lease(uri: str, storage_options: dict | None = None, *, shared: bool = False):
    """Hold the writer lease of the store at ``uri`` (see the module doc).

    Exclusive: nobody else writes the store meanwhile (creating it, or a whole extraction).
    Shared: other shared writers may fill other chunks, but no exclusive writer runs. Within
    one process the lease is re-entrant per thread. Raises ``StoreBusy`` naming the holder."""
    key = lease_location(uri)
    mode = "shared" if shared else "exclusive"
    me = threading.get_ident()
    with _LEASES_LOCK:
        held = _LEASES.get(key)
        if held is None:
            backend = (_ObjectLease if _is_url(uri) else _FileLease)(key, str(uri), storage_options)
            backend.acquire(mode)
            held = _LEASES[key] = _Held(backend, mode)
        elif not ((held.mode == "exclusive" and set(held.owners) == {me})
                  or (held.mode == "shared" and mode == "shared")):
            raise _busy(str(uri), f"another thread of this process, pid {os.getpid()}", shared=held.mode == "shared")
        held.owners[me] = held.owners.get(me, 0) + 1
    try:
        yield
    finally:
        with _LEASES_LOCK:
            held.owners[me] -= 1
            if not held.owners[me]:
                del held.owners[me]
            if not held.owners:
                _LEASES.pop(key, None)
                held.backend.release()


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

        ``tokens`` is uncompressed unless ``compress``: ViT tokens in float16 shrink only to
        ~92 % with zstd, and decoding (~1.4 GB/s per core) costs the fit, which reads the real
        store twice, ~5 % of its time. Readers take either."""
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
                    raise SoapError(f"feature store {uri}: cannot read its zarr metadata: {_reason(exc)}") from None
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
                raise SoapError(f"feature store {uri}: cannot create it: {_reason(exc)}") from exc

    @classmethod
    def _initialise(cls, uri, group, shape, chunk, dtype, attrs, storage_options, compress) -> FeatureStore:
        count, h, w, dim = shape
        all_attrs = {
            "soapflow_store": SCHEMA_VERSION,
            "grid": [h, w],
            "dim": dim,
            "count": count,
            "created": _utcnow(),
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
        if _is_url(self.uri):
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
            raise SoapError(f"feature store {self.uri}: cannot read its zarr metadata: {_reason(exc)}") from None
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
            raise SoapError(self._write_failure(f"cannot write chunk {i}", exc)) from exc
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
            raise SoapError(self._write_failure(f"cannot write chunk {i}", exc)) from exc

    def _write_failure(self, what: str, exc: BaseException) -> str:
        kept = "complete chunks are kept"
        if not _is_url(self.uri):  # (remotely, counting them would wait out the same outage)
            with contextlib.suppress(Exception):
                done = int(np.count_nonzero(self.group[COMPLETE][:]))
                kept = f"{done} of {self.n_chunks} chunks are complete and kept"
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return (
            f"feature store {self.uri}: {what}: {_reason(exc)}; {kept} — "
            f"{'free some space' if full else 'fix the cause'} and rerun the same command to resume"
        )

    def note(self, **attrs) -> None:
        """Record attributes learnt while writing (e.g. what decoded the images)."""
        try:
            self.group.attrs.update(attrs)
        except Exception as exc:
            raise SoapError(self._write_failure("cannot record its attributes", exc)) from exc

    def finalize(self, **attrs) -> None:
        """Record completion time and any summary attributes once every chunk is written."""
        pending = self.pending_chunks()
        if pending:
            raise SoapError(f"feature store {self.uri}: {len(pending)} chunks still pending, first {pending[0]}")
        try:
            self.group.attrs.update({"completed": _utcnow(), **attrs})
        except Exception as exc:
            raise SoapError(self._write_failure("cannot record completion", exc)) from exc

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
