"""The three zero-shot protocols of SPEC §5 on token arrays, raw vs SOAP on the same images.

Functions here take token arrays (``(N, H, W, D)``, float16/32, in memory or memory-mapped) and
the projector ``Pφ`` ``(D, D)``; the corrected tokens are ``z Pφᵀ`` (= ``Pφ z`` per token),
computed batch by batch so memory stays bounded. Each ``compare_*`` returns ``{metric: Paired}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from soapflow.evaluation import knn as knn_mod
from soapflow.evaluation import metrics as M
from soapflow.evaluation.stats import DEFAULT_N_BOOT, Paired, paired_bootstrap
from soapflow.evaluation.tokencut import ncut, refine_mask, soft_map, upsample_mask

__all__ = [
    "project",
    "SalientRun",
    "tokencut_images",
    "compare_salient",
    "SegRun",
    "knn_segment_images",
    "compare_knn_seg",
    "pooled",
    "knn_classify",
    "compare_knn_cls",
]


def project(tokens: np.ndarray, projector: np.ndarray | None) -> np.ndarray:
    """``ẑ = Pφ z`` for every token of ``(..., D)`` (float32); identity when ``projector`` is None."""
    z = np.asarray(tokens, dtype=np.float32)
    if projector is None:
        return z
    p = np.asarray(projector, dtype=np.float32)
    if p.shape != (z.shape[-1], z.shape[-1]):
        raise ValueError(f"projector {p.shape} does not match token dim {z.shape[-1]}")
    return z @ p.T


# ------------------------------------------------------------------------------ salient


@dataclass
class SalientRun:
    """Per-image TokenCut results for one variant (raw or SOAP) at one τ."""

    tau: float
    curves: np.ndarray  # (N, T) Fβ per threshold of the soft map
    iou: np.ndarray  # (N,) of the binary mask
    accuracy: np.ndarray  # (N,)
    patch_masks: np.ndarray  # (N, H, W) bool
    eigvec: np.ndarray  # (N, H, W) oriented
    refined_curves: np.ndarray | None = None
    refined_iou: np.ndarray | None = None
    refined_accuracy: np.ndarray | None = None
    refined_examples: dict = field(default_factory=dict)  # image index -> refined binary mask


def tokencut_images(
    tokens,
    gt_masks: np.ndarray,
    *,
    projector: np.ndarray | None = None,
    tau: float = 0.2,
    foreground: str = "seed",
    component: bool = False,
    refine: bool = False,
    rgb: np.ndarray | None = None,
    keep_refined: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "tokencut",
) -> SalientRun:
    """TokenCut on every image, metrics against ``gt_masks`` ``(N, S, S)`` bool at pixel size ``S``.

    ``refine`` needs ``rgb`` ``(N, S, S, 3)`` uint8 (the reference images of the bilateral solver)."""
    n = len(gt_masks)
    if len(tokens) < n:
        raise ValueError(f"{len(tokens)} token maps for {n} masks")
    size = gt_masks.shape[-1]
    if refine and rgb is None:
        raise ValueError("refine=True needs the RGB images")
    t_count = M.N_THRESHOLDS
    curves = np.zeros((n, t_count), dtype=np.float32)
    ious = np.zeros(n)
    accs = np.zeros(n)
    r_curves = np.zeros((n, t_count), dtype=np.float32) if refine else None
    r_ious = np.zeros(n) if refine else None
    r_accs = np.zeros(n) if refine else None
    h, w = tokens.shape[1:3]
    masks = np.zeros((n, h, w), dtype=bool)
    eig = np.zeros((n, h, w), dtype=np.float32)
    examples = {}
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        z = project(tokens[start:stop], projector)
        cut = ncut(z, tau, foreground=foreground, component=component)
        masks[start:stop] = cut.mask
        eig[start:stop] = cut.eigvec
        soft = soft_map(cut.eigvec, size)
        binary = upsample_mask(cut.mask, size)
        for j in range(stop - start):
            i = start + j
            gt = gt_masks[i]
            curves[i] = M.fbeta_curve(soft[j], gt)
            ious[i] = M.iou(binary[j], gt)
            accs[i] = M.pixel_accuracy(binary[j], gt)
            if refine:
                r_soft, r_bin = refine_mask(rgb[i], binary[j])
                r_curves[i] = M.fbeta_curve(r_soft, gt)
                r_ious[i] = M.iou(r_bin, gt)
                r_accs[i] = M.pixel_accuracy(r_bin, gt)
                if i < keep_refined:
                    examples[i] = r_bin
        bar.update(stop - start)
    bar.close()
    return SalientRun(tau, curves, ious, accs, masks, eig, r_curves, r_ious, r_accs, examples)


def _max_fbeta_paired(raw_curves, soap_curves, **kw) -> Paired:
    _, t_raw = M.max_fbeta(raw_curves)
    _, t_soap = M.max_fbeta(soap_curves)
    p = paired_bootstrap(
        raw_curves, soap_curves, lambda m: m.max(axis=1),
        per_image_raw=raw_curves[:, t_raw], per_image_soap=soap_curves[:, t_soap], **kw,
    )
    th = M.thresholds()
    p.extra = {"threshold": {"raw": float(th[t_raw]), "soap": float(th[t_soap])}}
    return p


def compare_salient(raw: SalientRun, soap: SalientRun, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict[str, Paired]:
    """``max_fbeta`` (dataset-level, soft map), ``iou`` and ``accuracy`` (binary mask, mean over
    images), and the same three for the refined masks when both runs have them. Per-image
    improved/worsened counts for max Fβ use each variant's dataset-best threshold."""
    kw = dict(n_boot=n_boot, seed=seed)
    out = {
        "max_fbeta": _max_fbeta_paired(raw.curves, soap.curves, **kw),
        "iou": paired_bootstrap(raw.iou, soap.iou, **kw),
        "accuracy": paired_bootstrap(raw.accuracy, soap.accuracy, **kw),
    }
    if raw.refined_curves is not None and soap.refined_curves is not None:
        out["max_fbeta_refined"] = _max_fbeta_paired(raw.refined_curves, soap.refined_curves, **kw)
        out["iou_refined"] = paired_bootstrap(raw.refined_iou, soap.refined_iou, **kw)
        out["accuracy_refined"] = paired_bootstrap(raw.refined_accuracy, soap.refined_accuracy, **kw)
    return out


