"""Image sources for feature extraction: one catalog, one call.

``open_source(spec, *, n=None, seed=0, split=None) -> Source`` where ``spec`` is

* ``photos`` -- real photos available offline: those bundled inside the
  scikit-image wheel, scikit-learn's two sample images, and (when the Debian
  package ``opencv-doc`` is installed) OpenCV's sample photos.  Order: scikit-image,
  then scikit-learn, then opencv-doc, each by file name, so the first ``n`` do not
  depend on whether ``opencv-doc`` is installed.
* ``fashion-mnist``, ``fashion-mnist:test`` (default), ``fashion-mnist:train`` --
  the idx files of the Debian package ``dataset-fashion-mnist``; 28x28 greyscale
  with ``labels`` and foreground masks (pixel > 0).
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
taken and the scan stops there.  Decoding rules live in ``soapflow.transforms``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import struct
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from soapflow.errors import SoapError
from storage.artifact import sha256_file
from soapflow.transforms import (
    TENSOR_INTERPOLATIONS,
    check_image,
    load_rgb,
    open_image,
    pixel_limit,
    transform_image,
    transform_mask,
    transform_pixels,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "FASHION_MNIST_DIR",
    "Source",
    "FileSource",
    "ArraySource",
    "NoiseSource",
    "open_source",
    "list_sources",
    "chunk_loader",
    "load_rgb",
    "transform_image",
    "transform_mask",
    "check_image",
    "scan_images",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

#: Where the Debian package ``dataset-fashion-mnist`` puts its idx files;
#: ``SOAP_FASHION_MNIST_DIR`` overrides it.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
OPENCV_DOC_DATA = "/usr/share/doc/opencv-doc/examples/data"

# Photos inside the scikit-image wheel (the pooch-fetched ones are not used).
# Left out: synthetic or drawn images (chessboard_*, color, horse, logo, phantom,
# multipage*.tif, the gif) and motorcycle_right (stereo partner of the left view).
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png",
    "clock_motion.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
    "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# opencv-doc sample files that are not photos (logos, drawings, renders, a
# painting, masks/templates, text or digit sheets, a disparity map) ...
OPENCV_NON_PHOTOS = frozenset(
    """LinuxLogo.jpg WindowsLogo.jpg opencv-logo.png opencv-logo-white.png
    HappyFish.jpg Blender_Suzanne1.jpg Blender_Suzanne2.jpg aloeGT.png blox.jpg
    cards.png chessboard.png detect_blob.png digits.png ellipses.jpg gradient.png
    imageTextN.png imageTextR.png mask.png ml.png notes.png pic1.png pic2.png
    pic3.png pic4.png pic5.png pic6.png starry_night.jpg templ.png tmpl.png""".split()
)
# ... and near-duplicates: the second view of stereo / optical-flow / tampering
# pairs, and the chessboard calibration series (left01..right14).
OPENCV_NEAR_DUPLICATES = frozenset(
    "aloeR.jpg right.jpg basketball2.png rubberwhale2.png ela_modified.jpg "
    "leuvenB.jpg graf3.png".split()
)
_OPENCV_CALIBRATION = re.compile(r"^(left|right)\d\d\.jpg$", re.IGNORECASE)
MIN_PHOTO_SIDE = 64


# ----------------------------------------------------------------------- helpers


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


def scan_images(paths: Sequence[str], *, stop_after: int | None = None):
    """Pre-scan ``paths`` in order with ``check_image`` (threaded).

    Returns ``(usable_positions, skipped, scanned)``: positions (into ``paths``)
    of usable files, ``[{"path", "reason"}]`` for rejected ones, and how many
    files were looked at (fewer than ``len(paths)`` when ``stop_after`` usable
    files were found first).
    """
    usable: list[int] = []
    skipped: list[dict] = []
    pos = 0
    total = len(paths)
    workers = _n_threads(total)
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 and total > 2 else None
    # Pillow warns (on stderr) about images between its limit and twice that; check_image
    # rejects them with a reason of its own, so the warning would only be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            while pos < total and (stop_after is None or len(usable) < stop_after):
                if stop_after is None:
                    end = min(total, pos + 4096)  # bounded blocks: no million pending futures
                else:
                    end = min(total, pos + max(2 * (stop_after - len(usable)), 4 * workers))
                block = paths[pos:end]
                results = pool.map(check_image, block) if pool is not None else map(check_image, block)
                for k, reason in enumerate(results):
                    if stop_after is not None and len(usable) >= stop_after:
                        end = pos + k
                        break
                    if reason is None:
                        usable.append(pos + k)
                    else:
                        skipped.append({"path": block[k], "reason": reason})
                pos = end
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    return usable, skipped, pos


# ------------------------------------------------------------------------ Source


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


# ------------------------------------------------------------------ file sources


class FileImageDataset(torch.utils.data.Dataset):
    """Decodes ``paths[i]`` with ``load_rgb`` and transforms it.  Picklable."""

    def __init__(self, paths, image_size, mean, std, interpolation="bicubic"):
        self.paths = list(paths)
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = interpolation
        transform_image(Image.new("RGB", (1, 1)), 1, self.mean, self.std, interpolation)  # validate

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self.paths):
            raise IndexError(i)
        path = self.paths[i]
        try:
            pil = load_rgb(path)
        except Exception as e:
            raise SoapError(
                f"could not decode {path} at load time although it passed the pre-scan "
                f"({type(e).__name__}: {e}); was it changed while the run was going?"
            ) from e
        return transform_image(pil, self.image_size, self.mean, self.std, self.interpolation)


class EncodedImageDataset(torch.utils.data.Dataset):
    """``FileImageDataset`` for decoding on the device: a plain JPEG (RGB or grey, upright, within
    the pixel limit) comes back as its file's ``bytes``, for ``decode_on_device``; any other file
    is decoded and transformed here, by ``files``' rules.  Picklable.  (Bytes, not tensors: a
    DataLoader worker sends a chunk of them in one pickle, where every tensor would take a
    shared-memory segment of its own, 5x slower: ~3k img/s from one worker.)"""

    def __init__(self, files: FileImageDataset):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> bytes | torch.Tensor:
        path = self.files.paths[i]
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                data = f.read()
            if _plain_jpeg(data):
                return data
        return self.files[i]  # the rules of load_rgb, and its error naming the file


def _plain_jpeg(data: bytes) -> bool:
    """Whether a GPU JPEG decoder gives what ``load_rgb`` would: no CMYK, no EXIF rotation."""
    if data[:3] != b"\xff\xd8\xff":
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            return (im.format == "JPEG" and im.mode in ("RGB", "L")
                    and im.width * im.height <= pixel_limit() and im.getexif().get(0x0112, 1) == 1)
    except Exception:  # noqa: BLE001 — anything odd goes the Pillow way, which names the error
        return False


def decode_on_device(items: list[bytes | torch.Tensor], paths: list[str], size: int, mean, std,
                     interpolation: str, device) -> torch.Tensor:
    """A chunk from ``EncodedImageDataset``: JPEG bytes decoded in one batch on ``device``
    (nvJPEG on CUDA) and transformed there; the images decoded in the workers join them."""
    out = [None if isinstance(x, bytes) else x.to(device) for x in items]
    at = [k for k, x in enumerate(out) if x is None]
    if at:
        data = [torch.frombuffer(bytearray(items[k]), dtype=torch.uint8) for k in at]
        try:
            pixels = _decode_jpegs(data, device)
        except RuntimeError:
            pixels = []
            for k, one in zip(at, data):  # find the file to name
                try:
                    pixels += _decode_jpegs([one], device)
                except RuntimeError as e:
                    raise SoapError(f"could not decode {paths[k]} on {device} although it passed the pre-scan "
                                    f"({e}); was it changed while the run was going?") from None
        by_size: dict[tuple, list[int]] = {}  # images of one size are transformed as one batch
        for j, img in enumerate(pixels):
            by_size.setdefault(tuple(img.shape), []).append(j)
        for js in by_size.values():
            batch = transform_pixels(torch.stack([pixels[j] for j in js]), size, mean, std, interpolation)
            for j, x in zip(js, batch):
                out[at[j]] = x
    return torch.stack(out)


def _decode_jpegs(data: list[torch.Tensor], device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 points to TorchCodec for decoding; its decode_jpeg is still the CUDA
        # batch decoder (nvJPEG) this path needs, and TorchCodec is not a dependency
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


class FileSource(Source):
    """Images read from files: a folder, or the bundled ``photos``."""

    def __init__(self, spec, root, entries, *, n=None, origin="folder", extra=None):
        """``entries``: ordered ``[(relative name, absolute path)]`` candidates."""
        super().__init__(spec, "files")
        paths = [p for _, p in entries]
        usable, skipped, scanned = scan_images(paths, stop_after=n)
        self.skipped = skipped
        self.paths = [paths[k] for k in usable]
        self.relpaths = [entries[k][0] for k in usable]
        if not self.paths:
            detail = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
            more = f" (and {len(skipped) - 3} more)" if len(skipped) > 3 else ""
            raise SoapError(
                f"no usable images in {root}: all {len(skipped)} image files were skipped: {detail}{more}"
            )
        sizes = [os.path.getsize(p) for p in self.paths]
        h = hashlib.sha256()
        for rel, size in zip(self.relpaths, sizes):
            h.update(f"{rel}\t{size}\n".encode())
        fp = {
            "kind": "files",
            "source": origin,
            "spec": spec,
            "root": root,
            "count": len(self.paths),
            "sha256": h.hexdigest(),
            "candidates": len(entries),
            "scanned": scanned,
            "skipped": len(skipped),
        }
        if n is not None:
            fp["requested_n"] = n
            if len(self.paths) < n:
                fp["note"] = f"requested n={n} but only {len(self.paths)} usable images exist"
        if extra:
            fp.update(extra)
        self._fingerprint = fp

    def __len__(self) -> int:
        return len(self.paths)

    def dataset(self, image_size, mean, std, interpolation="bicubic"):
        return FileImageDataset(self.paths, image_size, mean, std, interpolation)


def _list_folder(root: str) -> tuple[list[tuple[str, str]], list[dict]]:
    errors: list[dict] = []

    def onerror(e: OSError):
        errors.append({"path": e.filename or root, "reason": f"unreadable directory: {e.strerror or e}"})

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                found.append((rel, full))
    found.sort(key=lambda e: e[0])
    return found, errors


def _open_folder(spec: str, n: int | None) -> FileSource:
    root = os.path.abspath(os.path.expanduser(spec))
    if not os.path.exists(root):
        raise SoapError(
            f"image folder {root} does not exist (named sources: photos, fashion-mnist[:train|:test], noise:<generator>)"
        )
    if not os.path.isdir(root):
        raise SoapError(f"{root} is not a folder; give the folder that contains the images")
    entries, dir_errors = _list_folder(root)
    if not entries:
        if dir_errors:
            raise SoapError(f"no images found in folder {root} ({dir_errors[0]['reason']}: {dir_errors[0]['path']})")
        what = "is empty" if not os.listdir(root) else "contains no image files"
        raise SoapError(f"folder {root} {what} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)")
    src = FileSource(spec, root, entries, n=n, origin="folder")
    if dir_errors:
        src.skipped = dir_errors + src.skipped
        src._fingerprint["skipped"] = len(src.skipped)
    return src


# ------------------------------------------------------------------------ photos


def _package_dir(module: str, *sub: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], *sub)
    return d if os.path.isdir(d) else None


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _opencv_photos(data_dir: str | None = None) -> list[tuple[str, str]]:
    data_dir = OPENCV_DOC_DATA if data_dir is None else data_dir
    if not os.path.isdir(data_dir):
        return []
    out = []
    for name in sorted(os.listdir(data_dir)):
        base = name[:-3] if name.lower().endswith(".gz") else name
        if not base.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if base in OPENCV_NON_PHOTOS or base in OPENCV_NEAR_DUPLICATES or _OPENCV_CALIBRATION.match(base):
            continue
        path = os.path.join(data_dir, name)
        try:  # header only: drop icons
            with open_image(path) as im:
                if min(im.size) < MIN_PHOTO_SIDE:
                    continue
        except Exception:
            pass  # keep it; the pre-scan will list it as skipped with a reason
        out.append((f"opencv-doc/{base}", path))
    return out


def photo_entries() -> tuple[list[tuple[str, str]], dict]:
    """Ordered ``[(name, path)]`` of the offline photos, and counts per origin."""
    entries: list[tuple[str, str]] = []
    counts = {}
    sk = _package_dir("skimage", "data")
    got = [(f"scikit-image/{f}", os.path.join(sk, f)) for f in SKIMAGE_PHOTOS if sk and os.path.isfile(os.path.join(sk, f))]
    counts["scikit-image"] = len(got)
    entries += got
    sl = _package_dir("sklearn", "datasets", "images")
    got = [(f"scikit-learn/{f}", os.path.join(sl, f)) for f in SKLEARN_PHOTOS if sl and os.path.isfile(os.path.join(sl, f))]
    counts["scikit-learn"] = len(got)
    entries += got
    got = _opencv_photos()
    counts["opencv-doc"] = len(got)
    entries += got
    return entries, counts


def _open_photos(spec: str, n: int | None) -> FileSource:
    entries, counts = photo_entries()
    if not entries:
        raise SoapError(
            "no offline photos found: install scikit-image / scikit-learn "
            "(or `apt-get install opencv-doc`) to use the `photos` source"
        )
    extra = {
        "origins": counts,
        "versions": {
            "scikit-image": _dist_version("scikit-image"),
            "scikit-learn": _dist_version("scikit-learn"),
            "opencv-doc": counts["opencv-doc"] > 0,
        },
    }
    return FileSource(spec, "photos", entries, n=n, origin="photos", extra=extra)


# ----------------------------------------------------------------- fashion-mnist


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


# ------------------------------------------------------------------------- noise


def _noise_module():
    try:
        return importlib.import_module("noise_generators")
    except ImportError as e:
        raise SoapError(f"noise sources need the noise_generators package, which failed to import: {e}") from e


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def _parse_noise_spec(spec: str) -> tuple[str, dict]:
    body = spec[len("noise:") :]
    name, _, query = body.partition("?")
    name = name.strip()
    if not name:
        raise SoapError(f"noise source {spec!r} names no generator; use noise:<generator>, e.g. noise:pink")
    params = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SoapError(f"bad noise parameter {part!r} in {spec!r}; use noise:{name}?key=value&key2=1,2,3")
        values = [_parse_value(v.strip()) for v in value.split(",")]
        params[key.strip()] = values[0] if len(values) == 1 else values
    return name, params


class NoiseDataset(torch.utils.data.Dataset):
    """Item ``i`` = ``noise_generators.generate(name, 1, size, start=i, ...)[0]`` on CPU."""

    def __init__(self, name, params, seed, count, image_size, mean, std):
        self.name, self.params, self.seed, self.count = name, dict(params), int(seed), int(count)
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self.generate(i, 1, "cpu")[0]

    def generate(self, start: int, count: int, device) -> torch.Tensor:
        ng = _noise_module()
        x = ng.generate(
            self.name, count, self.image_size, seed=self.seed, start=start, device=device,
            mean=self.mean, std=self.std, **self.params,
        )  # fmt: skip
        return x.to(torch.float32)


class NoiseSource(Source):
    def __init__(self, spec: str, n: int | None, seed: int):
        super().__init__(spec, "noise")
        if n is None:
            raise SoapError(f"noise source {spec!r} needs n (how many images to generate)")
        name, params = _parse_noise_spec(spec)
        ng = _noise_module()
        try:
            resolved = ng.generator_params(name, **params)
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            raise SoapError(f"noise source {spec!r}: {msg}") from e
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise SoapError(f"seed must be an integer, got {seed!r}")
        self.generator = name
        self.params = params
        self.seed = int(seed)
        self.count = n
        self._fingerprint = {
            "kind": "noise",
            "spec": spec,
            "generator": name,
            "params": _jsonable(resolved),
            "seed": self.seed,
            "count": n,
        }

    def __len__(self) -> int:
        return self.count

    def dataset(self, image_size, mean, std, interpolation="bicubic"):
        return NoiseDataset(self.generator, self.params, self.seed, self.count, image_size, mean, std)

    def batch(self, indices, image_size, mean, std, device="cpu") -> torch.Tensor:
        idx = _indices(indices, len(self))
        ds = self.dataset(image_size, mean, std)
        if not idx:
            return torch.empty((0, 3, image_size, image_size), dtype=torch.float32, device=device)
        # One generate() call per contiguous run of the sorted, de-duplicated indices,
        # then reorder: the same index set gives the same tensors whatever its order.
        uniq = sorted(set(idx))
        parts, run_start, prev = [], uniq[0], uniq[0]
        for i in uniq[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            parts.append(ds.generate(run_start, prev - run_start + 1, device))
            if i is not None:
                run_start = prev = i
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if idx != uniq:
            pos = {v: k for k, v in enumerate(uniq)}
            out = out[torch.tensor([pos[i] for i in idx], device=out.device)]
        return out


# ----------------------------------------------------------------------- catalog


def open_source(spec, *, n=None, seed=0, split=None) -> Source:
    """Open an image source by spec (see the module doc for the catalog)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise SoapError(f"image source spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    n = _check_n(n)
    low = spec.lower()
    if low == "fashion-mnist" or low.startswith("fashion-mnist:"):
        return _open_fashion_mnist(low, n, split)
    if split is not None:
        raise SoapError(f"split={split!r} only applies to fashion-mnist, not to {spec!r}")
    if low == "photos":
        return _open_photos("photos", n)
    if low.startswith("noise:"):
        return NoiseSource(spec, n, seed)
    return _open_folder(spec, n)


def list_sources() -> list[dict]:
    """The catalog: each named source with whether it is usable here (cheap; no scans)."""
    entries, counts = photo_entries()
    fm_dir = os.environ.get("SOAP_FASHION_MNIST_DIR") or FASHION_MNIST_DIR
    fm_ok = all(_find_file(fm_dir, b) for pair in _FMNIST_FILES.values() for b in pair)
    out = [
        {
            "spec": "photos",
            "available": bool(entries),
            "description": "real photos bundled offline (scikit-image, scikit-learn, opencv-doc)",
            "count": len(entries),
            "origins": counts,
        },
        {
            "spec": "fashion-mnist[:test|:train]",
            "available": fm_ok,
            "description": "Fashion-MNIST 28x28 greyscale with labels and masks (test: 10000, train: 60000)",
            **({} if fm_ok else {"hint": "apt-get install dataset-fashion-mnist"}),
        },
    ]
    noise = {"spec": "noise:<generator>", "description": "synthetic images from noise_generators (needs n)"}
    try:
        ng = importlib.import_module("noise_generators")
        names = None
        for attr in ("available_generators", "list_generators", "generator_names", "GENERATORS"):
            obj = getattr(ng, attr, None)
            if obj is not None:
                names = obj() if callable(obj) else obj
                break
        noise["available"] = hasattr(ng, "generate")
        if names is not None:
            noise["generators"] = sorted(names)
    except ImportError:
        noise["available"] = False
    out.append(noise)
    out.append({"spec": "<folder>", "available": True, "description": "every image file under a folder, recursively"})
    return out


# ------------------------------------------------------------------ chunk loader


def decodes_on_device(source: Source, device, interpolation: str) -> bool:
    """Whether ``chunk_loader`` decodes ``source``'s JPEGs on ``device`` by default: image files on
    CUDA (nvJPEG), when the resize is one torch does on tensors."""
    return (isinstance(source, FileSource) and torch.device(device).type == "cuda"
            and interpolation in TENSOR_INTERPOLATIONS)


def decoder_name(source: Source, device, interpolation: str) -> str | None:
    """What decodes ``source``'s files in ``chunk_loader`` (a store's ``decoded_by``): "pillow",
    or "decode_jpeg:cuda" (torchvision's on that device type: nvJPEG; files other than plain
    JPEGs still go to Pillow); None for sources that are not files."""
    if not isinstance(source, FileSource):
        return None
    return f"decode_jpeg:{torch.device(device).type}" if decodes_on_device(source, device, interpolation) else "pillow"


def _start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)``, which forks its worker processes, called from a plain thread of its own.
    Workers forked from a ThreadPoolExecutor's thread (Prefect's task threads, for one) exit with
    code 1 (in the child, concurrent.futures' exit hook joins that very thread), which torch's
    SIGCHLD handler, once any DataLoader in the main thread has installed it, raises in the main
    thread as a crashed worker."""
    started: dict = {}

    def start():
        try:
            started["it"] = iter(loader)
        except BaseException as e:  # noqa: BLE001 — raised below, in the caller's thread
            started["error"] = e

    thread = threading.Thread(target=start, name="dataloader-start")
    thread.start()
    thread.join()
    if "error" in started:
        raise started["error"]
    return started["it"]


def _clean_worker_error(e: SoapError) -> SoapError:
    """DataLoader re-raises worker errors with the traceback in the message; keep the last line."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else str(e)
    prefix = "soapflow.errors.SoapError: "
    return SoapError(last[len(prefix) :] if last.startswith(prefix) else last)


def chunk_loader(
    source: Source,
    chunks: Sequence[range],
    image_size: int,
    mean,
    std,
    num_workers: int = 0,
    *,
    device="cpu",
    interpolation: str = "bicubic",
    device_lock=contextlib.nullcontext(),
    device_decode: bool | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(chunk_index, images)`` for each range in ``chunks``, in order.

    File sources decode in ``num_workers`` DataLoader worker processes, one loader
    batch per chunk (tensors come back on CPU).  Noise sources generate each chunk
    directly on ``device``, holding ``device_lock``: that is device work, and on a CPU
    it would otherwise fight a concurrent forward pass for the cores (OpenMP teams stall
    when oversubscribed).  With ``device_decode`` (default: on CUDA), the workers only read
    files and JPEGs are decoded and resized on ``device``, under ``device_lock``: a GPU then
    keeps the CPU from being the bottleneck (other files are still decoded in the workers).
    Empty ranges yield an empty ``(0, 3, S, S)`` tensor.
    """
    chunks = [range(c.start, c.stop, c.step) if isinstance(c, range) else c for c in chunks]
    n = len(source)
    for ci, c in enumerate(chunks):
        if len(c) and (min(c) < 0 or max(c) >= n):
            raise SoapError(f"chunk {ci} ({c}) is outside the source's {n} images")
    empty = lambda: torch.empty((0, 3, image_size, image_size), dtype=torch.float32)  # noqa: E731
    if source.kind == "noise":
        for ci, c in enumerate(chunks):
            with device_lock:
                x = source.batch(c, image_size, mean, std, device=device) if len(c) else empty().to(device)
            yield ci, x
        return
    dataset = source.dataset(image_size, mean, std, interpolation)
    if device_decode is None:  # on CUDA, for image files
        device_decode = decodes_on_device(source, device, interpolation) and isinstance(dataset, FileImageDataset)
    if device_decode:
        if not isinstance(dataset, FileImageDataset):
            raise SoapError(f"source {source.spec} has no image files to decode on the device")
        if interpolation not in TENSOR_INTERPOLATIONS:
            raise SoapError(f"decoding on the device resizes with {TENSOR_INTERPOLATIONS}, not {interpolation!r}")
        dataset = EncodedImageDataset(dataset)
    num_workers = max(0, int(num_workers))
    batches = [list(c) for c in chunks if len(c)]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        collate_fn=list if device_decode else None,  # bytes of different lengths
        # pinned batches go to a GPU asynchronously, while it runs the previous chunk
        pin_memory=torch.device(device).type == "cuda" and not device_decode,
    )
    it = _start_workers(loader) if num_workers > 0 else iter(loader)
    try:
        for ci, c in enumerate(chunks):
            if not len(c):
                yield ci, empty()
                continue
            try:
                x = next(it)
            except SoapError as e:
                raise _clean_worker_error(e) from e
            if device_decode:
                with device_lock:
                    x = decode_on_device(x, [source.paths[i] for i in c], image_size, mean, std,
                                         interpolation, device)
            yield ci, x
    finally:
        # Stop the worker processes now: an exception's traceback (or a consumer that
        # stops early) would otherwise keep the iterator, and its workers, alive.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del it
