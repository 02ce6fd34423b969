"""The recipes of SPEC §2, vectorized over a batch of absolute image indices.

Each recipe is ``fn(ctx, idx, ns, **params) -> (len(idx), C, S, S)`` float32 in normalized
input space. ``ns`` prefixes the random streams, so a component used inside another recipe
(mixture's pink, marginal's gradient …) draws noise independent of the standalone generator.
The result may alias scratch memory of ``ctx`` (see ``Ctx.buffer``): copy it out before the
next call with the same ``ctx``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import scipy.special
import torch

from soapflow.noise_generators.dct import idct2
from soapflow.noise_generators.rng import image_keys, normal, uniform, uniform64

MARGINAL_CHOICES = ("uniform", "gaussian", "pink", "gradient", "constant")


@dataclass(frozen=True)
class Ctx:
    seed: int
    size: int
    device: torch.device
    mean: torch.Tensor  # (C, 1, 1) float32 on device
    std: torch.Tensor
    _buffers: dict = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> int:
        return self.mean.shape[0]

    def keys(self, stream: str, idx: torch.Tensor) -> torch.Tensor:
        return image_keys(self.seed, stream, idx)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return x.sub_(self.mean).div_(self.std)

    def buffer(self, name: str, numel: int) -> torch.Tensor:
        """Flat float32 scratch reused from block to block: fresh multi-MB allocations cost
        page faults on every block, ~15 % of the CPU time."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self._buffers[name] = torch.empty(numel, dtype=torch.float32, device=self.device)
        return buf[:numel]


def make_ctx(seed, size, device, mean, std) -> Ctx:
    dev = torch.device(device)
    as_col = lambda v: torch.tensor(v, dtype=torch.float32, device=dev).reshape(-1, 1, 1)  # noqa: E731
    return Ctx(int(seed), int(size), dev, as_col(mean), as_col(std))


def _normal(ctx, stream, idx, n, scale=None):
    buf = ctx.buffer(stream, idx.numel() * (n + n % 2))
    return normal(ctx.keys(stream, idx), n, out=buf, scale=scale)


@functools.lru_cache(maxsize=16)
def _spectrum(size: int, alpha: float, device: torch.device) -> torch.Tensor:
    i = torch.arange(size, dtype=torch.float64)
    r2 = i[:, None] ** 2 + i[None, :] ** 2
    r2[0, 0] = 1.0  # the DC coefficient keeps weight 1
    return r2.pow(-alpha / 2).to(torch.float32).to(device)


def _pink_field(ctx, idx, ns, alpha, channels):
    """Pink noise of any scale, and the (k, c, 1, 1) factor that brings each image and channel
    to std 1 (separate, so callers can fold it into a pass they make anyway)."""
    c, s = channels, ctx.size
    # White Gaussian noise has the same law in any orthonormal basis: draw the DCT coefficients.
    coef = _normal(ctx, f"{ns}/coefficients", idx, c * s * s).reshape(-1, c, s, s)
    coef.mul_(_spectrum(s, float(alpha), ctx.device))
    # Parseval: the orthonormal transform keeps Σx², and the image mean is X[0,0]/s, so the
    # population std is known before the inverse DCT.
    sumsq = torch.linalg.vector_norm(coef, dim=(-2, -1), keepdim=True).square_()
    var = (sumsq - coef[..., :1, :1].square()).div_(s * s)
    inv_std = torch.where(var > 0, var.rsqrt(), 1.0)  # var == 0 only for 1-pixel images
    return idct2(coef), inv_std


def pink(ctx, idx, ns, alpha, sigma, channels=None):
    x, inv_std = _pink_field(ctx, idx, ns, alpha, channels or ctx.channels)
    return x.mul_(inv_std.mul_(sigma))


def modulated_white(ctx, idx, ns, alpha, weight=None):
    """``weight`` (len(idx),) >= 0 scales the result (mixture's w1), folded into the white noise."""
    c, s = ctx.channels, ctx.size
    raw, inv_std = _pink_field(ctx, idx, f"{ns}/field", alpha, 1)
    # clip(unnorm(p), 0, 1) with p = raw·inv_std: one field, each channel's mean and std
    mask = ctx.buffer(f"{ns}/mask", idx.numel() * c * s * s).view(-1, c, s, s)
    torch.mul(raw.expand(-1, c, -1, -1), inv_std * ctx.std, out=mask)
    mask.add_(ctx.mean).clamp_(0.0, 1.0)
    return mask.mul_(_normal(ctx, f"{ns}/white", idx, c * s * s, scale=weight).reshape(mask.shape))


