"""Evaluation datasets: images with ground-truth masks, label maps or class labels.

``open_eval_data(spec, n=None)`` accepts

* ``fashion-mnist`` / ``fashion-mnist:test`` / ``fashion-mnist:train`` — the Debian package
  ``dataset-fashion-mnist`` via :mod:`soapflow.sources`; mask = pixel > 0, class labels 0–9,
  label map = background 0 / class + 1 (11 classes).
* a folder in one of the paired layouts below: images and masks (or label maps) matched by
  their path relative to the two sub-folders without the extension (so ``images/0001.jpg`` ↔
  ``ground_truth_mask/0001.png``). The layout may sit in the folder itself or in one sub-folder
  of it (``ECSSD/ECSSD/images``).

  ========================  ========================  ==========================  =========
  layout                    images                    targets                     kind
  ========================  ========================  ==========================  =========
  ECSSD                     ``images/``               ``ground_truth_mask/``      masks
  DUTS-TE                   ``DUTS-TE-Image/``        ``DUTS-TE-Mask/``           masks
  DUT-OMRON                 ``DUT-OMRON-image/``      ``pixelwiseGT-new-PNG/``    masks
  plain                     ``images/``               ``masks/``                  masks
  label maps                ``images/``               ``labels/``/``annotations/`` label maps
  ========================  ========================  ==========================  =========

  Masks: grey level > 127 is foreground. Label maps: integer PNGs, 255 = ignore.
* a folder of class sub-folders (``root/<class>/*.jpg``): class labels for kNN classification.

Every image goes through the same resize + centre crop as feature extraction
(:func:`soapflow.transforms.transform_image`); masks and label maps through the same geometry
with nearest-neighbour resampling, so pixels line up with the patch grid.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from soapflow.errors import SoapError
from soapflow.sources import IMAGE_EXTENSIONS, open_source
from soapflow.transforms import load_rgb, resize_center_crop, transform_image, transform_mask

__all__ = [
    "SALIENT_LAYOUTS",
    "LABEL_LAYOUTS",
    "EvalData",
    "open_eval_data",
    "detect_layout",
    "to_uint8",
]

#: (name, image folder, mask folder) — salient-segmentation layouts, checked in this order.
SALIENT_LAYOUTS = (
    ("ECSSD", "images", "ground_truth_mask"),
    ("DUTS-TE", "DUTS-TE-Image", "DUTS-TE-Mask"),
    ("DUT-OMRON", "DUT-OMRON-image", "pixelwiseGT-new-PNG"),
    ("images+masks", "images", "masks"),
)
#: (name, image folder, label-map folder) — semantic-segmentation layouts.
LABEL_LAYOUTS = (
    ("images+labels", "images", "labels"),
    ("images+annotations", "images", "annotations"),
)
MASK_EXTENSIONS = IMAGE_EXTENSIONS
IGNORE_INDEX = 255
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def to_uint8(batch: torch.Tensor, mean, std) -> np.ndarray:
    """Normalized images ``(B, 3, S, S)`` back to displayable uint8 ``(B, S, S, 3)``."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (batch.detach().float().cpu() * s + m).clamp(0, 1) * 255
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass
class EvalData:
    """An ordered evaluation set. Which targets exist depends on the kind:
    ``masks`` (salient), ``label maps`` (kNN segmentation; masks derive from them as label ≠ 0),
    ``labels`` (class labels, kNN classification)."""

    spec: str
    layout: str
    image_paths: list[str] | None = None
    target_paths: list[str] | None = None
    target_kind: str | None = None  # "mask" | "labelmap" | None
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    source: object = None  # a soapflow Source for array datasets
    unmatched: int = 0
    fingerprint: dict = field(default_factory=dict)

    def __len__(self) -> int:
        if self.source is not None:
            return len(self.source)
        return len(self.image_paths)

    # -- capabilities --------------------------------------------------------------------
    @property
    def has_masks(self) -> bool:
        return self.target_kind in ("mask", "labelmap") or self._is_fmnist

    @property
    def has_label_maps(self) -> bool:
        return self.target_kind == "labelmap" or (self._is_fmnist and self.labels is not None)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @property
    def _is_fmnist(self) -> bool:
        return self.layout == "fashion-mnist"

    @property
    def n_classes(self) -> int | None:
        """Number of class labels (kNN classification)."""
        if self.labels is None:
            return None
        return len(self.class_names) if self.class_names else int(self.labels.max()) + 1

    # -- images ----------------------------------------------------------------------------
    def batch(self, indices, image_size: int, mean, std) -> torch.Tensor:
        idx = [int(i) for i in indices]
        if self.source is not None:
            return self.source.batch(idx, image_size, mean, std)
        out = []
        for i in idx:
            path = self.image_paths[i]
            try:
                pil = load_rgb(path)
            except Exception as e:
                raise SoapError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
            out.append(transform_image(pil, image_size, mean, std))
        if not out:
            return torch.empty((0, 3, image_size, image_size))
        return torch.stack(out)

    # -- targets ---------------------------------------------------------------------------
    def _open_target(self, i: int) -> Image.Image:
        path = self.target_paths[i]
        try:
            im = Image.open(path)
            im.load()
        except Exception as e:
            raise SoapError(f"cannot read mask/label map {path}: {type(e).__name__}: {e}") from e
        return im

    def mask(self, i: int, image_size: int) -> np.ndarray:
        """Foreground mask ``(S, S)`` bool."""
        if self._is_fmnist:
            return self.source.mask(i, image_size)
        if self.target_kind == "mask":
            im = self._open_target(i)
            a = np.asarray(im.convert("L")) > 127
            return transform_mask(a, image_size)
        if self.target_kind == "labelmap":
            lm = self.label_map(i, image_size)
            return (lm != 0) & (lm != IGNORE_INDEX)
        raise SoapError(f"dataset {self.spec} has no masks (layout {self.layout})")

    def label_map(self, i: int, image_size: int) -> np.ndarray:
        """Pixel labels ``(S, S)`` int64 for kNN segmentation (255 = ignore)."""
        if self._is_fmnist:
            if self.labels is None:
                raise SoapError(f"dataset {self.spec} has no class labels for label maps")
            return self.source.mask(i, image_size).astype(np.int64) * (int(self.labels[i]) + 1)
        if self.target_kind != "labelmap":
            raise SoapError(
                f"dataset {self.spec} has no label maps (layout {self.layout}); kNN segmentation needs "
                "fashion-mnist or a folder with images/ + labels/ (or annotations/)"
            )
        im = self._open_target(i)
        if im.mode not in ("L", "P", "I", "I;16"):
            im = im.convert("L")
        a = np.asarray(im).astype(np.int64)
        pil = Image.fromarray(a.astype(np.int32), mode="I")
        return np.asarray(resize_center_crop(pil, image_size, Image.Resampling.NEAREST)).astype(np.int64)

    def masks(self, indices, image_size: int) -> np.ndarray:
        return np.stack([self.mask(int(i), image_size) for i in indices])

    def label_maps(self, indices, image_size: int) -> np.ndarray:
        return np.stack([self.label_map(int(i), image_size) for i in indices])

    def n_seg_classes(self, image_size: int, indices=None) -> int:
        """Classes of kNN segmentation: 11 for fashion-mnist, else max label + 1 over the data."""
        if self._is_fmnist:
            return 11
        idx = range(len(self)) if indices is None else indices
        top = 0
        for i in idx:
            lm = self.label_map(int(i), image_size)
            valid = lm[lm != IGNORE_INDEX]
            if valid.size:
                top = max(top, int(valid.max()))
        return top + 1

    def describe(self) -> dict:
        return {"spec": self.spec, "layout": self.layout, "count": len(self), "unmatched": self.unmatched,
                **({"fingerprint": self.fingerprint} if self.fingerprint else {})}


