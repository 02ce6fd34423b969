"""A tiny key/value view of a local directory or an fsspec object store (``s3://bucket/prefix``).

The registry needs only a handful of operations, and for each one the atomicity it relies on:

* ``write_bytes`` — replace a small document atomically: a reader sees the old or the new
  bytes, never a mix (local: temp file + ``os.replace``; S3: one ``PutObject``).
* ``create_bytes`` — create-if-absent, the only primitive used to claim anything
  (local: a complete temp file hard-linked into place, ``link(2)`` fails if the name exists;
  S3: ``PutObject`` with ``If-None-Match: *``, via s3fs ``pipe_file(mode="create")``).
  Returns False when the key already exists. No lock files, so a crash leaves nothing to clean.
* ``put_tree`` — upload a set of files under a prefix (local: into a temp directory renamed
  into place; S3: one object each — the registry makes them visible with a marker written last).

Keys are ``/``-separated relative paths built by the registry from validated names only.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Union

from soapflow.common import is_url
from soapflow.errors import SoapError, io_error

Source = Union[bytes, Path]


def open_store(root: str | os.PathLike, storage_options: dict | None = None):
    """A :class:`LocalStore` for a path (or ``file://`` URL), else an :class:`FsspecStore`."""
    root = str(root)
    if root.startswith("file://"):
        root = root[len("file://"):]
    if not is_url(root):
        return LocalStore(Path(root).expanduser())
    return FsspecStore(root, storage_options or {})


class LocalStore:
    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def local_path(self, key: str) -> Path | None:
        return self.path(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except IsADirectoryError:
            raise FileNotFoundError(key) from None

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def _temp_beside(self, target: Path, data: bytes) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        tmp = self._temp_beside(target, data)
        try:
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def create_bytes(self, key: str, data: bytes) -> bool:
        target = self.path(key)
        tmp = self._temp_beside(target, data)
        try:
            os.link(tmp, target)  # atomic, and the file is complete the moment it appears
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # a filesystem without hard links: O_EXCL create instead
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def list_files(self, prefix: str = "") -> list[str]:
        """Every file under ``prefix`` as a key; hidden (temp) entries are skipped."""
        base = self.path(prefix)
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for fn in filenames:
                if not fn.startswith("."):
                    out.append(fn if rel == "." else f"{rel}/{fn}")
        return sorted(out)

    def put_tree(self, prefix: str, files: Mapping[str, Source]) -> None:
        """Write all files into a temp directory, then rename it to ``prefix`` in one step."""
        target = self.path(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            for rel, src in files.items():
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(src, bytes):
                    dest.write_bytes(src)
                else:
                    shutil.copyfile(src, dest)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_file(self, key: str, dest: Path) -> None:
        src = self.path(key)
        if not src.is_file():
            raise FileNotFoundError(key)
        shutil.copyfile(src, dest)

    def remove_tree(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)


class FsspecStore:
    """An object store through fsspec (s3fs for ``s3://``). Directory listings are never cached:
    other processes publish concurrently, and a stale listing would hide their versions.

    Failures other than "not found" / "already exists" (no credentials, no bucket, access
    denied, connection refused) become a SoapError naming the registry URL."""

    def __init__(self, url: str, storage_options: dict):
        import fsspec

        self.url = url.rstrip("/")
        options = dict(storage_options)
        protocol = self.url.split("://", 1)[0]
        if protocol in ("s3", "s3a"):
            options.setdefault("use_listings_cache", False)
        try:
            self.fs, self.base = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError, TypeError) as exc:
            raise SoapError(f"registry root {url}: cannot open it with fsspec ({exc})") from None
        self.base = self.base.rstrip("/")

    def _call(self, what: str, key: str, fn: Callable[[], Any], *, missing_ok: bool = True) -> Any:
        try:
            return fn()
        except FileExistsError:
            raise
        except FileNotFoundError:
            if missing_ok:
                raise
            raise SoapError(f"registry {self.url}: cannot {what} {key}: bucket or prefix not found") from None
        except SoapError:
            raise
        except Exception as exc:  # botocore credential/endpoint errors are not OSErrors
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise io_error(f"registry {self.url}: cannot {what} {key or '/'}: {type(exc).__name__}: {msg}", exc) from None

    def path(self, key: str) -> str:
        return f"{self.base}/{key}" if key else self.base

    def local_path(self, key: str) -> Path | None:
        return None

    def read_bytes(self, key: str) -> bytes:
        return self._call("read", key, lambda: self.fs.cat_file(self.path(key)))

    def exists(self, key: str) -> bool:
        self.fs.invalidate_cache()
        return bool(self._call("check", key, lambda: self.fs.isfile(self.path(key))))

    def write_bytes(self, key: str, data: bytes) -> None:
        # a single PUT: atomic for readers
        self._call("write", key, lambda: self.fs.pipe_file(self.path(key), data), missing_ok=False)

    def create_bytes(self, key: str, data: bytes) -> bool:
        try:
            # s3fs sends If-None-Match: * and maps 412 Precondition Failed to FileExistsError
            self._call("create", key, lambda: self.fs.pipe_file(self.path(key), data, mode="create"), missing_ok=False)
        except FileExistsError:
            return False
        return True

    def list_files(self, prefix: str = "") -> list[str]:
        self.fs.invalidate_cache()
        base = self.path(prefix)
        try:
            found = self._call("list", prefix, lambda: self.fs.find(base))
        except FileNotFoundError:
            return []
        cut = len(self.base) + 1
        return sorted(p[cut:] for p in found if p.startswith(self.base + "/"))

    def put_tree(self, prefix: str, files: Mapping[str, Source]) -> None:
        for rel, src in files.items():
            dest = self.path(f"{prefix}/{rel}")
            if isinstance(src, bytes):
                self._call("write", f"{prefix}/{rel}", lambda: self.fs.pipe_file(dest, src), missing_ok=False)
            else:
                self._call("upload", f"{prefix}/{rel}", lambda: self.fs.put_file(str(src), dest), missing_ok=False)

    def get_file(self, key: str, dest: Path) -> None:
        self._call("download", key, lambda: self.fs.get_file(self.path(key), str(dest)))

    def remove_tree(self, prefix: str) -> None:
        try:
            self._call("remove", prefix, lambda: self.fs.rm(self.path(prefix), recursive=True))
        except FileNotFoundError:
            pass
