"""The SOAP method, SPEC §1, in plain NumPy.

Read next to SPEC §1: each function is one numbered step. Everything is float64.
Orchestration (dask, stores, plots) lives in ``soapflow.fit``; nothing here does I/O.
Tokens are arrays ``(n_images, H, W, D)``; components are rows of ``V`` in rank order
(rank 0 = largest eigenvalue).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit

EPS = 1e-12


# --- Step 2: moments, mergeable in any order (Chan et al.'s parallel formula) -------------


@dataclass
class Moments:
    """Count, mean and centred scatter ``M2 = Σ (z−mean)(z−mean)ᵀ`` of a set of tokens."""

    n: int
    mean: np.ndarray  # (D,) float64
    m2: np.ndarray  # (D, D) float64


def moments(z: np.ndarray) -> Moments:
    """Moments of a block of tokens ``(..., D)``; centring on the block mean keeps M2 exact."""
    z = np.asarray(z).reshape(-1, z.shape[-1])
    mean = z.mean(axis=0, dtype=np.float64)
    z = np.subtract(z, mean, dtype=np.float64)  # cast and centre in one pass
    # NumPy sees `z.T @ z` on one buffer and calls BLAS syrk (half a GEMM's flops), with the
    # GIL released; scipy's `dsyrk` wrapper holds the GIL, which serializes dask's threads.
    return Moments(len(z), mean, z.T @ z)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan's pairwise merge: the result does not depend on how tokens were split."""
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n / n)
    m2 = a.m2 + b.m2 + np.outer(delta, delta) * (a.n * b.n / n)
    return Moments(n, mean, m2)


def principal_components(m: Moments) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and components (rows) of the unbiased covariance ``M2/(n−1)``.

    Each component's sign is fixed so that its largest-magnitude entry is positive; the
    activations flip with the sign but the SI score does not, so this only makes artifacts
    reproducible across LAPACK builds.
    """
    if m.n < 2:
        raise ValueError(f"need at least 2 tokens for a covariance, got {m.n}")
    cov = m.m2 / (m.n - 1)
    eigenvalues, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(eigenvalues, kind="stable")[::-1]
    eigenvalues, components = eigenvalues[order], vectors[:, order].T
    pivot = components[np.arange(len(components)), np.abs(components).argmax(axis=1)]
    components = components * np.where(pivot < 0, -1.0, 1.0)[:, None]
    return eigenvalues, np.ascontiguousarray(components)


# --- Steps 3–4: activations and response maps ---------------------------------------------


def activation_counts(tokens: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """``Σ_images 1[(z − m)·v_d > 0]`` per position and component: an int64 ``(H, W, K)`` array
    for ``K`` components (rows; ``K = D`` in a fit, fewer to score chosen directions).

    Counts add up exactly, so response maps do not depend on chunking either. Only signs
    matter, so float16/float32 tokens are projected in float32 (twice the GEMM speed) and the
    few projections within float32's error bound of zero are recomputed in float64.
    """
    tokens = np.asarray(tokens)
    z = tokens.reshape(-1, tokens.shape[-1])
    if z.dtype in (np.float16, np.float32):
        signs = _projection_signs_f32(z, mean, components)
    else:
        signs = np.subtract(z, mean, dtype=np.float64) @ components.T > 0
    return np.count_nonzero(signs.reshape(*tokens.shape[:-1], -1), axis=0).astype(np.int64)


def _projection_signs_f32(z: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    # Rounding error of a float32 dot product of length D, in any summation order, is at most
    # γ_D·Σ|a_i v_i| (γ_D = D·u/(1 − D·u)); rounding the mean, the subtraction and v adds a few u.
    # Cauchy–Schwarz bounds the sums by row norms (‖v‖ = 1). Beyond the bound the sign is certain.
    u = np.finfo(np.float32).eps / 2
    d = z.shape[1]
    a = np.subtract(z, mean.astype(np.float32), dtype=np.float32)
    projections = a @ components.astype(np.float32).T
    gamma = d * u / (1 - d * u)
    bound = 1.01 * ((gamma + 4 * u) * np.linalg.norm(a, axis=1) + 2 * u * np.linalg.norm(mean))
    signs = projections > 0
    rows, cols = np.nonzero(np.abs(projections, out=projections) <= bound[:, None])
    for start in range(0, len(rows), 1 << 14):  # uncertain entries: a small fraction, exactly in float64
        r, c = rows[start : start + (1 << 14)], cols[start : start + (1 << 14)]
        signs[r, c] = np.einsum("ij,ij->i", np.subtract(z[r], mean, dtype=np.float64), components[c]) > 0
    return signs


def response_map(counts: np.ndarray, n_images: int) -> np.ndarray:
    """Fraction of images activating each component at each position, clamped to [ε, 1−ε]."""
    return np.clip(counts / n_images, EPS, 1 - EPS)


# --- Step 5: semantic-invariance scores ---------------------------------------------------


def si_scores(p: np.ndarray, q: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """SI score per component: mean over positions of the clamped agreement ``e(h, w)``."""
    agreement = (p * q + (1 - p) * (1 - q)) ** gamma
    norms = np.sqrt(p**2 + (1 - p) ** 2) + np.sqrt(q**2 + (1 - q) ** 2) + EPS
    e = np.clip(2 * agreement / norms, EPS, 1 - EPS)
    return e.mean(axis=(0, 1))


# --- Step 6: suppression weights ----------------------------------------------------------


def auto_mu(scores: np.ndarray, threshold: float = 0.75) -> float:
    """Automatic μ: how many components score above the threshold."""
    return float(np.count_nonzero(scores > threshold))


def suppression_weights(scores: np.ndarray, mu: float, tau: float) -> np.ndarray:
    """``w = s · sigmoid((μ − 0.5 − k)/τ)`` with k the 0-based rank by score; μ = 0 → all zero.

    SPEC states μ = 0 → w = 0 for automatic mode; we apply it for an explicit μ = 0 too,
    since the formula alone would leave weights of ~4.5e-5·s there instead of none.
    """
    if mu < 0 or tau <= 0:
        raise ValueError(f"need μ ≥ 0 and τ > 0, got μ={mu}, τ={tau}")
    weights = np.zeros_like(scores, dtype=np.float64)
    if mu == 0:
        return weights
    by_score = np.argsort(-scores, kind="stable")
    k = np.arange(len(scores))
    weights[by_score] = scores[by_score] * expit((mu - 0.5 - k) / tau)
    return weights


# --- Step 7: the projector ----------------------------------------------------------------


def projector(components: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``Pφ = I − Vᵀ diag(w) V`` with components as rows of V; applied as ``ẑ = Pφ z``."""
    d = components.shape[1]
    return np.eye(d) - (components.T * weights) @ components


