"""Orthonormal inverse 2-D DCT-II over the last two axes of a batch."""

from __future__ import annotations

import math

import scipy.fft
import torch


def idct2(x: torch.Tensor) -> torch.Tensor:
    """``scipy.fft.idctn(x, type=2, norm="ortho", axes=(-2, -1))``; may overwrite ``x``.

    CPU tensors go through scipy (pocketfft keeps float32); other devices through torch.fft.
    """
    if x.device.type == "cpu":
        y = scipy.fft.idctn(
            x.numpy(), type=2, norm="ortho", axes=(-2, -1), overwrite_x=True,
            workers=torch.get_num_threads(),  # follow torch's thread setting (e.g. 1 per dask worker)
        )
        return torch.from_numpy(y)
    return idct2_torch(x)


def idct2_torch(x: torch.Tensor) -> torch.Tensor:
    """The same transform built on ``torch.fft`` (for CUDA tensors)."""
    return _idct_last(_idct_last(x).transpose(-1, -2)).transpose(-1, -2)


def _idct_last(x: torch.Tensor) -> torch.Tensor:
    # x[n] = Σ_k c_k X[k] cos(πk(2n+1)/2N) = Re Σ_k (c_k X[k] e^{iπk/2N}) e^{2πikn/2N}:
    # one length-2N inverse FFT of the twisted, zero-padded coefficients.
    n = x.shape[-1]
    k = torch.arange(n, device=x.device, dtype=torch.float64)
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64, device=x.device)
    scale[0] = math.sqrt(1.0 / n)
    twist = torch.polar(scale, k * (math.pi / (2 * n))).to(torch.complex64)
    y = torch.fft.ifft(x * twist, n=2 * n, dim=-1)[..., :n].real
    return (y * (2 * n)).to(x.dtype)
