"""Decoding any image file to RGB, and the one image transform used for features.

Conversion rules (``to_rgb`` / ``load_rgb``):

* ``RGB`` is kept; ``L`` and ``1`` (bilevel) are replicated to three channels.
* Alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``, a palette or
  grey/RGB image with a ``transparency`` entry) is **composited on white**, so a
  transparent background becomes white rather than whatever colour happens to be
  stored under alpha 0.
* ``CMYK`` goes through its embedded ICC profile to sRGB when there is one (and
  LittleCMS is available), else through Pillow's plain CMYK->RGB formula.
* 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) is **scaled**
  to 8 bits, ``v8 = round(v16 * 255 / 65535)`` (so 65535 -> 255, 257*k -> k),
  never clipped.  32-bit ``I`` is treated the same when its values lie in
  0..65535, otherwise min-max stretched; float ``F`` is multiplied by 255 when it
  lies in [0, 1], otherwise min-max stretched.
* The EXIF orientation tag is applied (a phone photo taken upright comes out
  upright); a broken EXIF block is ignored.
* Multi-frame files (TIFF pages, animated WebP) contribute their first frame.
* ``*.gz`` files are decompressed in memory first (Debian gzips some docs).

Transform (``transform_image``): resize the shorter side to ``S`` (antialiased,
chosen interpolation, Pillow resampling), center-crop ``S x S`` with the same
rounding as ``torchvision.transforms.Resize(S) + CenterCrop(S)``, scale to
[0, 1], then ``(x - mean) / std`` per channel.  ``transform_mask`` applies the
same geometry with nearest-neighbour interpolation.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from soapflow.errors import SoapError

__all__ = [
    "MAX_IMAGE_PIXELS",
    "INTERPOLATIONS",
    "pixel_limit",
    "open_image",
    "to_rgb",
    "load_rgb",
    "check_image",
    "resize_center_crop",
    "transform_image",
    "transform_pixels",
    "transform_mask",
]

#: Images with more pixels than this are refused (a decompression-bomb guard that
#: holds even if some other library set ``PIL.Image.MAX_IMAGE_PIXELS = None``).
#: Same value as Pillow's default warning threshold (~ 9459 x 9459).
MAX_IMAGE_PIXELS = 89_478_485

#: A ``.gz`` image may decompress to at most this many bytes.
MAX_GZ_BYTES = 512 * 1024 * 1024

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def pixel_limit() -> int:
    """The effective pixel limit: ours, or Pillow's if someone lowered it."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    if pil_limit is None:
        return MAX_IMAGE_PIXELS
    return min(MAX_IMAGE_PIXELS, int(pil_limit))


class ImageRejected(Exception):
    """An image that opened but must not be decoded (too large)."""


def _read_gz(path: str) -> bytes:
    with gzip.open(path, "rb") as f:
        data = f.read(MAX_GZ_BYTES + 1)
    if len(data) > MAX_GZ_BYTES:
        raise ImageRejected(f"decompresses to more than {MAX_GZ_BYTES} bytes")
    return data


def open_image(path: str | os.PathLike, fp=None) -> Image.Image:
    """``Image.open`` with the pixel guard applied before anything is decoded.

    ``fp`` may be an open binary file for ``path``; ``*.gz`` paths are decompressed
    into memory.  Raises ``ImageRejected`` for images over ``pixel_limit()``;
    Pillow's own ``DecompressionBombError`` (over twice its limit) propagates.
    """
    path = os.fspath(path)
    if path.lower().endswith(".gz"):
        fp = io.BytesIO(_read_gz(path))
    im = Image.open(fp if fp is not None else path)
    w, h = im.size
    limit = pixel_limit()
    if w * h > limit:
        im.close()
        raise ImageRejected(
            f"decompression bomb guard: {w}x{h} = {w * h} pixels exceeds the limit of {limit}"
        )
    return im


