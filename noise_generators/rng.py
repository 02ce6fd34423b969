"""Counter-based random numbers keyed by (seed, stream, image index).

Every value is a pure hash of (key, element counter), so any image can be regenerated on its
own and a batch is filled with a handful of vectorized integer ops. The hash is SplitMix64:
state = key + (counter + 1)·γ, then its finalizer. Two backends compute the same integers:
numpy on CPU (logical uint64 shifts, and SIMD log/sin/cos 2–3x faster than torch's there) and
torch elsewhere (CUDA), where int64 is signed, so shifts are masked back to logical ones.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch

_U64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_MIX = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None))
# CPU: states per block, so a block's temporaries stay in L2 cache.
_BLOCK = 1 << 15


def _signed(c: int) -> int:
    """A 64-bit pattern as the signed value torch's int64 stores (multiplication wraps)."""
    c &= _U64
    return c - (1 << 64) if c >= (1 << 63) else c


def _use_numpy(keys: torch.Tensor) -> bool:
    return keys.device.type == "cpu"


def _mix64(x, tmp):
    """SplitMix64 finalizer, in place: numpy uint64 or torch int64 (same bits)."""
    for shift, mult in _MIX:
        if isinstance(x, np.ndarray):
            np.right_shift(x, shift, out=tmp)
        else:
            torch.bitwise_right_shift(x, shift, out=tmp)
            tmp &= (1 << (64 - shift)) - 1  # torch's >> is arithmetic: drop the copied sign bits
        x ^= tmp
        if mult is not None:
            x *= mult if isinstance(x, np.ndarray) else _signed(mult)
    return x


def image_keys(seed: int, stream: str, idx: torch.Tensor) -> torch.Tensor:
    """One 64-bit key (int64 tensor) per absolute image index in ``idx`` for the named stream.

    crc32, not ``hash()``: Python salts string hashes per process.
    """
    base = np.array([seed & _U64], dtype=np.uint64)
    _mix64(base, np.empty_like(base))
    base ^= zlib.crc32(stream.encode())
    _mix64(base, np.empty_like(base))
    x = idx.to(torch.int64).mul(_signed(_GAMMA)).add_(_signed(int(base[0])))
    return _mix64(x, torch.empty_like(x))


