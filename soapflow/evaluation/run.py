"""End-to-end evaluations of one SOAP head: resolve the head, load its backbone, extract tokens
once (optionally cached on disk), run a protocol on raw and SOAP-corrected tokens of the same
images, and return a report (see :mod:`soapflow.evaluation.report`).

    ctx = load_context("dinov2_vits14/11@latest")          # or an artifact directory
    rep = run_salient(ctx, "fashion-mnist", n=1000, tau=0.2, cache_dir="/tmp/tok")
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import numpy as np

from soapflow.config import EvalSettings
from soapflow.errors import SoapError
from soapflow.evaluation import protocols as P
from soapflow.evaluation.datasets import EvalData, open_eval_data, to_uint8
from soapflow.evaluation.report import make_report, save_label_grid, save_mask_grid
from soapflow.evaluation.tokens import extract_tokens

__all__ = [
    "EvalContext",
    "resolve_head",
    "backbone_for_manifest",
    "load_context",
    "load_targets",
    "run_salient",
    "run_knn_seg",
    "run_knn_cls",
    "report_key",
    "DEFAULT_BANK",
]

DEFAULT_BANK = {"fashion-mnist:test": "fashion-mnist:train", "fashion-mnist:train": "fashion-mnist:test"}


@dataclass
class EvalContext:
    head: object  # SOAPHead
    manifest: dict
    ref: str
    from_registry: bool
    backbone: object  # Backbone
    registry: object = None  # Registry root or instance when from_registry

    @property
    def projector(self) -> np.ndarray:
        return self.head.weight.detach().cpu().numpy().astype(np.float32)

    @property
    def layer(self) -> int:
        return self.backbone.layer

    def head_info(self) -> dict:
        m = self.manifest
        return {
            "ref": self.ref,
            "from_registry": self.from_registry,
            "name": m.get("name"),
            "version": m.get("version"),
            "content_hash": m.get("content_hash"),
            "backbone": m.get("backbone"),
            "weights": m.get("weights"),
            "layer": self.backbone.layer,
            "feature": self.backbone.feature,
            "final_norm": self.backbone.final_norm_at(),
            "image_size": self.backbone.image_size,
            "fit_image_size": m.get("image_size"),
            "grid": list(self.backbone.grid),
            "mu": m.get("mu"),
            "n_suppressed": m.get("n_suppressed"),
        }


def resolve_head(ref: str, registry=None):
    """``(SOAPHead, from_registry)``: an existing directory is an artifact, anything else a
    registry ref (``name``, ``name@alias``, ``name:3``)."""
    from soapflow.head import SOAPHead

    if not isinstance(ref, str) or not ref.strip():
        raise SoapError(f"--head must be an artifact directory or a registry ref, got {ref!r}")
    if os.path.isdir(ref):
        return SOAPHead.from_artifact(ref), False
    if os.path.exists(ref):
        raise SoapError(f"--head {ref}: a file, not an artifact directory (manifest.json + soap.safetensors)")
    if ref.startswith(("/", "./", "../", "~")) or ref.endswith("/") or os.sep + os.sep in ref:
        raise SoapError(f"--head {ref}: no such artifact directory")
    from soapflow.consume import load_head

    try:
        return load_head(ref, registry=registry), True
    except SoapError as e:
        raise SoapError(f"--head {ref!r} is neither an artifact directory nor a published head: {e}") from None


def backbone_for_manifest(manifest: dict, *, weights: str | None = None, image_size: int | None = None,
                          device: str = "cpu", layer: int | None = None):
    """Load the backbone/layer/feature a head was fitted on, checking the weights' sha256."""
    from soapflow.backbones import load_backbone

    name = manifest.get("backbone")
    if not name:
        raise SoapError("the head's manifest names no backbone; cannot evaluate it")
    mlayer = manifest.get("layer") if layer is None else layer
    if mlayer is None:
        raise SoapError("the head's manifest names no layer; cannot evaluate it")
    want = manifest.get("weights")
    if weights is None and want == "random":
        weights = "random"
    from soapflow.storage.artifact import final_norm_of

    # the tokens the head was fitted on: after the final norm or not, as recorded (absent = before)
    bb = load_backbone(name, weights=weights, layer=int(mlayer), feature=manifest.get("feature") or "out",
                       image_size=image_size or manifest.get("image_size"), device=device,
                       final_norm="on" if final_norm_of(manifest) else "off")
    if want and bb.weights_sha256 != want:
        raise SoapError(
            f"the head was fitted on {name} weights sha256 {str(want)[:16]}…, but the loaded weights are "
            f"{str(bb.weights_sha256)[:16]}… ({weights or 'catalog default'}); pass the matching --weights"
        )
    return bb


