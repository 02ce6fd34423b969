"""The fit's leaf statistics in torch, on the device the fit was asked for (CUDA, or CPU).

``soapflow.fit`` runs these leaves instead of ``soapflow.method``'s NumPy ones when a fit's
device is ``cuda``/``cuda:N`` (or ``torch-cpu``, the same code on CPU so that CI runs it):
- moments in float64 on the device (a float64 GEMM; merging stays in NumPy on the host);
- activation counts as float32 projections with ``method.f32_bound``, the uncertain entries
  recomputed in float64 on the device with ``method.f64_bound``, and those still uncertain
  exactly on the host — so every decision is the exact sign, the same as the NumPy leaf's;
- on CUDA, every task thread reads its block (zarr, CPU) straight into its own pinned buffer,
  then takes one of a few CUDA streams for the copy and the arithmetic, so reads, copies and
  arithmetic of different blocks overlap.

Each leaf returns host NumPy results, so the merge tree, the eigendecomposition and the
artifact are the CPU fit's code; run to run they are bit-identical (cuBLAS GEMMs and torch
reductions are deterministic for a given shape on a given GPU model).
"""

from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np

from soapflow import method

# At most this many leaves compute on one device at once per process, each on its own CUDA
# stream: device memory (a few blocks each, plus the allocator's cache per stream) stays
# bounded however many task threads read blocks for them.
DEVICE_SLOTS = 4
RECHECK_ROWS = 1 << 14  # uncertain entries re-projected in float64 at a time: 2 × D float64 each

_local = threading.local()
_streams: dict[str, queue.Queue] = {}
_streams_lock = threading.Lock()


def torch_device(device: str):
    import torch

    return torch.device("cpu" if device == "torch-cpu" else device)


def tf32_allowed(dev) -> bool:
    """Whether float32 matmuls on ``dev`` may run in TF32/bf16, where ``method.f32_bound`` does not hold."""
    import torch

    backend = torch.backends.cuda if dev.type == "cuda" else torch.backends.mkldnn
    settings = [getattr(b, "fp32_precision", "none") for b in (torch.backends, backend, getattr(backend, "matmul", None))]
    if any(s not in ("none", "ieee") for s in settings):  # torch ≥ 2.9's settings ("none": inherit)
        return True
    try:
        legacy = torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # torch refuses to say when old and new settings were mixed
        return True
    return legacy or (dev.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32))


@contextlib.contextmanager
def device_slot(dev):
    """On CUDA: one of ``DEVICE_SLOTS`` streams of ``dev``, current while held, idle when given back."""
    if dev.type != "cuda":
        yield
        return
    import torch

    with _streams_lock:
        if str(dev) not in _streams:
            _streams[str(dev)] = queue.Queue()
            for _ in range(DEVICE_SLOTS):
                _streams[str(dev)].put(torch.cuda.Stream(dev))
    pool = _streams[str(dev)]
    stream = pool.get()
    try:
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            yield
    finally:
        stream.synchronize()  # nothing of this leaf (a copy from the thread's pinned buffer) still runs
        pool.put(stream)


def read_host(tokens, start: int, stop: int, dev):
    """Tokens ``[start, stop)`` as a host tensor in the store's dtype, read by zarr straight into
    this thread's buffer (grown as needed); for CUDA the buffer is pinned (pinning is slow)."""
    import torch
    from zarr.core.buffer import default_buffer_prototype

    shape = (stop - start, *tokens.shape[1:])
    n = int(np.prod(shape))
    dtype = getattr(torch, np.dtype(tokens.dtype).name)
    pin = dev.type == "cuda"
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.dtype != dtype or buf.numel() < n or buf.is_pinned() != pin:
        buf = _local.buffer = torch.empty(n, dtype=dtype, pin_memory=pin)
    host = buf[:n].view(shape)
    tokens.get_basic_selection(slice(start, stop), out=default_buffer_prototype().nd_buffer.from_numpy_array(host.numpy()))
    return host