def _plane(ctx, idx, ns):
    """clip(a·x + b·y + c, 0, 1) per image and channel, a, b, c ~ U(0, 1)."""
    c, s = ctx.channels, ctx.size
    abc = uniform64(ctx.keys(ns, idx), 3 * c).to(torch.float32).reshape(-1, 3, c, 1, 1)
    grid = torch.linspace(0.0, 1.0, s, device=ctx.device)
    x, y = grid[None, :], grid[:, None]  # x along the width, y along the height
    g = ctx.buffer(f"{ns}/plane", idx.numel() * c * s * s).view(-1, c, s, s)
    # (a·x + c) per row + b·y per column: one broadcast add (a fused 3-operand addcmul is 4x slower)
    row, col = torch.addcmul(abc[:, 2], abc[:, 0], x), abc[:, 1] * y
    return torch.add(row, col, out=g).clamp_(0.0, 1.0)


def gradient(ctx, idx, ns):
    return ctx.norm(_plane(ctx, idx, ns))


def constant(ctx, idx, ns):
    u = uniform64(ctx.keys(ns, idx), ctx.channels).to(torch.float32)
    return ctx.norm(u[:, :, None, None]).expand(-1, -1, ctx.size, ctx.size)


def uniform_noise(ctx, idx, ns):
    c, s = ctx.channels, ctx.size
    buf = ctx.buffer(ns, idx.numel() * (c * s * s + (c * s * s) % 2))
    return ctx.norm(uniform(ctx.keys(ns, idx), c * s * s, out=buf).reshape(-1, c, s, s))


def gaussian(ctx, idx, ns):
    c, s = ctx.channels, ctx.size
    return _normal(ctx, ns, idx, c * s * s).reshape(-1, c, s, s)


def dirichlet(keys: torch.Tensor, concentration) -> np.ndarray:
    """(len(keys), K) float64 Dirichlet draws: normalized Gamma(a_k) quantiles of keyed uniforms."""
    a = np.asarray(concentration, dtype=np.float64)
    u = uniform64(keys, a.size).cpu().numpy()
    g = scipy.special.gammaincinv(a, u)
    total = g.sum(axis=1, keepdims=True)
    # Tiny concentrations can underflow every Gamma draw to 0; Gamma(a) ≈ U^(1/a) picks the winner.
    winner = np.eye(a.size)[np.argmax(np.log(u) / a, axis=1)]
    return np.where(total > 0, g / np.where(total > 0, total, 1.0), winner)


def mixture_weights(ctx, idx, ns, concentration) -> torch.Tensor:
    """(len(idx), 3) float32 weights of (modulated_white, pink, gradient)."""
    w = dirichlet(ctx.keys(f"{ns}/weights", idx), concentration)
    return torch.from_numpy(w).to(device=ctx.device, dtype=torch.float32)


def mixture(ctx, idx, ns, alpha, sigma, concentration):
    w = mixture_weights(ctx, idx, ns, concentration)
    w2, w3 = w[:, 1, None, None, None], w[:, 2, None, None, None]
    out = modulated_white(ctx, idx, f"{ns}/modulated_white", alpha, weight=w[:, 0])
    p, inv_std = _pink_field(ctx, idx, f"{ns}/pink", alpha, ctx.channels)
    out.addcmul_(p, inv_std.mul_(w2 * sigma))  # + w2·pink
    # + w3·gradient = w3·(plane − mean)/std
    return out.addcmul_(_plane(ctx, idx, f"{ns}/gradient"), w3 / ctx.std).sub_(w3 * ctx.mean / ctx.std)


def marginal_choices(ctx, idx, ns, weights) -> torch.Tensor:
    """Index into MARGINAL_CHOICES for every image."""
    p = np.asarray(weights, dtype=np.float64)
    edges = torch.tensor(np.cumsum(p / p.sum())[:-1], dtype=torch.float64, device=ctx.device)
    u = uniform64(ctx.keys(f"{ns}/choice", idx), 1)[:, 0]
    return torch.searchsorted(edges, u, right=True)  # zero-weight categories are empty intervals


def marginal(ctx, idx, ns, alpha, sigma, weights):
    choice = marginal_choices(ctx, idx, ns, weights)
    out = torch.empty(idx.numel(), ctx.channels, ctx.size, ctx.size, device=ctx.device)
    for k, name in enumerate(MARGINAL_CHOICES):  # one batched call per category, not per image
        sel = (choice == k).nonzero()[:, 0]
        if sel.numel():
            extra = {"alpha": alpha, "sigma": sigma} if name == "pink" else {}
            out[sel] = COMPONENTS[name](ctx, idx[sel], f"{ns}/{name}", **extra)
    return out


COMPONENTS = {"uniform": uniform_noise, "gaussian": gaussian, "pink": pink, "gradient": gradient,
              "constant": constant}
