"""Paired bootstrap over images: raw vs SOAP on the same images, with a 95% CI of the difference.

Every statistic reported here is a function of the *mean over images* of some per-image
quantity: a plain mean (IoU, accuracy, kNN correctness), the max over thresholds of the mean
Fβ curve (max Fβ), or the mIoU of the summed confusion matrices (patch kNN segmentation). A
bootstrap resample of images is then a vector of multiplicities ``w`` (how often each image was
drawn), and the resampled statistic is ``reduce(wᵀ X / N)``: one matrix product for all
resamples. Raw and SOAP use the *same* resamples, so the CI of the difference is paired.

Percentile intervals; the resamples depend only on ``(N, n_boot, seed)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

__all__ = ["Paired", "bootstrap_counts", "paired_bootstrap", "paired_bootstrap_mean"]

DEFAULT_N_BOOT = 2000
BLOCK = 250  # resamples per matrix product (memory: BLOCK × N float64)


@dataclass
class Paired:
    """One metric, raw vs SOAP, on the same images."""

    raw: float
    soap: float
    delta: float
    raw_ci: tuple[float, float]
    soap_ci: tuple[float, float]
    delta_ci: tuple[float, float]
    n: int
    improved: int
    worsened: int
    unchanged: int
    n_boot: int
    seed: int
    level: float = 0.95
    extra: dict = field(default_factory=dict)

    @property
    def significant(self) -> bool:
        """True when the CI of the difference excludes 0."""
        lo, hi = self.delta_ci
        return lo > 0 or hi < 0

    def to_dict(self) -> dict:
        key = f"ci{round(self.level * 100)}"
        return {
            "raw": {"value": self.raw, key: list(self.raw_ci)},
            "soap": {"value": self.soap, key: list(self.soap_ci)},
            "delta": {
                "value": self.delta,
                key: list(self.delta_ci),
                "significant": self.significant,
                "improved": self.improved,
                "worsened": self.worsened,
                "unchanged": self.unchanged,
                "n": self.n,
                "n_boot": self.n_boot,
                "seed": self.seed,
            },
            **self.extra,
        }


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Multiplicities ``(n_boot, n)`` of ``n_boot`` resamples of ``n`` items with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    flat = idx + n * np.arange(n_boot)[:, None]
    return np.bincount(flat.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _identity(mean_items: np.ndarray) -> np.ndarray:
    return mean_items[:, 0]


def paired_bootstrap(
    raw_items: np.ndarray,
    soap_items: np.ndarray,
    reduce: Callable[[np.ndarray], np.ndarray] | None = None,
    *,
    per_image_raw: np.ndarray | None = None,
    per_image_soap: np.ndarray | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    level: float = 0.95,
    tol: float = 1e-9,
) -> Paired:
    """Paired bootstrap of ``reduce(mean over images of items)``.

    raw_items, soap_items: ``(N,)`` or ``(N, K)`` per-image quantities, row ``i`` = image ``i``
    for both. ``reduce`` maps a batch of mean vectors ``(B, K)`` to ``(B,)`` (default: the
    single column, i.e. the plain mean). ``per_image_*`` (``(N,)``): the per-image scores used
    to count images improved / worsened (default: the items themselves when ``K == 1``); a
    change within ``tol`` counts as unchanged.
    """
    raw = np.asarray(raw_items, dtype=np.float64)
    soap = np.asarray(soap_items, dtype=np.float64)
    if raw.ndim == 1:
        raw = raw[:, None]
    if soap.ndim == 1:
        soap = soap[:, None]
    raw = raw.reshape(len(raw), -1)
    soap = soap.reshape(len(soap), -1)
    if raw.shape != soap.shape:
        raise ValueError(f"raw and SOAP items differ in shape: {raw.shape} vs {soap.shape} (the same images?)")
    n = len(raw)
    if n == 0:
        raise ValueError("paired bootstrap needs at least one image")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    reduce = reduce or _identity

    point_raw = float(reduce(raw.mean(0)[None])[0])
    point_soap = float(reduce(soap.mean(0)[None])[0])

    counts = bootstrap_counts(n, n_boot, seed)
    boot_raw = np.empty(n_boot)
    boot_soap = np.empty(n_boot)
    for start in range(0, n_boot, BLOCK):
        w = counts[start : start + BLOCK] / n
        boot_raw[start : start + BLOCK] = reduce(w @ raw)
        boot_soap[start : start + BLOCK] = reduce(w @ soap)
    alpha = (1 - level) / 2 * 100
    q = [alpha, 100 - alpha]

    def ci(x):
        lo, hi = np.percentile(x, q)
        return float(lo), float(hi)

    if per_image_raw is None or per_image_soap is None:
        if raw.shape[1] != 1:
            raise ValueError("per_image_raw/per_image_soap are needed to count improved images for vector items")
        per_image_raw, per_image_soap = raw[:, 0], soap[:, 0]
    diff = np.asarray(per_image_soap, dtype=np.float64) - np.asarray(per_image_raw, dtype=np.float64)
    if diff.shape != (n,):
        raise ValueError(f"per-image scores must have shape ({n},), got {diff.shape}")
    improved = int(np.count_nonzero(diff > tol))
    worsened = int(np.count_nonzero(diff < -tol))
    return Paired(
        raw=point_raw,
        soap=point_soap,
        delta=point_soap - point_raw,
        raw_ci=ci(boot_raw),
        soap_ci=ci(boot_soap),
        delta_ci=ci(boot_soap - boot_raw),
        n=n,
        improved=improved,
        worsened=worsened,
        unchanged=n - improved - worsened,
        n_boot=int(n_boot),
        seed=int(seed),
        level=level,
    )


def paired_bootstrap_mean(raw: np.ndarray, soap: np.ndarray, **kwargs) -> Paired:
    """Paired bootstrap of the mean of a per-image score ``(N,)``."""
    return paired_bootstrap(np.asarray(raw, dtype=np.float64), np.asarray(soap, dtype=np.float64), **kwargs)
