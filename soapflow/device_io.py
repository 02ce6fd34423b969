"""Moving chunks through a device: images in, tokens out into a ring of host buffers.

On CUDA three streams overlap: the copy of the next chunk's images to the GPU (``h2d``), this
chunk's forward (``compute``) and the copy of the last chunk's tokens into pinned host memory
(``d2h``). Events order them; nothing on the forward's path waits for the host. A chunk made on
the GPU in another thread (nvJPEG, noise) comes with an event of its own stream, which the forward
waits for on the device, not on the host. The ring bounds how many chunks sit between the forward
and the disk: a buffer comes back when its chunk is written.

On a CPU the same calls run in order, and the ring is plain memory.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy as np
import torch


class HostRing:
    """``size`` host buffers of one chunk's tokens (pinned on CUDA), lent one per chunk."""

    def __init__(self, size: int, shape: tuple, dtype: torch.dtype, pin: bool):
        self.size = max(1, int(size))
        self._shape, self._dtype, self._pin = tuple(shape), dtype, pin
        self._free: list[int] = list(range(self.size))
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def available(self) -> bool:
        with self._lock:
            return bool(self._free)

    def acquire(self) -> int:
        with self._lock:
            if not self._free:
                raise RuntimeError("host ring is empty: acquire only after available()")
            k = self._free.pop(0)
        if k not in self._buffers:  # allocated on first use: a short run needs few
            self._buffers[k] = (torch.empty(self._shape, dtype=self._dtype, pin_memory=self._pin),
                                torch.empty((), dtype=torch.bool, pin_memory=self._pin))
        return k

    def buffer(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._buffers[k]

    def release(self, k: int) -> None:
        with self._lock:
            if k in self._free:
                raise RuntimeError(f"host buffer {k} released twice")
            self._free.append(k)


@dataclass
class HostTokens:
    """A chunk's tokens on their way into ring buffer ``slot``: ``wait()`` returns them as an
    array and whether they were finite before the cast; ``release()`` lends the buffer out again."""

    ring: HostRing
    slot: int
    rows: int
    done: object | None  # a CUDA event, or None when the copy is already done

    def wait(self) -> tuple[np.ndarray, bool]:
        if self.done is not None:
            self.done.synchronize()
        tokens, finite = self.ring.buffer(self.slot)
        return tokens[: self.rows].numpy(), bool(finite)

    def release(self) -> None:
        self.ring.release(self.slot)


class DeviceIO:
    """The streams of one device (none on a CPU); see the module doc."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.h2d = torch.cuda.Stream(self.device)
            self.compute = torch.cuda.Stream(self.device)
            self.d2h = torch.cuda.Stream(self.device)

    def ring(self, size: int, shape: tuple, dtype: torch.dtype) -> HostRing:
        return HostRing(size, shape, dtype, pin=self.cuda)

    def producer_stream(self):
        """A stream for a thread that makes chunks on the device (None on a CPU)."""
        return torch.cuda.Stream(self.device) if self.cuda else None

    def forward(self, backbone, images: torch.Tensor, ready, ring: HostRing, tokens_of=None) -> HostTokens:
        """Run ``backbone`` on ``images`` (made on the device once ``ready``, a CUDA event, has
        fired; or host tensors) and copy the tokens, cast to the ring's dtype, into a ring buffer."""
        tokens_of = tokens_of or backbone.tokens
        slot = ring.acquire()
        out, finite = ring.buffer(slot)
        rows = images.shape[0]
        if not self.cuda:
            tokens = tokens_of(images).cpu()
            finite.fill_(bool(np.isfinite(tokens.numpy()).all()))  # numpy's test, unlike its cast, is fast
            out[:rows].copy_(tokens)  # the cast, into the buffer
            return HostTokens(ring, slot, rows, None)
        if images.device.type == "cpu":
            with torch.cuda.stream(self.h2d):
                x = images.to(self.device, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.h2d)
            self.compute.wait_event(copied)
        else:
            x = images
            if ready is not None:
                self.compute.wait_event(ready)
        x.record_stream(self.compute)  # its memory is not reused before the forward has read it
        with torch.cuda.stream(self.compute):
            tokens = tokens_of(x)
            cast = tokens.to(out.dtype)
            all_finite = torch.isfinite(tokens).all()
            computed = torch.cuda.Event()
            computed.record(self.compute)
        self.d2h.wait_event(computed)
        with torch.cuda.stream(self.d2h):
            out[:rows].copy_(cast, non_blocking=True)
            finite.copy_(all_finite, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.d2h)
        cast.record_stream(self.d2h)
        all_finite.record_stream(self.d2h)
        return HostTokens(ring, slot, rows, done)

    def on_producer_stream(self, items, stream):
        """``items`` (``(position, images)``), each made with ``stream`` current in the thread that
        asks for it, as ``(position, (images, event))``: the event fires when they are made."""
        it = iter(items)
        try:
            while True:
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    try:
                        position, images = next(it)
                    except StopIteration:
                        return
                    event = None
                    if stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                yield position, (images, event)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


_IO: dict[str, DeviceIO] = {}
_IO_LOCK = threading.Lock()


def device_io(device) -> DeviceIO:
    """This process's streams for ``device``."""
    key = str(torch.device(device))
    with _IO_LOCK:
        if key not in _IO:
            _IO[key] = DeviceIO(key)
        return _IO[key]
