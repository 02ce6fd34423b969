"""TokenCut salient segmentation (SPEC §5) and the edge-aware refinement.

Per image: patch tokens ``(H, W, D)`` → cosine affinities → binary graph (weight 1 where
cosine > τ, else ``eps = 1e-5``) → normalized cut: the second-smallest generalized eigenvector
``x`` of ``(D − A) x = λ D x`` → bipartition at ``mean(x)``.

The generalized problem with a diagonal ``D`` is solved as the symmetric standard problem
``D^{-1/2} A D^{-1/2} y = μ y`` (``λ = 1 − μ``, ``x = D^{-1/2} y``, normalised so ``xᵀ D x = 1``
like ``scipy.linalg.eigh(D − A, D)``), which NumPy solves for a whole batch of images in one
``eigh`` call on a ``(B, HW, HW)`` stack (256 × 256 for a 16 × 16 grid).

Which side is foreground:

* ``"seed"`` (SPEC, TokenCut): the side holding the token with the largest ``|x − mean(x)|``.
* ``"pca"`` (the alternative, a principal-component guide): the first principal component of
  the image's own tokens (centred on the image mean), oriented so that the tokens on the image
  border score lower on average than the image as a whole (background tends to touch the
  border); the foreground is the side of the bipartition whose tokens score higher on it.
  This is our reading of "a principal-component guide"; the paper does not spell it out.

``component=True`` additionally keeps only the 4-connected component of the foreground that
holds the seed token (what TokenCut's ``detect_box`` does); off by default, as in SPEC §5.

Refinement (``refine_mask``): the **fast bilateral solver** (Barron & Poole, ECCV 2016) at pixel
resolution, as TokenCut does: the upsampled binary mask is the target (confidence 0.999), the
RGB image is the reference (bilateral grid in XY + YUV with σ_spatial = 16, σ_luma = 16,
σ_chroma = 8, λ = 256, Jacobi-preconditioned CG, 25 iterations). The solver output (clipped to
[0, 1]) is the refined soft map; the refined mask is its ``> 0.5`` region with holes filled,
restricted to the largest connected component.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import cg

__all__ = [
    "FOREGROUND_RULES",
    "NCut",
    "ncut",
    "soft_map",
    "upsample_mask",
    "BilateralGrid",
    "bilateral_solve",
    "refine_mask",
]

FOREGROUND_RULES = ("seed", "pca")
EPS_EDGE = 1e-5


@dataclass
class NCut:
    """Results for a batch: ``eigvec`` ``(B, H, W)`` oriented so the foreground side is
    positive (``x − mean(x)``, sign-flipped if needed); ``mask`` ``(B, H, W)`` bool;
    ``seed`` ``(B,)`` flat index of the seed token; ``eigenvalue`` ``(B,)`` (λ of the cut)."""

    eigvec: np.ndarray
    mask: np.ndarray
    seed: np.ndarray
    eigenvalue: np.ndarray


def _as_batch(tokens) -> tuple[np.ndarray, tuple[int, int]]:
    import torch

    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    z = np.asarray(tokens)
    if z.ndim == 3:
        z = z[None]
    if z.ndim != 4:
        raise ValueError(f"tokens must be (H, W, D) or (B, H, W, D), got shape {z.shape}")
    b, h, w, d = z.shape
    return z.reshape(b, h * w, d).astype(np.float64), (h, w)


def _second_eigvec(tokens: np.ndarray, tau: float, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Second-smallest generalized eigenvectors ``(B, N)`` (``xᵀ D x = 1``) and eigenvalues."""
    norms = np.linalg.norm(tokens, axis=-1, keepdims=True)
    f = tokens / np.maximum(norms, 1e-12)
    cos = f @ f.transpose(0, 2, 1)
    a = np.where(cos > tau, 1.0, eps)
    d = a.sum(-1)
    s = 1.0 / np.sqrt(d)
    m = s[:, :, None] * a * s[:, None, :]
    m = (m + m.transpose(0, 2, 1)) / 2
    mu, y = np.linalg.eigh(m)  # ascending; μ = 1 − λ, so λ₂ ↔ the second largest μ
    return y[:, :, -2] * s, 1.0 - mu[:, -2]


def _border(h: int, w: int) -> np.ndarray:
    b = np.zeros((h, w), bool)
    b[0, :] = b[-1, :] = b[:, 0] = b[:, -1] = True
    return b.ravel()


