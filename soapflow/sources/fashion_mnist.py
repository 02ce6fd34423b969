"""``fashion-mnist[:test|:train]``: the idx files of the Debian package, with labels and masks."""

from __future__ import annotations

import gzip
import os
import struct
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from soapflow.errors import SoapError
from soapflow.sources.base import Source, _indices
from soapflow.transforms import transform_image, transform_mask
from soapflow.storage.artifact import sha256_file

#: Where the Debian package ``dataset-fashion-mnist`` puts its idx files;
#: ``SOAP_FASHION_MNIST_DIR`` overrides it.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class ArrayImageDataset(torch.utils.data.Dataset):
    """Item ``i`` of a uint8 ``(N, H, W)`` greyscale or ``(N, H, W, 3)`` array.  Picklable."""

    def __init__(self, images: np.ndarray, image_size, mean, std, interpolation="bicubic"):
        self.images = images
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = interpolation
        transform_image(Image.new("RGB", (1, 1)), 1, self.mean, self.std, interpolation)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self.images):
            raise IndexError(i)
        pil = Image.fromarray(np.ascontiguousarray(self.images[i])).convert("RGB")
        return transform_image(pil, self.image_size, self.mean, self.std, self.interpolation)


class ArraySource(Source):
    """In-memory greyscale images with labels and masks (fashion-mnist)."""

    def __init__(self, spec, images: np.ndarray, labels: np.ndarray | None, fingerprint: dict):
        super().__init__(spec, "files")
        self.images = images
        self.labels = labels
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.images)

    def dataset(self, image_size, mean, std, interpolation="bicubic"):
        return ArrayImageDataset(self.images, image_size, mean, std, interpolation)

    def mask(self, i: int, image_size: int) -> np.ndarray:
        (i,) = _indices([i], len(self))
        img = self.images[i]
        if img.ndim == 3:
            img = img.max(axis=-1)
        return transform_mask(img > 0, image_size)


_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_file(d: str, base: str) -> str | None:
    for name in (base, base + ".gz"):
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None


def _read_idx(path: str, expected_magic: int) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise SoapError(f"cannot read {path}: {e}") from e
    if len(data) < 8:
        raise SoapError(f"{path} is not an idx file (too short)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != expected_magic:
        raise SoapError(f"{path} is not an idx file with magic {expected_magic:#x} (got {magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    count = int(np.prod(dims))
    if body.size != count:
        raise SoapError(f"{path} is truncated or corrupt: expected {count} bytes of data, found {body.size}")
    return body.reshape(dims)


@lru_cache(maxsize=4)
def _load_fmnist(images_path: str, labels_path: str, _stamp: tuple):
    images = _read_idx(images_path, 0x00000803)
    labels = _read_idx(labels_path, 0x00000801).astype(np.int64)
    if len(images) != len(labels):
        raise SoapError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    return images, labels, sha256_file(images_path), sha256_file(labels_path)


def _open_fashion_mnist(spec: str, n: int | None, split: str | None) -> ArraySource:
    _, _, spec_split = spec.partition(":")
    spec_split = spec_split or None
    if spec_split and split and spec_split != split:
        raise SoapError(f"conflicting splits: spec {spec!r} says {spec_split!r} but split={split!r}")
    split = spec_split or split or "test"
    if split not in _FMNIST_FILES:
        raise SoapError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    d = os.environ.get("SOAP_FASHION_MNIST_DIR") or FASHION_MNIST_DIR
    img_base, lab_base = _FMNIST_FILES[split]
    ip, lp = _find_file(d, img_base), _find_file(d, lab_base)
    if ip is None or lp is None:
        raise SoapError(
            f"fashion-mnist is not installed (no {img_base}[.gz] / {lab_base}[.gz] in {d}); "
            "install it with `apt-get install dataset-fashion-mnist`"
        )
    stamp = tuple((os.path.getsize(p), os.path.getmtime(p)) for p in (ip, lp))
    images, labels, img_sha, lab_sha = _load_fmnist(ip, lp, stamp)
    total = len(images)
    if n is not None:
        images, labels = images[:n], labels[:n]
    fp = {
        "kind": "files",
        "source": "fashion-mnist",
        "spec": f"fashion-mnist:{split}",
        "split": split,
        "count": len(images),
        "total_in_split": total,
        "images_file": os.path.basename(ip),
        "images_sha256": img_sha,
        "labels_sha256": lab_sha,
    }
    if n is not None:
        fp["requested_n"] = n
        if n > total:
            fp["note"] = f"requested n={n} but the {split} split has only {total} images"
    return ArraySource(f"fashion-mnist:{split}", images, labels, fp)