def load_context(ref: str, *, registry=None, weights: str | None = None, image_size: int | None = None,
                 device: str = "cpu") -> EvalContext:
    head, from_registry = resolve_head(ref, registry)
    manifest = dict(head.manifest or {})
    bb = backbone_for_manifest(manifest, weights=weights, image_size=image_size, device=device)
    if bb.dim != head.in_features:
        raise SoapError(f"head {ref} has D={head.in_features} but {bb.name} layer {bb.layer} tokens have D={bb.dim}")
    return EvalContext(head, manifest, ref, from_registry, bb, registry)


def report_key(report: dict) -> str:
    """A registry evaluation key, e.g. ``salient.fashion-mnist-test.tau0.2``."""
    ev = report["evaluation"]
    ds = re.sub(r"[^A-Za-z0-9._-]+", "-", os.path.basename(str(report["dataset"]["spec"]).rstrip("/")) or "data")
    key = f"{ev}.{ds}".strip("-.")
    cfg = report.get("config", {})
    if ev == "salient":
        key += f".tau{cfg['tau']:g}"
        if cfg.get("soap_tau") not in (None, cfg["tau"]):
            key += f"-soap{cfg['soap_tau']:g}"
        if cfg.get("foreground", "seed") != "seed":
            key += f".{cfg['foreground']}"
    return key[:128]


def _data(spec_or_data, n) -> EvalData:
    return spec_or_data if isinstance(spec_or_data, EvalData) else open_eval_data(spec_or_data, n=n)


def load_targets(data: EvalData, n: int, size: int, *, masks=False, label_maps=False, rgb=False, mean=None,
                 std=None, rgb_count=None, batch_size=64):
    """Ground truth at pixel size ``size`` for the first ``n`` images (and display images)."""
    out = {}
    if masks:
        out["masks"] = data.masks(range(n), size)
    if label_maps:
        out["label_maps"] = data.label_maps(range(n), size)
    if rgb:
        k = n if rgb_count is None else min(n, rgb_count)
        parts = [to_uint8(data.batch(range(s, min(k, s + batch_size)), size, mean, std), mean, std)
                 for s in range(0, k, batch_size)]
        out["rgb"] = np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.uint8)
    return out


# ------------------------------------------------------------------------------- salient


def run_salient(ctx: EvalContext, settings: EvalSettings, *, tau: float | None = None, dataset=None,
                cache_dir: str | None = None, grid_png: str | None = None, progress: bool = True) -> dict:
    """TokenCut on raw and on SOAP tokens of the same images; max Fβ / IoU / accuracy. ``tau``:
    default ``settings.taus[0]``; ``dataset``: an opened ``EvalData`` or a spec (default
    ``settings.dataset``)."""
    s = settings
    n, soap_tau, foreground, component, refine = s.n, s.soap_tau, s.foreground, s.component, s.refine
    n_boot, seed, batch_size, n_grid = s.n_boot, s.seed, s.batch_size, s.n_grid
    tau = s.taus[0] if tau is None else tau
    dataset = s.dataset if dataset is None else dataset
    t0 = time.perf_counter()
    bb = ctx.backbone
    data = _data(dataset, n)
    if not data.has_masks:
        raise SoapError(f"dataset {data.spec} has no masks for salient segmentation (layout {data.layout})")
    count = len(data) if n is None else min(n, len(data))
    toks = extract_tokens(bb, data, [bb.layer], n=count, batch_size=batch_size, cache_dir=cache_dir,
                          progress=progress, desc=f"tokens {data.spec}").tokens[bb.layer]
    t1 = time.perf_counter()
    size = bb.image_size
    targets = load_targets(data, count, size, masks=True, rgb=True, mean=bb.mean, std=bb.std,
                           rgb_count=None if refine else n_grid)
    soap_tau = tau if soap_tau is None else soap_tau
    common = dict(foreground=foreground, component=component, refine=refine, rgb=targets["rgb"] if refine else None,
                  keep_refined=n_grid, progress=progress)
    raw = P.tokencut_images(toks, targets["masks"], projector=None, tau=tau, desc="tokencut raw", **common)
    soap = P.tokencut_images(toks, targets["masks"], projector=ctx.projector, tau=soap_tau, desc="tokencut SOAP", **common)
    t2 = time.perf_counter()
    metrics = P.compare_salient(raw, soap, n_boot=n_boot, seed=seed)
    grid = None
    if grid_png and n_grid > 0:
        k = min(n_grid, count)
        from soapflow.evaluation.tokencut import upsample_mask

        cols = {f"raw τ={tau:g}": upsample_mask(raw.patch_masks[:k], size),
                f"SOAP τ={soap_tau:g}": upsample_mask(soap.patch_masks[:k], size)}
        if refine:
            cols["raw refined"] = np.stack([raw.refined_examples[i] for i in range(k)])
            cols["SOAP refined"] = np.stack([soap.refined_examples[i] for i in range(k)])
        grid = save_mask_grid(grid_png, targets["rgb"][:k], targets["masks"][:k], cols,
                              title=f"TokenCut, {bb.name} layer {bb.layer}")
    config = {"tau": tau, "soap_tau": soap_tau, "eps": 1e-5, "foreground": foreground, "component": component,
              "refine": "fast bilateral solver" if refine else None, "beta2": 0.3, "thresholds": 255,
              "image_size": size, "grid": list(bb.grid), "n_boot": n_boot, "seed": seed}
    return make_report("salient", metrics, head=ctx.head_info(), dataset=data.describe(), n_images=count,
                       config=config, grid_png=grid,
                       timing_s={"tokens": round(t1 - t0, 2), "tokencut": round(t2 - t1, 2),
                                 "total": round(time.perf_counter() - t0, 2)})


