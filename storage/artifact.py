"""Projection artifacts (SPEC §4): a directory with ``soap.safetensors`` and ``manifest.json``.

The manifest carries the sha256 of the safetensors file; the reader recomputes it and refuses
a mismatch. Nothing here unpickles: tensors come from safetensors, metadata from JSON.
Writing goes to a hidden sibling directory renamed into place, so a reader (or a crash)
never sees half an artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
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
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SoapError(f"artifact directory {out} already exists and is not empty; pass --overwrite or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
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
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | os.PathLike) -> dict:
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise SoapError(f"artifact {path}: no {MANIFEST_FILE}")
    try:
        return json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise SoapError(f"artifact {path}: {MANIFEST_FILE} is not valid JSON ({exc})") from None


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
    tensors = load_file(str(path / TENSORS_FILE))
    missing = [name for name in TENSOR_NAMES if name not in tensors]
    if missing:
        raise SoapError(f"artifact {path}: {TENSORS_FILE} lacks tensors {missing}")
    return Artifact(path, manifest, tensors)