def _pc1_scores(tokens: np.ndarray) -> np.ndarray:
    """First principal component scores ``(B, N)`` of each image's centred tokens (via the
    ``N × N`` Gram matrix, cheaper than ``D × D`` when ``N < D``)."""
    xc = tokens - tokens.mean(axis=1, keepdims=True)
    if xc.shape[1] <= xc.shape[2]:
        g = xc @ xc.transpose(0, 2, 1)
        lam, u = np.linalg.eigh((g + g.transpose(0, 2, 1)) / 2)
        return u[:, :, -1] * np.sqrt(np.maximum(lam[:, -1:], 0))
    c = xc.transpose(0, 2, 1) @ xc
    _, v = np.linalg.eigh((c + c.transpose(0, 2, 1)) / 2)
    return np.einsum("bnd,bd->bn", xc, v[:, :, -1])


def _seed_component(mask: np.ndarray, seed: int) -> np.ndarray:
    labels, _ = ndimage.label(mask)  # 4-connectivity
    lab = labels.ravel()[seed]
    return labels == lab if lab > 0 else mask


def ncut(
    tokens,
    tau: float = 0.2,
    *,
    eps: float = EPS_EDGE,
    foreground: str = "seed",
    component: bool = False,
) -> NCut:
    """TokenCut on ``(H, W, D)`` or ``(B, H, W, D)`` tokens (numpy or torch)."""
    if foreground not in FOREGROUND_RULES:
        raise ValueError(f"foreground rule must be one of {FOREGROUND_RULES}, got {foreground!r}")
    z, (h, w) = _as_batch(tokens)
    b, n, _ = z.shape
    if n < 2:
        raise ValueError("TokenCut needs at least 2 tokens per image")
    x, lam = _second_eigvec(z, tau, eps)
    centred = x - x.mean(axis=1, keepdims=True)
    upper = centred > 0  # bipartition at the mean
    rows = np.arange(b)
    if foreground == "seed":
        seed = np.abs(centred).argmax(axis=1)
        flip = ~upper[rows, seed]
    else:
        pc = _pc1_scores(z)
        border = _border(h, w)
        sign = np.where(pc[:, border].mean(1) > pc.mean(1), -1.0, 1.0)
        pc = pc * sign[:, None]
        up_n = upper.sum(1)
        lo_n = n - up_n
        up_mean = np.where(up_n > 0, (pc * upper).sum(1) / np.maximum(up_n, 1), -np.inf)
        lo_mean = np.where(lo_n > 0, (pc * ~upper).sum(1) / np.maximum(lo_n, 1), -np.inf)
        flip = lo_mean > up_mean
        fg_side = np.where(flip[:, None], ~upper, upper)
        seed = np.where(fg_side, np.abs(centred), -1.0).argmax(axis=1)
    oriented = np.where(flip[:, None], -centred, centred)
    mask = np.where(flip[:, None], ~upper, upper).reshape(b, h, w)
    if component:
        mask = np.stack([_seed_component(mask[i], int(seed[i])) for i in range(b)])
    return NCut(eigvec=oriented.reshape(b, h, w), mask=mask, seed=seed.astype(np.int64), eigenvalue=lam)


