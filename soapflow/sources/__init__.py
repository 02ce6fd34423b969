"""Image sources for feature extraction: one catalog, one call.

``open_source(spec, *, n=None, seed=0, split=None) -> Source`` looks ``spec`` up in ``SOURCES``,
one entry per kind of source, tried in order:

* ``fashion-mnist``, ``fashion-mnist:test`` (default), ``fashion-mnist:train`` --
  the idx files of the Debian package ``dataset-fashion-mnist``; 28x28 greyscale
  with ``labels`` and foreground masks (pixel > 0).
* ``photos`` -- real photos available offline: those bundled inside the
  scikit-image wheel, scikit-learn's two sample images, and (when the Debian
  package ``opencv-doc`` is installed) OpenCV's sample photos.  Order: scikit-image,
  then scikit-learn, then opencv-doc, each by file name, so the first ``n`` do not
  depend on whether ``opencv-doc`` is installed.
* ``noise:<generator>`` (optionally ``noise:<generator>?key=value&key2=1,1,2``)
  -- synthetic images from ``noise_generators``; ``n`` is the image count.
* anything else -- a folder: every ``jpg/jpeg/png/webp/bmp/tif/tiff`` file under
  it (recursive, case-insensitive extension, sorted by relative POSIX path,
  symlinked sub-folders not followed).  A folder literally named ``photos`` must
  be given as ``./photos``.

Folder (and ``photos``) files go through a cheap parallel pre-scan (Pillow open,
``draft()`` for JPEG, ``load()``); corrupt, truncated, zero-byte, unidentifiable
and oversized (decompression-bomb) files are skipped and listed in
``Source.skipped`` with a reason.  With ``n``, the first ``n`` *usable* files are
taken and the scan stops there.  Decoding rules live in ``soapflow.transforms``;
``soapflow.sources.loader`` turns a source into chunks for extraction.

Adding a kind of source is one entry in ``SOURCES``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from soapflow import noise_generators
from soapflow.errors import SoapError
from soapflow.sources.base import IMAGE_EXTENSIONS, Source, _check_n
from soapflow.sources.fashion_mnist import (
    _FMNIST_FILES,
    FASHION_MNIST_DIR,
    ArrayImageDataset,
    ArraySource,
    _find_file,
    _open_fashion_mnist,
)
from soapflow.sources.files import FileImageDataset, FileSource, _open_folder, scan_images
from soapflow.sources.loader import (
    EncodedImageDataset,
    chunk_loader,
    decode_on_device,
    decoder_name,
    decodes_on_device,
)
from soapflow.sources.noise import NoiseDataset, NoiseSource
from soapflow.sources.photos import OPENCV_DOC_DATA, _open_photos, photo_entries
from soapflow.transforms import check_image, load_rgb, transform_image, transform_mask

__all__ = [
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_DIR",
    "OPENCV_DOC_DATA",
    "SOURCES",
    "SourceKind",
    "Source",
    "FileSource",
    "ArraySource",
    "NoiseSource",
    "open_source",
    "list_sources",
    "chunk_loader",
    "decoder_name",
    "decodes_on_device",
    "decode_on_device",
    "EncodedImageDataset",
    "FileImageDataset",
    "ArrayImageDataset",
    "NoiseDataset",
    "load_rgb",
    "transform_image",
    "transform_mask",
    "check_image",
    "scan_images",
]


@dataclass(frozen=True)
class SourceKind:
    """One kind of source: which specs it takes, how to open one, and its catalog entry."""

    matches: Callable[[str], bool]  # on the lower-cased spec
    open: Callable[..., Source]  # open(spec, n, seed, split)
    catalog: Callable[[], dict]  # list_sources' entry; cheap, no scans
    takes_split: bool = False


def _fashion_mnist_catalog() -> dict:
    d = os.environ.get("SOAP_FASHION_MNIST_DIR") or FASHION_MNIST_DIR
    ok = all(_find_file(d, b) for pair in _FMNIST_FILES.values() for b in pair)
    return {
        "spec": "fashion-mnist[:test|:train]",
        "available": ok,
        "description": "Fashion-MNIST 28x28 greyscale with labels and masks (test: 10000, train: 60000)",
        **({} if ok else {"hint": "apt-get install dataset-fashion-mnist"}),
    }


def _photos_catalog() -> dict:
    entries, counts = photo_entries()
    return {
        "spec": "photos",
        "available": bool(entries),
        "description": "real photos bundled offline (scikit-image, scikit-learn, opencv-doc)",
        "count": len(entries),
        "origins": counts,
    }


def _noise_catalog() -> dict:
    return {
        "spec": "noise:<generator>",
        "description": "synthetic images from noise_generators (needs n)",
        "available": True,
        "generators": sorted(noise_generators.GENERATORS),
    }


def _folder_catalog() -> dict:
    return {"spec": "<folder>", "available": True, "description": "every image file under a folder, recursively"}


#: Every kind of source, in the order ``open_source`` tries them (``folder`` takes any spec)
#: and ``list_sources`` lists them.
SOURCES: dict[str, SourceKind] = {
    "photos": SourceKind(
        lambda low: low == "photos", lambda spec, n, seed, split: _open_photos("photos", n), _photos_catalog,
    ),
    "fashion-mnist": SourceKind(
        lambda low: low == "fashion-mnist" or low.startswith("fashion-mnist:"),
        lambda spec, n, seed, split: _open_fashion_mnist(spec.lower(), n, split),
        _fashion_mnist_catalog,
        takes_split=True,
    ),
    "noise": SourceKind(
        lambda low: low.startswith("noise:"), lambda spec, n, seed, split: NoiseSource(spec, n, seed), _noise_catalog,
    ),
    "folder": SourceKind(
        lambda low: True, lambda spec, n, seed, split: _open_folder(spec, n), _folder_catalog,
    ),
}  # fmt: skip


def open_source(spec, *, n=None, seed=0, split=None) -> Source:
    """Open an image source by spec (see the module doc for the catalog)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise SoapError(f"image source spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    n = _check_n(n)
    low = spec.lower()
    kind = next(k for k in SOURCES.values() if k.matches(low))
    if split is not None and not kind.takes_split:
        raise SoapError(f"split={split!r} only applies to fashion-mnist, not to {spec!r}")
    return kind.open(spec, n, seed, split)


def list_sources() -> list[dict]:
    """The catalog: each kind of source with whether it is usable here (cheap; no scans)."""
    return [kind.catalog() for kind in SOURCES.values()]
