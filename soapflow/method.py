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

from soapflow.config import FitParams

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
    for ``K`` components (unit rows; ``K = D`` in a fit, fewer to score chosen directions).

    Counts add up exactly, so response maps do not depend on chunking either. Each sign is
    the exact sign of ``(z − m)·v`` for the float64 ``m`` and ``v``: float16/float32 tokens are
    projected in float32 (twice the GEMM speed), the few projections within float32's error
    bound of zero are recomputed in float64, and those within float64's bound exactly. So the
    decisions do not depend on BLAS, summation order or device (``soapflow.fit_device`` makes
    the same ones in torch).
    """
    tokens = np.asarray(tokens)
    z = tokens.reshape(-1, tokens.shape[-1])
    if z.dtype in (np.float16, np.float32):
        signs = _projection_signs_f32(z, mean, components)
    else:
        a = np.subtract(z, mean, dtype=np.float64)
        projections = a @ components.T
        signs = projections > 0
        rows, cols = np.nonzero(np.abs(projections, out=projections) <= f64_bound(np.linalg.norm(a, axis=1), z.shape[1])[:, None])
        signs[rows, cols] = exact_signs(z[rows], mean, components[cols])
    return np.count_nonzero(signs.reshape(*tokens.shape[:-1], -1), axis=0).astype(np.int64)


# Rounding error of a dot product of length D, in any summation order (so any BLAS, any GPU),
# is at most γ_D·Σ|a_i v_i| (γ_D = D·u/(1 − D·u)) ≤ γ_D·‖a‖ by Cauchy–Schwarz (‖v‖ = 1);
# rounding the mean, the subtraction and v adds a few u, underflow at most D·tiny. Beyond the
# bound the computed sign is the exact one. The 1.01 covers ‖v‖ ≠ 1 and the norms' own error.
def f32_bound(row_norms, mean_norm: float, d: int):
    """Error bound of float32 ``(z − fl32(m))·fl32(v)`` per row, given float32 row norms of ``a``."""
    u = float(np.finfo(np.float32).eps) / 2
    gamma = d * u / (1 - d * u)
    return 1.01 * ((gamma + 4 * u) * row_norms + 2 * u * mean_norm) + d * float(np.finfo(np.float32).tiny)


def f64_bound(row_norms, d: int):
    """Error bound of float64 ``(z − m)·v`` per row, given the row norms of the computed ``z − m``."""
    u = float(np.finfo(np.float64).eps) / 2
    gamma = d * u / (1 - d * u)
    return 1.01 * (gamma + 2 * u) * row_norms + d * float(np.finfo(np.float64).tiny)


def _projection_signs_f32(z: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    d = z.shape[1]
    a = np.subtract(z, mean.astype(np.float32), dtype=np.float32)
    projections = a @ components.astype(np.float32).T
    bound = f32_bound(np.linalg.norm(a, axis=1), float(np.linalg.norm(mean)), d)
    signs = projections > 0
    rows, cols = np.nonzero(np.abs(projections, out=projections) <= bound[:, None])
    # uncertain entries (a small fraction), one component at a time: gathering a float64
    # component row per entry would cost more than the float32 GEMM
    order = np.argsort(cols, kind="stable")
    edges = np.searchsorted(cols[order], np.arange(len(components) + 1))
    for c in np.nonzero(np.diff(edges))[0]:
        entries = order[edges[c] : edges[c + 1]]
        signs[rows[entries], c] = recheck_signs(z[rows[entries]], mean, components[c])
    return signs


def recheck_signs(z: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Exact signs of ``(z_i − m)·v_i`` for paired rows (or one component ``v`` for all):
    float64 where its bound decides, else exactly."""
    a = np.subtract(z, mean, dtype=np.float64)
    projections = a @ components if components.ndim == 1 else np.einsum("ij,ij->i", a, components)
    signs = projections > 0
    uncertain = np.nonzero(np.abs(projections) <= f64_bound(np.linalg.norm(a, axis=1), z.shape[1]))[0]
    if len(uncertain):
        v = np.broadcast_to(components, z.shape) if components.ndim == 1 else components[uncertain]
        signs[uncertain] = exact_signs(z[uncertain], mean, v[uncertain] if components.ndim == 1 else v)
    return signs