def truncation_weights(n_components: int, ranks: list[int]) -> np.ndarray:
    """The authors' manual truncation: weight 1 on the listed eigenvalue ranks, else 0."""
    bad = [r for r in ranks if not 0 <= r < n_components]
    if bad:
        raise ValueError(f"--suppress ranks {bad} out of range 0..{n_components - 1}")
    weights = np.zeros(n_components)
    weights[list(ranks)] = 1.0
    return weights


# --- The whole fit from sufficient statistics ---------------------------------------------


@dataclass
class SoapFit:
    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    p: np.ndarray
    q: np.ndarray
    scores: np.ndarray
    weights: np.ndarray
    projector: np.ndarray
    mu: float
    tau: float
    gamma: float
    threshold: float
    suppress: list[int] | None

    @property
    def explained_variance(self) -> np.ndarray:
        return self.eigenvalues / self.eigenvalues.sum()


def soap_from_statistics(
    real: Moments,
    components: np.ndarray,
    eigenvalues: np.ndarray,
    real_counts: np.ndarray,
    n_real_images: int,
    synth_counts: np.ndarray,
    n_synth_images: int,
    *,
    mu: float | str = 2.0,
    tau: float = 0.05,
    gamma: float = 1.0,
    threshold: float = 0.75,
    suppress: list[int] | None = None,
) -> SoapFit:
    """Steps 4–7 given the real moments, the eigendecomposition and the activation counts."""
    p = response_map(real_counts, n_real_images)
    q = response_map(synth_counts, n_synth_images)
    scores = si_scores(p, q, gamma)
    mu_value = auto_mu(scores, threshold) if mu == "auto" else float(mu)
    if suppress is not None:
        weights = truncation_weights(len(scores), suppress)
    else:
        weights = suppression_weights(scores, mu_value, tau)
    return SoapFit(
        mean=real.mean,
        components=components,
        eigenvalues=eigenvalues,
        p=p,
        q=q,
        scores=scores,
        weights=weights,
        projector=projector(components, weights),
        mu=mu_value,
        tau=tau,
        gamma=gamma,
        threshold=threshold,
        suppress=list(suppress) if suppress is not None else None,
    )