def soft_map(eigvec: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of oriented eigenvectors ``(H, W)`` or ``(B, H, W)`` to ``size``
    pixels, min–max scaled to [0, 1] per image (constant maps → 0)."""
    import torch
    import torch.nn.functional as F

    e = np.asarray(eigvec, dtype=np.float32)
    single = e.ndim == 2
    t = torch.from_numpy(e[None] if single else e)[:, None]
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[:, 0].numpy().astype(np.float64)
    lo = up.min(axis=(1, 2), keepdims=True)
    hi = up.max(axis=(1, 2), keepdims=True)
    out = np.where(hi > lo, (up - lo) / np.where(hi > lo, hi - lo, 1), 0.0)
    return out[0] if single else out


def upsample_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour upsampling of patch masks/labels ``(H, W)`` or ``(B, H, W)`` to ``size``."""
    m = np.asarray(mask)
    h, w = m.shape[-2:]
    if size % h or size % w:
        import torch
        import torch.nn.functional as F

        single = m.ndim == 2
        t = torch.from_numpy((m[None] if single else m).astype(np.float32))[:, None]
        up = F.interpolate(t, size=(size, size), mode="nearest")[:, 0].numpy().astype(m.dtype)
        return up[0] if single else up
    return np.repeat(np.repeat(m, size // h, axis=-2), size // w, axis=-1)


# --------------------------------------------------------------------- fast bilateral solver

_RGB_TO_YUV = np.array(
    [[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]]
)
_YUV_OFFSET = np.array([0.0, 128.0, 128.0])


class BilateralGrid:
    """A bilateral grid in (x, y, luma, chroma u, chroma v): a sparse splat matrix from pixels
    to occupied vertices and the ``[1 2 1]`` blur along each of the 5 axes."""

    def __init__(self, rgb: np.ndarray, sigma_spatial: float = 16, sigma_luma: float = 16, sigma_chroma: float = 8):
        im = np.asarray(rgb, dtype=np.float64)
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, axis=-1)
        if im.ndim != 3 or im.shape[-1] != 3:
            raise ValueError(f"reference image must be (H, W, 3), got {im.shape}")
        h, w, _ = im.shape
        yuv = im @ _RGB_TO_YUV.T + _YUV_OFFSET
        iy, ix = np.mgrid[:h, :w]
        coords = np.stack(
            [
                (ix / sigma_spatial).astype(np.int64),
                (iy / sigma_spatial).astype(np.int64),
                (yuv[..., 0] / sigma_luma).astype(np.int64),
                (yuv[..., 1] / sigma_chroma).astype(np.int64),
                (yuv[..., 2] / sigma_chroma).astype(np.int64),
            ],
            axis=-1,
        ).reshape(-1, 5)
        coords -= coords.min(0) - 1  # ≥ 1, so a −1 neighbour stays ≥ 0
        self.dim = 5
        self.npixels = len(coords)
        base = coords.max(0) + 2
        self._mult = np.concatenate([[1], np.cumprod(base[:-1])]).astype(np.int64)
        keys = coords @ self._mult
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        self.nvertices = len(uniq)
        self.splat_matrix = sparse.csr_matrix(
            (np.ones(self.npixels), (inverse.ravel(), np.arange(self.npixels))), shape=(self.nvertices, self.npixels)
        )
        vcoords = coords[first]
        blur = sparse.identity(self.nvertices, format="csr") * (2.0 * self.dim)
        for d in range(self.dim):
            for off in (-1, 1):
                nb = vcoords.copy()
                nb[:, d] += off
                nkeys = nb @ self._mult
                loc = np.clip(np.searchsorted(uniq, nkeys), 0, self.nvertices - 1)
                ok = np.flatnonzero(uniq[loc] == nkeys)
                blur = blur + sparse.csr_matrix(
                    (np.ones(len(ok)), (ok, loc[ok])), shape=(self.nvertices, self.nvertices)
                )
        self.blur_matrix = blur.tocsr()

    def splat(self, x: np.ndarray) -> np.ndarray:
        return self.splat_matrix @ x

    def slice(self, y: np.ndarray) -> np.ndarray:
        return self.splat_matrix.T @ y

    def blur(self, x: np.ndarray) -> np.ndarray:
        return self.blur_matrix @ x


def bilateral_solve(
    rgb: np.ndarray,
    target: np.ndarray,
    confidence: np.ndarray | float = 0.999,
    *,
    sigma_spatial: float = 16,
    sigma_luma: float = 16,
    sigma_chroma: float = 8,
    lam: float = 256,
    a_diag_min: float = 1e-5,
    cg_tol: float = 1e-5,
    cg_maxiter: int = 25,
) -> np.ndarray:
    """Fast bilateral solver: the edge-aware smoothing of ``target`` (H, W) guided by ``rgb``."""
    target = np.asarray(target, dtype=np.float64)
    h, w = target.shape
    grid = BilateralGrid(rgb, sigma_spatial, sigma_luma, sigma_chroma)
    if grid.npixels != h * w:
        raise ValueError(f"reference image {np.shape(rgb)[:2]} and target {target.shape} differ in size")
    # bistochastization (Sinkhorn-like normalization of the grid blur)
    m = grid.splat(np.ones(grid.npixels))
    n = np.ones(grid.nvertices)
    for _ in range(10):
        n = np.sqrt(n * m / grid.blur(n))
    m = n * grid.blur(n)
    a_smooth = sparse.diags(m) - sparse.diags(n) @ grid.blur_matrix @ sparse.diags(n)
    c = np.broadcast_to(np.asarray(confidence, dtype=np.float64), (h, w)).ravel()
    t = target.ravel()
    w_splat = grid.splat(c)
    a = lam * a_smooth + sparse.diags(w_splat)
    b = grid.splat(t * c)
    precond = sparse.diags(1.0 / np.maximum(a.diagonal(), a_diag_min))
    y0 = b / np.maximum(w_splat, 1e-12)
    try:
        y, _ = cg(a, b, x0=y0, M=precond, maxiter=cg_maxiter, rtol=cg_tol)
    except TypeError:  # scipy < 1.12
        y, _ = cg(a, b, x0=y0, M=precond, maxiter=cg_maxiter, tol=cg_tol)
    return grid.slice(y).reshape(h, w)


def refine_mask(rgb: np.ndarray, mask: np.ndarray, **solver_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """TokenCut's post-processing: ``(refined soft map in [0, 1], refined boolean mask)``."""
    out = bilateral_solve(rgb, np.asarray(mask, dtype=np.float64), **solver_kwargs)
    binary = ndimage.binary_fill_holes(out > 0.5)
    labels, count = ndimage.label(binary)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        binary = labels == int(np.argmax(sizes))
    return np.clip(out, 0.0, 1.0), binary