def exact_signs(z: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """``(z_i − m)·v_i > 0`` exactly, for paired rows (the rare ties of float64).

    Each ``(z − m)·v`` is rewritten without error as a sum of float64 terms (TwoSum splits ``z − m``
    into two floats, Dekker's TwoProduct each product into two) whose sign ``math.fsum`` gets
    right: it rounds correctly, and a nonzero sum of floats is at least the smallest subnormal.
    Rows where a product could underflow (no longer error-free) are summed as fractions. A token
    equal to the mean is 0: not active.
    """
    import math

    z = np.asarray(z, np.float64)
    v = np.broadcast_to(np.asarray(components, np.float64), z.shape)
    b = -np.asarray(mean, np.float64)
    s = z + b
    b_in_s = s - z  # Knuth's TwoSum: s + t = z − m exactly
    t = (z - (s - b_in_s)) + (b - b_in_s)
    terms, safe = [], np.ones(len(z), dtype=bool)
    for x in (s, t):
        p, e = _two_product(x, v)
        no_overflow = (np.abs(x) < _NO_OVERFLOW) & (np.abs(v) < _NO_OVERFLOW)
        fine = (x == 0) | (v == 0) | ((np.abs(p) >= _NO_UNDERFLOW) & no_overflow)
        safe &= fine.all(axis=1)
        terms += [p, e]
    rows = np.concatenate(terms, axis=1).tolist()
    signs = np.array([math.fsum(row) > 0 for row in rows], dtype=bool).reshape(len(z))
    for i in np.nonzero(~safe)[0]:
        signs[i] = _fraction_sum(z[i], mean, v[i]) > 0
    return signs


# Dekker's TwoProduct is error-free while no product underflows and the splits do not overflow.
_NO_UNDERFLOW, _NO_OVERFLOW = 2.0**-900, 2.0**990


def _two_product(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``p, e`` with ``p + e = x·y`` exactly (Dekker, with Veltkamp's split)."""
    p = x * y
    (xh, xl), (yh, yl) = _split(x), _split(y)
    return p, ((xh * yh - p) + xh * yl + xl * yh) + xl * yl


def _split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = 134217729.0 * x  # 2**27 + 1: high and low halves of 26 bits each
    high = c - (c - x)
    return high, x - high


def _fraction_sum(z: np.ndarray, mean: np.ndarray, v: np.ndarray):
    """``(z − m)·v`` in exact rational arithmetic."""
    from fractions import Fraction

    m = np.asarray(mean, np.float64).tolist()
    return sum((Fraction(x) - Fraction(mx)) * Fraction(c) for x, mx, c in zip(z.tolist(), m, v.tolist()) if c)


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


def suppressed(weights: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Which components a fit counts as suppressed: more than half of their score removed."""
    return np.asarray(weights) > 0.5 * np.asarray(scores)


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
    params: FitParams = FitParams(),
) -> SoapFit:
    """Steps 4–7 given the real moments, the eigendecomposition and the activation counts."""
    p = response_map(real_counts, n_real_images)
    q = response_map(synth_counts, n_synth_images)
    scores = si_scores(p, q, params.gamma)
    mu_value = auto_mu(scores, params.threshold) if params.auto else params.mu
    if params.suppress is not None:
        weights = truncation_weights(len(scores), list(params.suppress))
    else:
        weights = suppression_weights(scores, mu_value, params.tau)
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
        tau=params.tau,
        gamma=params.gamma,
        threshold=params.threshold,
        suppress=list(params.suppress) if params.suppress is not None else None,
    )
