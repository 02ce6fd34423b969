"""The writer lease of a feature store: who may write it now.

Exclusive to create a store or run a whole extraction, shared to fill chunks (the sharded
tasks of one refit). The lease is a hidden sibling of the store. Locally it is a POSIX record
lock (``lockf``) on ``.<name>.soapflow-lock``, which the kernel drops when its process dies, so a
crash never leaves it wedged; on an object store it is ``.<name>.soapflow-lease`` created with
a conditional put, renewed by its holder and taken over once not renewed for ``LEASE_TTL_S``
seconds (or at once if its holder was on this host and is gone). A holder that cannot renew
says so in the log, and says when its lease has expired and may be taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from soapflow.common import is_url, utc_now
from soapflow.errors import SoapError, io_error, io_reason

logger = logging.getLogger(__name__)

LEASE_TTL_S = 120.0


class StoreBusy(SoapError):
    """Another writer holds the store's lease."""


def lease_location(uri: str) -> str:
    """Where the writer lease of the store at ``uri`` lives: a hidden sibling of the store."""
    if is_url(uri):
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
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now(), "mode": mode,
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
            raise SoapError(f"feature store {self.uri}: cannot create its folder: {io_reason(exc)}") from None
        flag = fcntl.LOCK_SH if mode == "shared" else fcntl.LOCK_EX
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise SoapError(
                    f"feature store {self.uri}: cannot open its writer lease {self.path}: {io_reason(exc)}"
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
        self.lost: str | None = None  # why the lease was lost while held, if it was
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
            raise io_error(f"feature store {self.uri}: cannot read its writer lease: {io_reason(exc)}", exc) from None

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
                raise io_error(f"feature store {self.uri}: cannot take its writer lease: {io_reason(exc)}", exc) from None
        else:
            raise _busy(self.uri, "another process", shared=False)
        self.held = True
        self._thread = threading.Thread(target=self._renew, name="store-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        renewed = time.time()
        while not self._stop.wait(LEASE_TTL_S / 4):
            try:
                current = self._read()
                if not current or current.get("token") != self.token:
                    self.lost = "taken over by another writer" if current else "removed"
                    logger.error("feature store %s: writer lease lost (%s); another writer may now write the "
                                 "store beside this one", self.uri, self.lost)
                    return  # stop renewing someone else's
                self.fs.pipe_file(self.path, self._doc())
                renewed = time.time()
            except Exception as exc:  # an outage may pass: try again next period, and say so
                left = LEASE_TTL_S - (time.time() - renewed)
                if left > 0:
                    logger.warning("feature store %s: cannot renew its writer lease (%s); it expires in %.0f s "
                                   "unless a renewal gets through", self.uri, io_reason(exc), left)
                else:
                    self.lost = f"expired: not renewed for {LEASE_TTL_S:.0f} s ({io_reason(exc)})"
                    logger.error("feature store %s: writer lease %s; another writer may take the store over",
                                 self.uri, self.lost)

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
            backend = (_ObjectLease if is_url(uri) else _FileLease)(key, str(uri), storage_options)
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