def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _scale16(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _stretch(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(a.shape, np.uint8)
    return np.clip(np.floor((a - lo) * (255.0 / (hi - lo)) + 0.5), 0, 255).astype(np.uint8)


def _grey_array_to_rgb(a8: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(a8, dtype=np.uint8)).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded Pillow image of any mode to 8-bit RGB (rules in the module doc)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    ):
        return _composite_on_white(im)
    if mode in ("L", "P", "1", "RGBX", "YCbCr"):
        return im.convert("RGB")
    if mode == "CMYK":
        icc = im.info.get("icc_profile")
        if icc:
            try:
                from PIL import ImageCms

                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                dst = ImageCms.createProfile("sRGB")
                out = ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
                if out is not None:
                    return out
            except Exception:  # broken/unsupported profile: fall back to the formula
                pass
        return im.convert("RGB")
    if mode.startswith("I;16"):
        return _grey_array_to_rgb(_scale16(np.asarray(im)))
    if mode == "I":
        a = np.asarray(im)
        if a.size and a.min() >= 0 and a.max() <= 65535:
            return _grey_array_to_rgb(_scale16(a))
        return _grey_array_to_rgb(_stretch(a))
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if a.size and np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0:
            return _grey_array_to_rgb(np.floor(a * 255.0 + 0.5).astype(np.uint8))
        return _grey_array_to_rgb(_stretch(a))
    # Anything else Pillow knows how to convert (e.g. "HSV"); raises if it cannot.
    return im.convert("RGB")


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
        return im if out is None else out
    except Exception:  # corrupt EXIF must not make a decodable image unusable
        return im


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Fully decode ``path`` (first frame) and return an 8-bit RGB ``PIL.Image``.

    Raises whatever Pillow raises for unreadable data, or ``ImageRejected`` for an
    image over the pixel limit.
    """
    path = os.fspath(path)
    if path.lower().endswith(".gz"):
        im = open_image(path)
        im.load()
    else:
        with open(path, "rb") as f:
            im = open_image(path, f)
            im.load()
    im = _apply_exif_orientation(im)
    return to_rgb(im)


def check_image(path: str | os.PathLike) -> str | None:
    """Cheap validity check used by the folder pre-scan.

    Returns ``None`` for a usable image, otherwise a one-line reason.  JPEGs are
    decoded at reduced scale via ``draft()``; everything else is fully decoded,
    which is what catches truncation (unless some code set Pillow's process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES = True``).  Never raises.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        if path.lower().endswith(".gz"):
            im = open_image(path)
            _decode_small(im)
        else:
            with open(path, "rb") as f:
                im = open_image(path, f)
                _decode_small(im)
    except ImageRejected as e:
        return str(e)
    except Image.DecompressionBombError as e:
        return f"decompression bomb guard: {e}"
    except Image.UnidentifiedImageError:
        return "not a recognised image file (unknown or corrupt header)"
    except PermissionError as e:
        return f"unreadable: {e.strerror or e}"
    except MemoryError:
        return "out of memory while decoding"
    except Exception as e:  # truncated data, broken chunks, bad CRC, unsupported mode...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        kind = type(e).__name__
        if "truncated" in msg.lower():
            return f"truncated or corrupt image data ({kind}: {msg})"
        return f"cannot decode ({kind}: {msg})" if msg else f"cannot decode ({kind})"
    return None


def _decode_small(im: Image.Image) -> None:
    if im.format == "JPEG":
        im.draft("RGB", (64, 64))  # DCT-domain downscale: cheap, still reads all data
    im.load()
    to_rgb(im)  # an unsupported mode fails here, not at extraction time
    im.close()


# --------------------------------------------------------------------- transform


def _resample(interpolation: str) -> int:
    try:
        return INTERPOLATIONS[str(interpolation).lower()]
    except KeyError:
        raise SoapError(
            f"unknown interpolation {interpolation!r}; choose one of {sorted(INTERPOLATIONS)}"
        ) from None


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < 1:
        raise SoapError(f"image size must be a positive integer, got {size!r}")
    return int(size)


def resize_center_crop(pil: Image.Image, size: int, resample: int) -> Image.Image:
    """Shorter side -> ``size`` then center crop ``size x size``.

    Same output size and crop offsets as torchvision ``Resize(size)`` followed by
    ``CenterCrop(size)`` on a PIL image; Pillow's resize antialiases when shrinking.
    """
    size = _check_size(size)
    w, h = pil.size
    nw, nh, top, left = _resize_geometry(w, h, size)
    if (nw, nh) != (w, h):
        pil = pil.resize((nw, nh), resample)
    if (nw, nh) != (size, size):
        pil = pil.crop((left, top, left + size, top + size))
    return pil


def _resize_geometry(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """Resized width and height (shorter side -> ``size``) and the crop's top and left."""
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return nw, nh, int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))


#: Interpolations ``transform_pixels`` does on any device (torch antialiases only these two).
TENSOR_INTERPOLATIONS = ("bilinear", "bicubic")


def transform_pixels(img: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                     interpolation: str = "bicubic") -> torch.Tensor:
    """``transform_image`` for a decoded uint8 RGB tensor ``(3, H, W)``, or a batch ``(B, 3, H, W)``
    of images of one size, on any device (images decoded on a GPU stay there; a batch costs one
    kernel launch per step instead of one per image). Same geometry; torch's antialiased resize
    follows Pillow's filters, and the result is rounded to 8 bits as Pillow's is, so pixels agree
    with ``transform_image`` to about one grey level."""
    if interpolation not in TENSOR_INTERPOLATIONS:
        raise SoapError(f"interpolation {interpolation!r} is not available on tensors; use one of {TENSOR_INTERPOLATIONS}")
    if img.ndim not in (3, 4) or img.shape[-3] != 3:
        raise SoapError(f"transform_pixels takes (3, H, W) or (B, 3, H, W) RGB pixels, got {tuple(img.shape)}")
    size = _check_size(size)
    m, s = _mean_std_on(tuple(mean), tuple(std), img.device)
    h, w = img.shape[-2:]
    nw, nh, top, left = _resize_geometry(w, h, size)
    x = (img if img.ndim == 4 else img[None]).to(torch.float32)
    if (nw, nh) != (w, h):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode=interpolation, antialias=True,
                                            align_corners=False).round_().clamp_(0, 255)
    x = x[:, :, top : top + size, left : left + size].div(255.0).sub_(m).div_(s)
    return x if img.ndim == 4 else x[0]


