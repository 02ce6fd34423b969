"""Chunks of a source's images for extraction: DataLoader workers for files, the device for noise,
and JPEG decoding on the device (nvJPEG on CUDA)."""

from __future__ import annotations

import contextlib
import io
import threading
import warnings
from collections.abc import Iterator, Sequence

import torch
from PIL import Image

from soapflow.errors import SoapError
from soapflow.sources.base import Source
from soapflow.sources.files import FileImageDataset, FileSource
from soapflow.transforms import TENSOR_INTERPOLATIONS, pixel_limit, transform_pixels


def share_percent(share) -> int:
    """A CPU decode share as whole percent, validated: the split is integer arithmetic on it."""
    try:
        value = float(share)
    except (TypeError, ValueError):
        raise SoapError(f"cpu decode share must be a number from 0 to 1, got {share!r}") from None
    if not 0.0 <= value <= 1.0:
        raise SoapError(f"cpu decode share must be from 0 to 1, got {share!r}")
    return round(value * 100)


def cpu_decodes(i: int, percent: int) -> bool:
    """Whether image ``i`` of a hybrid decode goes to Pillow: spread evenly, ``percent`` in a
    hundred, as a pure function of ``i`` (a resumed store splits as an uninterrupted one)."""
    return (i + 1) * percent // 100 > i * percent // 100


class EncodedImageDataset(torch.utils.data.Dataset):
    """``FileImageDataset`` for decoding on the device: a plain JPEG (RGB or grey, upright, within
    the pixel limit) comes back as its file's ``bytes``, for ``decode_on_device``; any other file,
    and the images ``cpu_decodes`` gives Pillow, is decoded and transformed here, by ``files``'
    rules.  Picklable.  (Bytes, not tensors: a worker sends a chunk of bytes in one pickle, where
    every tensor takes a shared-memory segment; ``collate_encoded`` stacks the decoded ones.)"""

    def __init__(self, files: FileImageDataset, cpu_percent: int = 0):
        self.files = files
        self.cpu_percent = int(cpu_percent)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> bytes | torch.Tensor:
        if self.cpu_percent and cpu_decodes(i, self.cpu_percent):
            return self.files[i]
        path = self.files.paths[i]
        with contextlib.suppress(OSError):
            with open(path, "rb") as f:
                data = f.read()
            if _plain_jpeg(data):
                return data
        return self.files[i]  # the rules of load_rgb, and its error naming the file


def collate_encoded(items: list) -> tuple[list, torch.Tensor | None]:
    """A chunk of ``EncodedImageDataset`` items as ``(bytes or None per image, the decoded images
    stacked)``: one tensor to send from a worker (and to pin) instead of one per image."""
    decoded = [x for x in items if not isinstance(x, bytes)]
    return [x if isinstance(x, bytes) else None for x in items], torch.stack(decoded) if decoded else None


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


def decode_on_device(items: list | tuple, paths: list[str], size: int, mean, std,
                     interpolation: str, device) -> torch.Tensor:
    """A chunk from ``EncodedImageDataset`` (a list of items, or ``collate_encoded``'s pair): JPEG
    bytes decoded in one batch on ``device`` (nvJPEG on CUDA) and transformed there, one batch per
    image size; the images decoded in the workers join them."""
    if isinstance(items, tuple):
        items, decoded = items
        rest = iter(decoded.to(device, non_blocking=True) if decoded is not None else ())
        items = [x if x is not None else next(rest) for x in items]
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


def decodes_on_device(source: Source, device, interpolation: str) -> bool:
    """Whether ``chunk_loader`` decodes ``source``'s JPEGs on ``device`` by default: image files on
    CUDA (nvJPEG), when the resize is one torch does on tensors."""
    return (isinstance(source, FileSource) and torch.device(device).type == "cuda"
            and interpolation in TENSOR_INTERPOLATIONS)


def decoder_name(source: Source, device, interpolation: str, cpu_decode_share: float = 0.0) -> str | None:
    """What decodes ``source``'s files in ``chunk_loader`` (a store's ``decoded_by``): "pillow";
    "decode_jpeg:cuda" (torchvision's on that device type: nvJPEG; files other than plain JPEGs
    still go to Pillow); or, for a hybrid decode, "decode_jpeg:cuda+pillow@0.75" (the share of
    images ``cpu_decodes`` gives Pillow). None for sources that are not files."""
    if not isinstance(source, FileSource):
        return None
    if not decodes_on_device(source, device, interpolation):
        return "pillow"
    percent = share_percent(cpu_decode_share)
    name = f"decode_jpeg:{torch.device(device).type}"
    if percent == 100:
        return "pillow"
    return f"{name}+pillow@{percent / 100:.2f}" if percent else name


def _start_workers(loader: torch.utils.data.DataLoader):
    """``iter(loader)``, which forks its worker processes, called from a plain thread of its own:
    workers forked from a ThreadPoolExecutor's thread (Prefect's task threads) exit with code 1, as
    their exit hook joins that thread, and torch reports them as crashed."""
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
    device_decode: bool | None = None,
    cpu_decode_share: float = 0.0,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(chunk_index, images)`` for each range in ``chunks``, in order.

    File sources decode in ``num_workers`` DataLoader worker processes, one loader
    batch per chunk (tensors come back on CPU, pinned on CUDA).  Noise sources generate each
    chunk directly on ``device``.  With ``device_decode`` (default: on CUDA), the workers read
    files and JPEGs are decoded and resized on ``device``, but for the share
    ``cpu_decode_share`` of images (chosen by ``cpu_decodes``) that the workers decode with
    Pillow meanwhile: the CPU and the GPU then decode side by side (other files are still
    decoded in the workers).  Empty ranges yield an empty ``(0, 3, S, S)`` tensor.
    """
    chunks = [range(c.start, c.stop, c.step) if isinstance(c, range) else c for c in chunks]
    n = len(source)
    for ci, c in enumerate(chunks):
        if len(c) and (min(c) < 0 or max(c) >= n):
            raise SoapError(f"chunk {ci} ({c}) is outside the source's {n} images")
    empty = lambda: torch.empty((0, 3, image_size, image_size), dtype=torch.float32)  # noqa: E731
    if source.kind == "noise":
        for ci, c in enumerate(chunks):
            yield ci, source.batch(c, image_size, mean, std, device=device) if len(c) else empty().to(device)
        return
    dataset = source.dataset(image_size, mean, std, interpolation)
    if device_decode is None:  # on CUDA, for image files
        device_decode = decodes_on_device(source, device, interpolation) and isinstance(dataset, FileImageDataset)
    if device_decode:
        if not isinstance(dataset, FileImageDataset):
            raise SoapError(f"source {source.spec} has no image files to decode on the device")
        if interpolation not in TENSOR_INTERPOLATIONS:
            raise SoapError(f"decoding on the device resizes with {TENSOR_INTERPOLATIONS}, not {interpolation!r}")
        dataset = EncodedImageDataset(dataset, share_percent(cpu_decode_share))
    num_workers = max(0, int(num_workers))
    batches = [list(c) for c in chunks if len(c)]
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        collate_fn=collate_encoded if device_decode else None,  # bytes of different lengths
        # pinned batches go to a GPU asynchronously, while it runs the previous chunk
        pin_memory=torch.device(device).type == "cuda",
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
                x = decode_on_device(x, [source.paths[i] for i in c], image_size, mean, std, interpolation, device)
            yield ci, x
    finally:
        # Stop the worker processes now: an exception's traceback (or a consumer that
        # stops early) would otherwise keep the iterator, and its workers, alive.
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        del it