def first_bad(block, start: int) -> int | None:
    import torch

    finite = torch.isfinite(block).reshape(len(block), -1).all(dim=1)
    return None if bool(finite.all()) else start + int(torch.argmin(finite.to(torch.uint8)))


def leaf_moments(tokens, start: int, stop: int, device: str) -> tuple[method.Moments | None, int | None]:
    """``(moments, None)`` of the block, or ``(None, first bad image)`` if it holds NaN/Inf."""
    import torch

    dev = torch_device(device)
    host = read_host(tokens, start, stop, dev)  # outside the slot: every task thread reads at once
    with device_slot(dev):
        block = host.to(dev, non_blocking=True)
        bad = first_bad(block, start)
        if bad is not None:
            return None, bad
        z = block.reshape(-1, block.shape[-1]).to(torch.float64)
        mean = z.mean(dim=0)
        z -= mean
        m2 = z.T @ z
        return method.Moments(len(z), mean.cpu().numpy(), m2.cpu().numpy()), None


def leaf_counts(tokens, start: int, stop: int, mean: np.ndarray, components: np.ndarray, device: str,
                checked: bool = False) -> tuple[np.ndarray | None, int | None]:
    """``(activation counts (H, W, D) int64, None)``, or ``(None, first bad image)``."""
    dev = torch_device(device)
    host = read_host(tokens, start, stop, dev)
    with device_slot(dev):
        block = host.to(dev, non_blocking=True)
        bad = None if checked else first_bad(block, start)
        if bad is not None:
            return None, bad
        return activation_counts(block, mean, components, dev), None


def activation_counts(block, mean: np.ndarray, components: np.ndarray, dev) -> np.ndarray:
    """``method.activation_counts`` in torch: the same exact decisions, computed on ``dev``."""
    import torch

    n, d = len(block), block.shape[-1]
    z = block.reshape(-1, d)
    mean64 = torch.from_numpy(np.ascontiguousarray(mean, np.float64)).to(dev)
    comps64 = torch.from_numpy(np.ascontiguousarray(components, np.float64)).to(dev)
    if z.dtype in (torch.float16, torch.float32) and not tf32_allowed(dev):
        a = z.to(torch.float32) - mean64.to(torch.float32)
        projections = a @ comps64.to(torch.float32).T
        bound = method.f32_bound(torch.linalg.vector_norm(a, dim=1), float(np.linalg.norm(mean)), d)
    else:  # float64 tokens, or float32 GEMMs that may run in TF32: project in float64 (its bound holds)
        a = z.to(torch.float64) - mean64
        projections = a @ comps64.T
        bound = method.f64_bound(torch.linalg.vector_norm(a, dim=1), d)
    del a
    signs = projections > 0
    rows, cols = torch.nonzero(projections.abs_() <= bound[:, None], as_tuple=True)
    del projections
    if len(rows):
        signs[rows, cols] = _recheck(z, rows, cols, mean64, comps64, mean, components)
    return torch.count_nonzero(signs.reshape(n, -1), dim=0).reshape(*block.shape[1:-1], -1).cpu().numpy()


def _recheck(z, rows, cols, mean64, comps64, mean: np.ndarray, components: np.ndarray):
    """Signs of the uncertain entries: float64 on the device, the rest exactly on the host."""
    import torch

    out = []
    step = RECHECK_ROWS
    for s in range(0, len(rows), step):
        r, c = rows[s : s + step], cols[s : s + step]
        a = z[r].to(torch.float64) - mean64
        projections = (a * comps64[c]).sum(dim=1)
        signs = projections > 0
        uncertain = torch.nonzero(projections.abs() <= method.f64_bound(torch.linalg.vector_norm(a, dim=1), z.shape[1]))[:, 0]
        if len(uncertain):
            uc = c[uncertain].cpu().numpy()
            exact = method.exact_signs(z[r[uncertain]].cpu().numpy(), mean, components[uc])
            signs[uncertain] = torch.from_numpy(exact).to(signs.device)
        out.append(signs)
    return torch.cat(out)