# ------------------------------------------------------------------------- folders


def _files_by_stem(folder: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(MASK_EXTENSIONS):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, folder).replace(os.sep, "/")
                out.setdefault(os.path.splitext(rel)[0], full)
    return out


def detect_layout(root: str) -> tuple[str, str, str, str] | None:
    """``(layout name, image folder, target folder, kind)`` found in ``root`` or in one of its
    direct sub-folders; None when no paired layout is there."""
    candidates = [root]
    try:
        subs = sorted(e.path for e in os.scandir(root) if e.is_dir())
    except OSError:
        subs = []
    candidates += subs
    for base in candidates:
        for name, img, tgt in SALIENT_LAYOUTS:
            if os.path.isdir(os.path.join(base, img)) and os.path.isdir(os.path.join(base, tgt)):
                return name, os.path.join(base, img), os.path.join(base, tgt), "mask"
        for name, img, tgt in LABEL_LAYOUTS:
            if os.path.isdir(os.path.join(base, img)) and os.path.isdir(os.path.join(base, tgt)):
                return name, os.path.join(base, img), os.path.join(base, tgt), "labelmap"
    return None


def _fingerprint(pairs: list[tuple[str, str]], root: str) -> dict:
    h = hashlib.sha256()
    for a, b in pairs:
        h.update(f"{os.path.relpath(a, root)}\t{os.path.getsize(a)}\t{os.path.relpath(b, root)}\t{os.path.getsize(b)}\n".encode())
    return {"root": root, "count": len(pairs), "sha256": h.hexdigest()}


