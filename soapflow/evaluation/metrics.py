"""Segmentation metrics (SPEC §5): max Fβ over thresholds of a soft map, IoU, pixel accuracy, mIoU.

Conventions, fixed here once:

* **Fβ curve** (the saliency convention of TokenCut / SelfMask ``metric.py``): ``T = 255`` thresholds
  ``linspace(0, 1 − 1e−10, T)``; at threshold ``t`` a pixel is foreground when ``soft ≥ t``;
  ``P = TP / (#pred + 1e−20)``, ``R = TP / (#gt + 1e−20)``,
  ``F = (1 + β²) P R / (β² P + R)`` with ``β² = 0.3`` and ``0/0 → 0``.
* **max Fβ** of a set of images: the per-image curves are averaged over images first, then the
  maximum over thresholds is taken (one threshold for the whole dataset).
* **IoU** of two binary masks ``|A∩B| / |A∪B|``; both empty → 1.
* **pixel accuracy** = fraction of pixels where the two masks (or label maps) agree.
* **mIoU** from a confusion matrix (rows = ground truth, columns = prediction): IoU per class
  ``C_cc / (row_c + col_c − C_cc)``, averaged over classes whose union is non-empty.
"""

from __future__ import annotations

import numpy as np

BETA2 = 0.3
N_THRESHOLDS = 255

__all__ = [
    "BETA2",
    "N_THRESHOLDS",
    "thresholds",
    "fbeta_curve",
    "max_fbeta",
    "fbeta",
    "iou",
    "pixel_accuracy",
    "confusion",
    "iou_per_class",
    "miou",
    "confusion_accuracy",
]


def thresholds(n: int = N_THRESHOLDS) -> np.ndarray:
    return np.linspace(0.0, 1.0 - 1e-10, n)


def fbeta(precision, recall, beta2: float = BETA2):
    """Fβ from precision and recall, 0 where both are 0."""
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    den = beta2 * p + r
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(den > 0, (1 + beta2) * p * r / np.where(den > 0, den, 1), 0.0)
    return f


def fbeta_curve(soft: np.ndarray, gt: np.ndarray, n: int = N_THRESHOLDS, beta2: float = BETA2) -> np.ndarray:
    """Fβ at each of ``n`` thresholds for one soft map in [0, 1] against a boolean mask: ``(n,)``.

    Computed from one histogram instead of ``n`` comparisons: a pixel with value ``v`` is predicted
    foreground at the thresholds ``t_i ≤ v``, i.e. at indices ``< searchsorted(t, v, 'right')``.
    """
    soft = np.asarray(soft, dtype=np.float64).ravel()
    gt = np.asarray(gt, dtype=bool).ravel()
    if soft.shape != gt.shape:
        raise ValueError(f"soft map and mask differ in size: {soft.size} vs {gt.size}")
    th = thresholds(n)
    k = np.searchsorted(th, soft, side="right")  # number of thresholds at which the pixel is on
    # count of pixels that are on at threshold i = #{k > i}
    on_all = np.cumsum(np.bincount(k, minlength=n + 1)[::-1])[::-1][1:]
    on_fg = np.cumsum(np.bincount(k[gt], minlength=n + 1)[::-1])[::-1][1:]
    tp = on_fg.astype(np.float64)
    precision = tp / (on_all + 1e-20)
    recall = tp / (gt.sum() + 1e-20)
    return fbeta(precision, recall, beta2)


def max_fbeta(curves: np.ndarray) -> tuple[float, int]:
    """``(max Fβ, index of the best threshold)`` of per-image curves ``(N, T)``."""
    curves = np.asarray(curves, dtype=np.float64)
    mean = curves.mean(axis=0)
    i = int(np.argmax(mean))
    return float(mean[i]), i


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    union = np.count_nonzero(pred | gt)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(pred & gt) / union)


def pixel_accuracy(pred: np.ndarray, gt: np.ndarray) -> float:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth differ in shape: {pred.shape} vs {gt.shape}")
    return float(np.count_nonzero(pred == gt) / pred.size)


def confusion(pred: np.ndarray, gt: np.ndarray, n_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """Confusion matrix ``(C, C)`` int64, rows = ground truth, columns = prediction; pixels whose
    ground truth is ``ignore_index`` are left out."""
    pred = np.asarray(pred, dtype=np.int64).ravel()
    gt = np.asarray(gt, dtype=np.int64).ravel()
    keep = (gt >= 0) & (gt < n_classes)
    if ignore_index is not None:
        keep &= gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= n_classes):
        raise ValueError(f"predicted labels outside 0..{n_classes - 1}")
    return np.bincount(gt * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU per class; NaN for classes absent from both ground truth and prediction."""
    conf = np.asarray(conf, dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def miou(conf: np.ndarray) -> float:
    """Mean IoU over the classes present (in ground truth or prediction); 1.0 for an empty matrix."""
    ious = iou_per_class(conf)
    present = ~np.isnan(ious)
    return float(ious[present].mean()) if present.any() else 1.0


def confusion_accuracy(conf: np.ndarray) -> float:
    conf = np.asarray(conf)
    total = conf.sum()
    return float(np.trace(conf) / total) if total else 1.0
