"""What every source shares: the ``Source`` interface and the small checks its subclasses use."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from soapflow.errors import SoapError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def _jsonable(obj):
    """Deep-convert to plain JSON types (tuples -> lists, numpy scalars -> python)."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, torch.Tensor):
            return o.tolist()
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        return str(o)

    return json.loads(json.dumps(obj, default=default, sort_keys=True))


def _check_n(n) -> int | None:
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
        raise SoapError(f"n must be a positive integer, got {n!r}")
    return int(n)


def _indices(indices, length: int) -> list[int]:
    if isinstance(indices, (torch.Tensor, np.ndarray)):
        seq = indices.reshape(-1).tolist()
    else:
        seq = list(indices)
    out = [int(i) for i in seq]
    for i in out:
        if not 0 <= i < length:
            raise IndexError(f"image index {i} out of range for a source of {length} images")
    return out


def _n_threads(count: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, count))


class Source:
    """A fixed, ordered list of images (see module doc).  Subclasses fill it in.

    Attributes: ``spec``, ``kind`` ("files" or "noise"), ``skipped``, ``labels``,
    ``paths``; ``fingerprint`` is a JSON-able provenance dict.
    """

    spec: str
    kind: str
    skipped: list[dict]
    labels: np.ndarray | None
    paths: list[str] | None

    def __init__(self, spec: str, kind: str):
        self.spec = spec
        self.kind = kind
        self.skipped = []
        self.labels = None
        self.paths = None
        self._fingerprint: dict = {}

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def fingerprint(self) -> dict:
        return _jsonable(self._fingerprint)

    def dataset(self, image_size, mean, std, interpolation="bicubic") -> torch.utils.data.Dataset:
        raise NotImplementedError  # pragma: no cover

    def batch(self, indices, image_size, mean, std, device="cpu") -> torch.Tensor:
        idx = _indices(indices, len(self))
        ds = self.dataset(image_size, mean, std)
        if not idx:
            return torch.empty((0, 3, image_size, image_size), dtype=torch.float32, device=device)
        workers = _n_threads(len(idx))
        if workers > 1 and len(idx) >= 4:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                items = list(pool.map(ds.__getitem__, idx))
        else:
            items = [ds[i] for i in idx]
        return torch.stack(items).to(device)

    def mask(self, i: int, image_size: int) -> np.ndarray | None:
        _indices([i], len(self))
        return None

    def __repr__(self) -> str:
        extra = f", skipped={len(self.skipped)}" if self.skipped else ""
        return f"<{type(self).__name__} {self.spec!r} kind={self.kind} n={len(self)}{extra}>"