# ------------------------------------------------------------------------- kNN segmentation


def _bank_spec(data: EvalData, bank) -> str:
    if bank is not None:
        return bank
    if data.spec in DEFAULT_BANK:
        return DEFAULT_BANK[data.spec]
    raise SoapError(f"dataset {data.spec}: pass --bank (a labelled dataset for the kNN bank, e.g. the train split)")


def _query_and_bank(dataset, n, bank, bank_n, needs: str, what: str, bank_what: str):
    """The query data and the kNN bank, each checked to have ``needs`` (an ``EvalData`` flag),
    and how many images of each are used."""
    data = _data(dataset, n)
    if not getattr(data, needs):
        raise SoapError(f"dataset {data.spec} has no {what} (layout {data.layout})")
    bank_data = _data(_bank_spec(data, bank), bank_n)
    if not getattr(bank_data, needs):
        raise SoapError(f"bank {bank_data.spec} has no {bank_what} (layout {bank_data.layout})")
    count = len(data) if n is None else min(n, len(data))
    bcount = len(bank_data) if bank_n is None else min(bank_n, len(bank_data))
    return data, bank_data, count, bcount


def _patch_label_array(data: EvalData, count: int, size: int, grid) -> np.ndarray:
    from soapflow.evaluation.knn import patch_labels

    return np.stack([patch_labels(data.label_map(i, size), grid) for i in range(count)])


def run_knn_seg(ctx: EvalContext, settings: EvalSettings, *, dataset=None, bank=None, cache_dir: str | None = None,
                grid_png: str | None = None, progress: bool = True) -> dict:
    """Patch kNN segmentation: each query patch takes the majority label of its ``k`` nearest
    bank patches; mIoU and pixel accuracy at pixel resolution. ``dataset``/``bank``: opened
    ``EvalData`` or specs (default: the settings')."""
    s = settings
    n, bank_n, k, bank_patches = s.n, s.bank_n, s.knn_seg_k, s.bank_patches
    n_boot, seed, batch_size, n_grid = s.n_boot, s.seed, s.batch_size, s.n_grid
    dataset = s.dataset if dataset is None else dataset
    bank = s.bank if bank is None else bank
    t0 = time.perf_counter()
    bb = ctx.backbone
    data, bank_data, count, bcount = _query_and_bank(dataset, n, bank, bank_n, "has_label_maps",
                                                     "label maps for kNN segmentation",
                                                     "label maps for kNN segmentation")
    size = bb.image_size
    q = extract_tokens(bb, data, [bb.layer], n=count, batch_size=batch_size, cache_dir=cache_dir,
                       progress=progress, desc=f"tokens {data.spec}").tokens[bb.layer]
    b = extract_tokens(bb, bank_data, [bb.layer], n=bcount, batch_size=batch_size, cache_dir=cache_dir,
                       progress=progress, desc=f"tokens {bank_data.spec}").tokens[bb.layer]
    t1 = time.perf_counter()
    n_classes = max(data.n_seg_classes(size, range(count)), bank_data.n_seg_classes(size, range(bcount)))
    bank_labels = _patch_label_array(bank_data, bcount, size, bb.grid)
    gt = data.label_maps(range(count), size)
    runs = {}
    for variant, proj in (("raw", None), ("soap", ctx.projector)):
        feats, labels = P.build_bank(b, bank_labels, projector=proj, max_patches=bank_patches, seed=seed)
        runs[variant] = P.knn_segment_images(q, gt, feats, labels, n_classes=n_classes, projector=proj, k=k,
                                             progress=progress, desc=f"knn-seg {variant}")
    t2 = time.perf_counter()
    metrics = P.compare_knn_seg(runs["raw"], runs["soap"], n_boot=n_boot, seed=seed)
    grid = None
    if grid_png and n_grid > 0:
        from soapflow.evaluation.tokencut import upsample_mask

        kk = min(n_grid, count)
        rgb = load_targets(data, kk, size, rgb=True, mean=bb.mean, std=bb.std)["rgb"]
        grid = save_label_grid(grid_png, rgb, gt[:kk], {"raw": upsample_mask(runs["raw"].pred[:kk], size),
                                                       "SOAP": upsample_mask(runs["soap"].pred[:kk], size)},
                               n_classes, title=f"patch kNN, {bb.name} layer {bb.layer}")
    config = {"k": k, "bank": bank_data.describe(), "bank_images": bcount, "bank_patches": runs["raw"].bank_size,
              "bank_patches_max": bank_patches, "n_classes": n_classes, "similarity": "cosine", "vote": "majority",
              "patch_label": "most frequent pixel label", "image_size": size, "grid": list(bb.grid),
              "n_boot": n_boot, "seed": seed}
    return make_report("knn-seg", metrics, head=ctx.head_info(), dataset=data.describe(), n_images=count,
                       config=config, grid_png=grid,
                       timing_s={"tokens": round(t1 - t0, 2), "knn": round(t2 - t1, 2),
                                 "total": round(time.perf_counter() - t0, 2)})


