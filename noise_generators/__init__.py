"""Synthetic non-semantic images (SPEC §2), in a backbone's normalized input space.

    from soapflow.noise_generators import generate
    x = generate("mixture", 64, 224, seed=0)        # (64, 3, 224, 224) float32

Image ``start + i`` is a pure function of (name, parameters, seed, start + i, size): any worker can
regenerate any shard, and chunking never changes the set (bit for bit on one device type). Adding
a generator is one entry in ``GENERATORS`` (plus a check in ``_CHECKS`` if it brings a new kind of
parameter).

Parameter conventions where SPEC §2 leaves room: pink's std is the population std (ddof 0);
modulated_white's field is pink with the given ``alpha`` and std 1; in ``mixture``, ``alpha``
shapes both pink fields and ``sigma`` only the pink component; each component of mixture and
marginal draws from its own random streams (not the standalone generator's images).
"""

from __future__ import annotations

import math
import operator
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from soapflow.noise_generators import recipes
from soapflow.noise_generators.pool import single_threaded_pool
from soapflow.errors import SoapError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Generator:
    fn: Callable[..., torch.Tensor]  # fn(ctx, idx, ns, **params), see recipes
    defaults: dict[str, Any]
    description: str


GENERATORS: dict[str, Generator] = {
    "pink": Generator(recipes.pink, {"alpha": 1.0, "sigma": 1.0},
                      "1/f^alpha noise: DCT coefficients scaled by (i²+j²)^(-alpha/2), std sigma per channel"),
    "modulated_white": Generator(recipes.modulated_white, {"alpha": 1.0},
                                 "white Gaussian noise times a clipped, unnormalized pink field"),
    "gradient": Generator(recipes.gradient, {},
                          "clip(a·x + b·y + c, 0, 1) per channel, a, b, c ~ U(0,1)"),
    "constant": Generator(recipes.constant, {}, "one U(0,1) value per image and channel"),
    "uniform": Generator(recipes.uniform_noise, {}, "U(0,1) per pixel, then normalized"),
    "gaussian": Generator(recipes.gaussian, {}, "standard normal per pixel (in normalized space)"),
    "mixture": Generator(recipes.mixture,
                         {"alpha": 1.0, "sigma": 1.0, "concentration": (1.0, 1.0, 2.0)},
                         "Dirichlet-weighted modulated_white + pink + gradient (the paper's default)"),
    "marginal": Generator(recipes.marginal,
                          {"alpha": 1.0, "sigma": 1.0, "weights": (0.05, 0.15, 0.4, 0.3, 0.1)},
                          "one of uniform, gaussian, pink, gradient, constant per image, with these weights"),
}