# ------------------------------------------------------------------------ kNN segmentation


@dataclass
class SegRun:
    """Per-image patch-kNN predictions ``(N, H, W)`` and pixel confusion matrices ``(N, C, C)``."""

    pred: np.ndarray
    confusion: np.ndarray
    bank_size: int


def build_bank(bank_tokens, bank_patch_labels: np.ndarray, *, projector=None, max_patches=None, seed=0,
               ignore_index: int = 255, batch_size: int = 256):
    """Normalised bank ``(P, D)`` torch tensor and labels ``(P,)`` from ``(M, H, W, D)`` tokens and
    ``(M, H, W)`` patch labels; ignored patches dropped, then a seeded subset of ``max_patches``."""
    labels = np.asarray(bank_patch_labels).reshape(-1)
    keep = np.flatnonzero(labels != ignore_index)
    keep = keep[knn_mod.subsample_bank(len(keep), max_patches, seed)]
    hw = int(np.prod(bank_patch_labels.shape[1:]))
    d = bank_tokens.shape[-1]
    feats = np.empty((len(keep), d), dtype=np.float32)
    img_of = keep // hw
    for start in range(0, len(bank_tokens), batch_size):
        sel = np.flatnonzero((img_of >= start) & (img_of < start + batch_size))
        if not len(sel):
            continue
        block = project(bank_tokens[start : start + batch_size], projector).reshape(-1, d)
        feats[sel] = block[keep[sel] - start * hw]
    return knn_mod.normalize(feats), labels[keep]