def _open_paired(spec: str, root: str, layout, n: int | None) -> EvalData:
    name, img_dir, tgt_dir, kind = layout
    images = _files_by_stem(img_dir)
    targets = _files_by_stem(tgt_dir)
    stems = sorted(set(images) & set(targets))
    unmatched = len(set(images) - set(targets))
    if not stems:
        raise SoapError(
            f"dataset {root} (layout {name}): no image in {img_dir} has a {'mask' if kind == 'mask' else 'label map'} "
            f"with the same name in {tgt_dir} ({len(images)} images, {len(targets)} targets)"
        )
    if n is not None:
        stems = stems[:n]
    pairs = [(images[s], targets[s]) for s in stems]
    return EvalData(
        spec=spec, layout=name, image_paths=[a for a, _ in pairs], target_paths=[b for _, b in pairs],
        target_kind=kind, unmatched=unmatched, fingerprint=_fingerprint(pairs, root),
    )


def _open_class_folders(spec: str, root: str, n: int | None) -> EvalData | None:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        return None
    paths, labels = [], []
    for c, cls in enumerate(classes):
        for rel, full in sorted(_files_by_stem(os.path.join(root, cls)).items()):
            paths.append(full)
            labels.append(c)
    if not paths:
        return None
    if n is not None:  # interleave classes so a prefix is balanced
        order = np.lexsort((np.asarray(labels), _rank_within(labels)))[:n]
        order.sort()
        paths = [paths[i] for i in order]
        labels = [labels[i] for i in order]
    pairs = [(p, p) for p in paths]
    return EvalData(spec=spec, layout="class-folders", image_paths=paths, labels=np.asarray(labels, np.int64),
                    class_names=classes, fingerprint=_fingerprint(pairs, root))


def _rank_within(labels: list[int]) -> np.ndarray:
    seen: dict[int, int] = {}
    out = []
    for lab in labels:
        out.append(seen.get(lab, 0))
        seen[lab] = out[-1] + 1
    return np.asarray(out, dtype=np.float64)


def open_eval_data(spec: str, n: int | None = None) -> EvalData:
    """Open an evaluation dataset by spec (see the module doc)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise SoapError(f"dataset spec must be a non-empty string, got {spec!r}")
    if n is not None and (isinstance(n, bool) or int(n) < 1):
        raise SoapError(f"n must be a positive integer, got {n!r}")
    spec = spec.strip()
    low = spec.lower()
    if low == "fashion-mnist" or low.startswith("fashion-mnist:"):
        src = open_source(low if ":" in low else "fashion-mnist:test", n=n)
        return EvalData(spec=src.spec, layout="fashion-mnist", labels=np.asarray(src.labels), source=src,
                        class_names=list(FASHION_MNIST_CLASSES), fingerprint=src.fingerprint)
    root = os.path.abspath(os.path.expanduser(spec))
    if not os.path.isdir(root):
        raise SoapError(
            f"evaluation dataset {spec!r}: not fashion-mnist[:train|:test] and not a folder "
            f"({root} does not exist or is not a directory)"
        )
    layout = detect_layout(root)
    if layout is not None:
        return _open_paired(spec, root, layout, n)
    classes = _open_class_folders(spec, root, n)
    if classes is not None:
        return classes
    known = "; ".join(f"{i}/ + {t}/ ({name})" for name, i, t in SALIENT_LAYOUTS + LABEL_LAYOUTS)
    raise SoapError(
        f"dataset folder {root}: no known layout. Expected one of: {known}; or class sub-folders for kNN classification"
    )