def _blocks(keys: torch.Tensor, m: int):
    """Yield (r0, r1, c0, c1, x): x[r, c] = hash of (keys[r0 + r], counter c0 + c), a numpy
    uint64 array on CPU, a torch int64 tensor elsewhere."""
    k = keys.numel()
    if _use_numpy(keys):
        keys = keys.numpy().view(np.uint64)
        ctr = np.arange(1, m + 1, dtype=np.uint64) * np.uint64(_GAMMA)
        ncols = -(-m // _BLOCK)
        w = -(-m // ncols)  # equal column blocks rather than one big and one tiny
        rows = max(1, _BLOCK // w)
        empty = lambda n: np.empty(n, dtype=np.uint64)  # noqa: E731
        add = lambda a, b, out: np.add(a, b, out=out)  # noqa: E731
    else:
        ctr = torch.arange(1, m + 1, dtype=torch.int64, device=keys.device).mul_(_signed(_GAMMA))
        w, rows = m, k  # one block: the GPU wants big kernels
        empty = lambda n: torch.empty(n, dtype=torch.int64, device=keys.device)  # noqa: E731
        add = lambda a, b, out: torch.add(a, b, out=out)  # noqa: E731
    x_buf, tmp_buf = empty(min(rows, k) * w), empty(min(rows, k) * w)
    for c0 in range(0, m, w):
        c1 = min(m, c0 + w)
        for r0 in range(0, k, rows):
            r1 = min(k, r0 + rows)
            shape, n = (r1 - r0, c1 - c0), (r1 - r0) * (c1 - c0)
            x = add(keys[r0:r1, None], ctr[c0:c1], out=x_buf[:n].reshape(shape))
            yield r0, r1, c0, c1, _mix64(x, tmp_buf[:n].reshape(shape))


def _top(x, bits: int):
    """The top ``bits`` bits of each 64-bit value, as a non-negative integer."""
    if isinstance(x, np.ndarray):
        return x >> (64 - bits)
    return (x >> (64 - bits)) & ((1 << bits) - 1)


def _f32(x):
    """Non-negative integers (< 2⁶³) to float32; numpy converts int64 faster than uint64."""
    return x.view(np.int64).astype(np.float32) if isinstance(x, np.ndarray) else x.to(torch.float32)


def _f64(x):
    return x.astype(np.float64) if isinstance(x, np.ndarray) else x.to(torch.float64)


def _output(keys: torch.Tensor, shape: tuple[int, int], out: torch.Tensor | None, dtype=torch.float32):
    """(tensor, the array to write: its numpy view on CPU)."""
    n = shape[0] * shape[1]
    t = torch.empty(shape, dtype=dtype, device=keys.device) if out is None else out[:n].view(shape)
    return t, (t.numpy() if _use_numpy(keys) else t)


def uniform(keys: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(len(keys), n) float32 uniforms on the grid (k + 1/2)·2⁻²³: exact in float32 and strictly
    inside (0, 1). Two per 64-bit hash. ``out``: optional flat float32 buffer to fill."""
    m = (n + 1) // 2
    t, o = _output(keys, (keys.numel(), 2 * m), out)
    xp = np if _use_numpy(keys) else torch
    for r0, r1, c0, c1, x in _blocks(keys, m):
        xp.add(_top(x, 23), 0.5, out=o[r0:r1, c0:c1])
        xp.add(x & 0x7FFFFF, 0.5, out=o[r0:r1, m + c0 : m + c1])
    return t[:, :n].mul_(2.0**-23)


def normal(keys: torch.Tensor, n: int, out: torch.Tensor | None = None,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """(len(keys), n) float32 standard normals; Box–Muller on one hash, both outputs used.
    ``out``: optional flat float32 buffer to fill; ``scale``: optional (len(keys),) factor per
    key, applied to the radius (free, where a separate pass over the result is not)."""
    m = (n + 1) // 2
    t, o = _output(keys, (keys.numel(), 2 * m), out)
    xp = np if _use_numpy(keys) else torch
    if scale is not None:
        scale = scale.to(torch.float32).reshape(-1, 1)
        scale = scale.numpy() if xp is np else scale
    for r0, r1, c0, c1, x in _blocks(keys, m):
        # Radius from the top 32 bits: tails to ~6.8σ. Rounding can make u = 1, i.e. radius 0
        # (harmless); u = 0 cannot happen.
        radius = _f32(_top(x, 32))
        radius += 0.5
        radius *= 2.0**-32
        xp.log(radius, out=radius)
        radius *= -2.0
        xp.sqrt(radius, out=radius)
        if scale is not None:
            radius *= scale[r0:r1]
        angle = _f32(x & 0xFFFFFF)
        angle *= 2 * math.pi * 2.0**-24
        xp.multiply(radius, xp.cos(angle), out=o[r0:r1, c0:c1])
        xp.multiply(radius, xp.sin(angle, out=angle), out=o[r0:r1, m + c0 : m + c1])
    return t[:, :n]


def uniform64(keys: torch.Tensor, n: int) -> torch.Tensor:
    """(len(keys), n) float64 uniforms in (0, 1) with 53 random bits, for per-image parameters."""
    t, o = _output(keys, (keys.numel(), n), None, dtype=torch.float64)
    xp = np if _use_numpy(keys) else torch
    for r0, r1, c0, c1, x in _blocks(keys, n):
        xp.add(_f64(_top(x, 53)), 0.5, out=o[r0:r1, c0:c1])  # exact: 53 bits
    return t.mul_(2.0**-53)