def knn_segment_images(
    query_tokens,
    gt_label_maps: np.ndarray,
    bank,
    bank_labels: np.ndarray,
    *,
    n_classes: int,
    projector: np.ndarray | None = None,
    k: int = 10,
    batch_size: int = 32,
    ignore_index: int = 255,
    progress: bool = True,
    desc: str = "knn-seg",
) -> SegRun:
    """Each query patch takes the majority label of its ``k`` nearest bank patches (cosine);
    predictions are upsampled by nearest neighbour to the label maps' size."""
    n = len(gt_label_maps)
    h, w, d = query_tokens.shape[1:]
    size = gt_label_maps.shape[-1]
    pred = np.zeros((n, h, w), dtype=np.int64)
    conf = np.zeros((n, n_classes, n_classes), dtype=np.int64)
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        z = project(query_tokens[start:stop], projector).reshape(-1, d)
        p = knn_mod.knn_predict(z, bank, bank_labels, k, n_classes, bank_normalized=True).reshape(-1, h, w)
        pred[start:stop] = p
        up = upsample_mask(p, size)
        for j in range(stop - start):
            conf[start + j] = M.confusion(up[j], gt_label_maps[start + j], n_classes, ignore_index)
        bar.update(stop - start)
    bar.close()
    return SegRun(pred, conf, len(bank_labels))


def _miou_rows(m: np.ndarray, c: int) -> np.ndarray:
    conf = m.reshape(len(m), c, c)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    union = conf.sum(1) + conf.sum(2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        ious = np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)
    return np.nanmean(ious, axis=1)


def _acc_rows(m: np.ndarray, c: int) -> np.ndarray:
    conf = m.reshape(len(m), c, c)
    return np.trace(conf, axis1=1, axis2=2) / np.maximum(conf.sum((1, 2)), 1e-12)


def compare_knn_seg(raw: SegRun, soap: SegRun, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict[str, Paired]:
    """``miou`` (dataset-level: IoU per class from the summed confusion, mean over present
    classes) and ``accuracy`` (pixel accuracy); per-image improved/worsened from each image's
    own mIoU / accuracy."""
    c = raw.confusion.shape[1]
    r = raw.confusion.reshape(len(raw.confusion), -1).astype(np.float64)
    s = soap.confusion.reshape(len(soap.confusion), -1).astype(np.float64)
    kw = dict(n_boot=n_boot, seed=seed)
    return {
        "miou": paired_bootstrap(r, s, lambda m: _miou_rows(m, c), per_image_raw=_miou_rows(r, c),
                                 per_image_soap=_miou_rows(s, c), **kw),
        "accuracy": paired_bootstrap(r, s, lambda m: _acc_rows(m, c), per_image_raw=_acc_rows(r, c),
                                     per_image_soap=_acc_rows(s, c), **kw),
    }


# ---------------------------------------------------------------------- kNN classification


def pooled(tokens, projector: np.ndarray | None = None, batch_size: int = 256) -> np.ndarray:
    """Mean-pooled patch tokens ``(N, D)`` (of the corrected tokens when ``projector`` is given;
    Pφ is linear, so this is Pφ applied to the mean)."""
    n = len(tokens)
    out = np.empty((n, tokens.shape[-1]), dtype=np.float32)
    for start in range(0, n, batch_size):
        out[start : start + batch_size] = np.asarray(tokens[start : start + batch_size], dtype=np.float32).mean(axis=(1, 2))
    return project(out, projector)


def knn_classify(query: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray, *, k: int = 20,
                 n_classes: int | None = None) -> np.ndarray:
    return knn_mod.knn_predict(query, bank, bank_labels, k, n_classes)


def compare_knn_cls(labels: np.ndarray, raw_pred: np.ndarray, soap_pred: np.ndarray, *, n_boot=DEFAULT_N_BOOT,
                    seed=0) -> Paired:
    labels = np.asarray(labels)
    return paired_bootstrap((raw_pred == labels).astype(np.float64), (soap_pred == labels).astype(np.float64),
                            n_boot=n_boot, seed=seed)
