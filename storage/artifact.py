"""Projection artifacts (SPEC §4): a directory with ``soap.safetensors`` and ``manifest.json``.

The manifest carries the sha256 of the safetensors file; the reader recomputes it and refuses
a mismatch. Nothing here unpickles: tensors come from safetensors, metadata from JSON.
Writing goes to a hidden sibling directory renamed into place, so a reader (or a crash)
never sees half an artifact. Replacing an existing artifact swaps the two directories in one
step where the kernel can (``renameat2(RENAME_EXCHANGE)``), so a crash leaves either the old or
the new artifact in place; a killed writer's hidden temporary directory is removed by the next
write to the same path.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from soapflow.errors import SoapError

SCHEMA_VERSION = 1
TENSORS_FILE = "soap.safetensors"
MANIFEST_FILE = "manifest.json"
TENSOR_NAMES = ("projector", "mean", "components", "eigenvalues", "scores", "weights", "p", "q")


def final_norm_of(attrs: dict) -> bool:
    """Whether a store's or a manifest's tokens come after the model's final norm. Stores and
    artifacts written before soapflow recorded it hold block outputs before the norm: no value
    reads as off."""
    return bool(attrs.get("final_norm", False))


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fit_tensors(fit) -> dict[str, np.ndarray]:
    """The arrays of a ``SoapFit`` under their artifact names and dtypes (SPEC §4)."""
    return {
        "projector": fit.projector.astype(np.float32),
        "mean": fit.mean.astype(np.float64),
        "components": fit.components.astype(np.float64),
        "eigenvalues": fit.eigenvalues.astype(np.float64),
        "scores": fit.scores.astype(np.float64),
        "weights": fit.weights.astype(np.float64),
        "p": fit.p.astype(np.float32),
        "q": fit.q.astype(np.float32),
    }


@dataclass
class Artifact:
    path: Path
    manifest: dict
    tensors: dict[str, np.ndarray]

    @property
    def projector(self) -> np.ndarray:
        return self.tensors["projector"]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]


def write_artifact(
    out_dir: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    manifest: dict,
    *,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write an artifact directory atomically and return its path.

    ``extra_files`` (relative path → bytes, e.g. plots) are written inside the same
    temporary directory so they appear together with the tensors.
    """
    out = Path(out_dir)
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise SoapError(f"artifact {out}: missing tensors {missing}")
    check_artifact_target(out, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temporaries(out)
        tmp.mkdir()
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / TENSORS_FILE))
        manifest = {
            "schema": SCHEMA_VERSION,
            **manifest,
            "content_hash": sha256_file(tmp / TENSORS_FILE),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for rel, data in (extra_files or {}).items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        _move_into_place(tmp, out, overwrite)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        detail = f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})" if exc.errno else str(exc)
        raise SoapError(f"artifact {out}: cannot write it: {detail}; nothing was left in its place") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_HOST = uuid.uuid5(uuid.NAMESPACE_DNS, socket.gethostname()).hex[:6]


def check_artifact_target(out: str | os.PathLike, overwrite: bool) -> None:
    """Refuse early (before any fitting) an output path that cannot take the artifact."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SoapError(f"artifact {out}: that path is a file; choose a directory for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SoapError(f"artifact directory {out} already exists and is not empty; pass --overwrite or choose another --out")


def _pid_gone(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OverflowError, PermissionError):
        return False
    return False


def _remove_dead_temporaries(out: Path) -> None:
    """Hidden ``.NAME.tmp-HOST-PID-*`` / ``.NAME.old-HOST-PID-*`` siblings of a killed writer."""
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    for path in siblings:
        for kind in ("tmp", "old"):
            prefix = f".{out.name}.{kind}-{_HOST}-"
            if path.name.startswith(prefix):
                pid = path.name[len(prefix):].split("-", 1)[0]
                if _pid_gone(pid):
                    shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    kernel, C library or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    for _ in range(100):  # concurrent writers of the same path: each attempt makes progress
        try:
            os.rename(tmp, out)  # out absent (or an empty directory): one atomic step
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if not overwrite:
            raise SoapError(f"artifact directory {out} appeared while this one was written; pass --overwrite or choose another --out")
        if _exchange(tmp, out):  # tmp now holds the old artifact
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = out.parent / f".{out.name}.old-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(out, trash)
        except FileNotFoundError:
            continue  # another writer moved it away first
        try:
            os.rename(tmp, out)
        except OSError:
            continue  # another writer put its artifact there first: replace it in turn
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    raise SoapError(f"artifact {out}: could not move it into place (too many concurrent writers)")


def read_manifest(path: str | os.PathLike) -> dict:
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise SoapError(f"artifact {path}: no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SoapError(f"artifact {path}: {MANIFEST_FILE} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise SoapError(f"artifact {path}: {MANIFEST_FILE} must hold a JSON object, not {type(manifest).__name__}")
    return manifest


def verify_artifact(path: str | os.PathLike) -> dict:
    """Check the tensors file against the manifest's sha256; return the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    tensors_path = path / TENSORS_FILE
    if not tensors_path.is_file():
        raise SoapError(f"artifact {path}: no {TENSORS_FILE}")
    actual = sha256_file(tensors_path)
    expected = manifest.get("content_hash")
    if actual != expected:
        raise SoapError(
            f"artifact {path}: {TENSORS_FILE} sha256 {actual[:16]}… does not match the manifest's "
            f"{str(expected)[:16]}…; the artifact is corrupt or was modified"
        )
    return manifest


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Load an artifact after verifying its content hash. Never unpickles."""
    path = Path(path)
    manifest = verify_artifact(path)
    try:
        tensors = load_file(str(path / TENSORS_FILE))
    except Exception as exc:  # safetensors' own error type: a header or size that does not parse
        raise SoapError(f"artifact {path}: {TENSORS_FILE} is not a readable safetensors file ({exc})") from None
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise SoapError(f"artifact {path}: {TENSORS_FILE} lacks tensors {missing}")
    return Artifact(path, manifest, tensors)