# ------------------------------------------------------------------------ kNN classification


def run_knn_cls(ctx: EvalContext, settings: EvalSettings, *, dataset=None, bank=None, cache_dir: str | None = None,
                progress: bool = True) -> dict:
    """kNN classification (cosine, majority vote) on mean-pooled patch tokens and, where the
    model has one, the class token of the same block (SOAP applies Pφ to it as well).
    ``dataset``/``bank``: opened ``EvalData`` or specs (default: the settings')."""
    s = settings
    n, bank_n, k, pools, n_boot, seed, batch_size = s.n, s.bank_n, s.knn_cls_k, s.pools, s.n_boot, s.seed, s.batch_size
    dataset = s.dataset if dataset is None else dataset
    bank = s.bank if bank is None else bank
    t0 = time.perf_counter()
    bb = ctx.backbone
    bad = [p for p in pools if p not in ("mean", "cls")]
    if bad or not pools:
        raise SoapError(f"--pool takes mean and/or cls, got {list(pools)}")
    data, bank_data, count, bcount = _query_and_bank(dataset, n, bank, bank_n, "has_labels",
                                                     "class labels for kNN classification", "class labels")
    want_cls = "cls" in pools
    q = extract_tokens(bb, data, [bb.layer], n=count, batch_size=batch_size, cache_dir=cache_dir, with_cls=want_cls,
                       progress=progress, desc=f"tokens {data.spec}")
    b = extract_tokens(bb, bank_data, [bb.layer], n=bcount, batch_size=batch_size, cache_dir=cache_dir,
                       with_cls=want_cls, progress=progress, desc=f"tokens {bank_data.spec}")
    t1 = time.perf_counter()
    labels = np.asarray(data.labels[:count])
    bank_labels = np.asarray(bank_data.labels[:bcount])
    n_classes = int(max(labels.max(), bank_labels.max())) + 1
    metrics = {}
    skipped = []
    for pool in pools:
        if pool == "mean":
            qr, br = P.pooled(q.tokens[bb.layer]), P.pooled(b.tokens[bb.layer])
        else:
            if bb.layer not in q.cls or bb.layer not in b.cls:
                skipped.append("cls")
                continue
            qr = np.asarray(q.cls[bb.layer], dtype=np.float32)
            br = np.asarray(b.cls[bb.layer], dtype=np.float32)
        proj = ctx.projector
        raw_pred = P.knn_classify(qr, br, bank_labels, k=k, n_classes=n_classes)
        soap_pred = P.knn_classify(P.project(qr, proj), P.project(br, proj), bank_labels, k=k, n_classes=n_classes)
        metrics[f"top1_{pool}"] = P.compare_knn_cls(labels, raw_pred, soap_pred, n_boot=n_boot, seed=seed)
    if not metrics:
        raise SoapError(f"{bb.name}: no class token for --pool cls (feature {bb.feature}); use --pool mean")
    config = {"k": k, "pools": [p for p in pools if p not in skipped], "skipped_pools": skipped,
              "bank": bank_data.describe(), "bank_images": bcount, "n_classes": n_classes, "similarity": "cosine",
              "vote": "majority", "image_size": bb.image_size, "n_boot": n_boot, "seed": seed}
    return make_report("knn-cls", metrics, head=ctx.head_info(), dataset=data.describe(), n_images=count,
                       config=config,
                       timing_s={"tokens": round(t1 - t0, 2), "knn": round(time.perf_counter() - t1, 2),
                                 "total": round(time.perf_counter() - t0, 2)})
