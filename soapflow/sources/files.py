"""Image files: a folder's images, pre-scanned in parallel; ``FileSource`` also backs ``photos``."""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image

from soapflow.errors import SoapError
from soapflow.sources.base import IMAGE_EXTENSIONS, Source, _n_threads
from soapflow.transforms import check_image, load_rgb, transform_image


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