def _number(name: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise SoapError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise SoapError(f"parameter {name!r} must be finite, got {value!r}")
    return x


def _floats(name: str, value: Any) -> list[float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise SoapError(f"parameter {name!r} must be a sequence of numbers, got {value!r}")
    return [_number(name, v) for v in value]


def _vector(name: str, value: Any, length: int) -> list[float]:
    xs = _floats(name, value)
    if len(xs) != length:
        raise SoapError(f"parameter {name!r} must be {length} numbers, got {value!r}")
    return xs


def _check(name: str, ok: bool, value: Any, rule: str) -> None:
    if not ok:
        raise SoapError(f"parameter {name!r} {rule}, got {value!r}")


def _alpha(v):
    x = _number("alpha", v)
    _check("alpha", x >= 0, v, "must be >= 0")
    return x


def _sigma(v):
    x = _number("sigma", v)
    _check("sigma", x > 0, v, "must be > 0")
    return x


def _concentration(v):
    xs = _vector("concentration", v, 3)
    _check("concentration", min(xs) > 0, v, "must be > 0 (Dirichlet concentrations)")
    return xs


def _weights(v):
    xs = _vector("weights", v, len(recipes.MARGINAL_CHOICES))
    _check("weights", min(xs) >= 0 and sum(xs) > 0, v,
           f"must be non-negative with a positive sum (over {', '.join(recipes.MARGINAL_CHOICES)})")
    return xs


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "alpha": _alpha, "sigma": _sigma, "concentration": _concentration, "weights": _weights,
}


def _entry(name: Any) -> Generator:
    if not isinstance(name, str) or name not in GENERATORS:
        raise SoapError(f"unknown noise generator {name!r}; valid names: {', '.join(GENERATORS)}")
    return GENERATORS[name]


def generator_params(name: str, **params: Any) -> dict[str, Any]:
    """The full, validated, JSON-able parameters of ``name`` (defaults filled in)."""
    entry = _entry(name)
    unknown = sorted(set(params) - set(entry.defaults))
    if unknown:
        valid = ", ".join(entry.defaults) or "none"
        raise SoapError(f"unknown parameter {unknown[0]!r} for noise generator {name!r}; "
                        f"valid parameters: {valid}")
    return {k: _CHECKS[k](params.get(k, d)) for k, d in entry.defaults.items()}


def _integer(name: str, value: Any, low: int) -> int:
    try:
        if isinstance(value, bool):
            raise TypeError
        x = operator.index(value)
    except TypeError:
        raise SoapError(f"{name} must be an integer, got {value!r}") from None
    if x < low:
        raise SoapError(f"{name} must be >= {low}, got {value!r}")
    return x


def _images_per_block(channels: int, size: int, device: torch.device) -> int:
    """Images per block, a power of two: ~4 MB per image array on CPU keeps a block's
    intermediates in cache; larger blocks elsewhere."""
    budget, cap = ((1 << 20), 256) if device.type == "cpu" else ((1 << 26), 4096)
    fit = max(1, budget // (channels * size * size))
    return min(cap, 1 << (fit.bit_length() - 1))


def generate(name: str, count: int, size: int, *, seed: int = 0, start: int = 0, device="cpu",
             mean=IMAGENET_MEAN, std=IMAGENET_STD, **params: Any) -> torch.Tensor:
    """Images ``start … start+count-1`` of generator ``name``: (count, C, size, size) float32
    on ``device``, in the input space normalized by ``mean``/``std`` (C = len(mean), usually 3)."""
    entry = _entry(name)
    resolved = generator_params(name, **params)
    count = _integer("count", count, 0)
    size = _integer("size", size, 1)
    start = _integer("start", start, 0)
    seed = _integer("seed", seed, 0)
    if seed >= 1 << 64:
        raise SoapError(f"seed must be < 2**64, got {seed!r}")
    mean_, std_ = _floats("mean", mean), _floats("std", std)
    if not mean_ or len(std_) != len(mean_) or min(std_) <= 0:
        raise SoapError(f"mean and std must be equally long (one value per channel) with std > 0, "
                        f"got mean={mean!r}, std={std!r}")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, TypeError, ValueError) as e:
        raise SoapError(f"device {device!r} is not usable: {e}") from None
    channels = len(mean_)
    if dev.type == "cpu":  # NumPy asks for transparent huge pages on large arrays: ~5x fewer page faults
        out = torch.from_numpy(np.empty((count, channels, size, size), dtype=np.float32))
    else:
        out = torch.empty(count, channels, size, size, dtype=torch.float32, device=dev)
    # Blocks are aligned to absolute indices (edge blocks are computed whole and cropped), so an
    # image is always computed in the same block at the same position. Kernel results can depend
    # on that layout (vectorized vs. scalar tail, thread split, batched FFT), so this is what
    # makes the set bit-identical for any start/count. On CPU every block runs on one thread
    # (blocks spread over torch's thread count), so it is bit-identical for any thread count too.
    block = _images_per_block(channels, size, dev)
    local = threading.local()  # scratch buffers per thread

    def fill(b0: int) -> None:
        if not hasattr(local, "ctx"):
            local.ctx = recipes.make_ctx(seed, size, dev, mean_, std_)
        idx = torch.arange(b0, b0 + block, dtype=torch.int64, device=dev)
        lo, hi = max(b0, start), min(b0 + block, start + count)
        out[lo - start : hi - start] = entry.fn(local.ctx, idx, name, **resolved)[lo - b0 : hi - b0]

    starts = range(start - start % block, start + count, block)
    threads = torch.get_num_threads()
    if dev.type == "cpu" and threads > 1:
        list(single_threaded_pool(threads).map(fill, starts))
    else:  # one CPU thread already, or a GPU that wants its kernels queued from one thread
        for b0 in starts:
            fill(b0)
    return out


__all__ = ["GENERATORS", "Generator", "IMAGENET_MEAN", "IMAGENET_STD", "generate", "generator_params"]