def _mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.as_tensor(mean, dtype=torch.float32).flatten()
    s = torch.as_tensor(std, dtype=torch.float32).flatten()
    if m.numel() != 3 or s.numel() != 3:
        raise SoapError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    if not bool((s > 0).all()):
        raise SoapError(f"std values must be > 0, got {list(std)}")
    return m.view(3, 1, 1), s.view(3, 1, 1)


@functools.lru_cache(maxsize=8)
def _mean_std_on(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # once per device: a copy from host memory to a GPU for every image would wait on the GPU
    m, s = _mean_std(mean, std)
    return m.to(device), s.to(device)


def transform_image(
    pil: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """PIL image (any mode) -> float32 tensor ``(3, size, size)``, normalized."""
    m, s = _mean_std(mean, std)
    if pil.mode != "RGB":
        pil = to_rgb(pil)
    pil = resize_center_crop(pil, size, _resample(interpolation))
    x = torch.from_numpy(np.array(pil, dtype=np.uint8)).permute(2, 0, 1)
    x = x.to(torch.float32).div_(255.0)
    return x.sub_(m).div_(s)


def transform_mask(mask, size: int) -> np.ndarray:
    """Bool mask (array ``(H, W)`` or PIL image) -> bool ``(size, size)``.

    Same geometry as ``transform_image`` for an image of the same ``(H, W)``,
    with nearest-neighbour interpolation (nonzero = foreground).
    """
    if isinstance(mask, Image.Image):
        a = np.asarray(mask.convert("L")) > 0
    else:
        a = np.asarray(mask)
        if a.ndim != 2:
            raise SoapError(f"a mask must be 2-D (H, W), got shape {a.shape}")
        a = a > 0 if a.dtype != bool else a
    pil = Image.fromarray(a.astype(np.uint8) * 255)
    out = resize_center_crop(pil, size, Image.Resampling.NEAREST)
    return np.asarray(out) > 127
