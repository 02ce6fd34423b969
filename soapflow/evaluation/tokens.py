"""Patch tokens (and class tokens) for evaluation: one forward pass for several blocks, with an
optional on-disk cache so several evaluations (and raw vs SOAP) reuse one extraction.

Cache layout: ``<cache_dir>/<key>/L<layer>.npy`` (``(N, H, W, D)``), ``C<layer>.npy`` (class
tokens ``(N, D)``) and ``L<layer>.json`` (written last: the completion marker); tokens after the
final norm are ``L<layer>n.*`` / ``C<layer>n.npy``, so heads fitted either way share one cache.
``key`` hashes the backbone (name, weights sha256, image size, feature) and the data (fingerprint, count).
Cached tokens are float16 by default (half the disk; a relative rounding error of ~5e-4 that
does not matter for cosine affinities or kNN); in-memory extraction is float32.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from soapflow.errors import SoapError

__all__ = ["TokenSet", "forward_tokens", "extract_tokens", "cache_key"]


@dataclass
class TokenSet:
    """Tokens of one dataset: ``tokens[layer]`` ``(N, H, W, D)``, ``cls[layer]`` ``(N, D)``."""

    tokens: dict[int, np.ndarray]
    cls: dict[int, np.ndarray] = field(default_factory=dict)
    key: str | None = None

    def __len__(self) -> int:
        return len(next(iter(self.tokens.values())))


def forward_tokens(bb, images: torch.Tensor, layers, with_cls: bool = False):
    """``({layer: (B, H, W, D) float32}, {layer: (B, D) float32})`` in one forward pass.

    Patch tokens are exactly ``bb.tokens_multi``'s. Class tokens (prefix token 0 of the same
    block output) only for ``feature == "out"`` models that have one; otherwise ``{}``.
    """
    idx = sorted({bb.resolve_layer(int(l)) for l in layers})
    if not with_cls or bb.feature != "out" or bb.num_prefix_tokens < 1:
        out = bb.tokens_multi(images, idx)
        return {i: t.cpu().numpy() for i, t in out.items()}, {}
    x = bb._check_images(images)
    b = x.shape[0]
    h, w = bb.grid
    with torch.inference_mode(), bb._autocast():
        feats = bb.model.forward_intermediates(
            x, indices=idx, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True, stop_early=True
        )
    toks, cls = {}, {}
    for i, (spatial, prefix) in zip(idx, feats):
        if spatial.shape[1] != h * w:
            raise SoapError(f"{bb.timm_name}: got {spatial.shape[1]} patch tokens, expected {h}x{w}")
        with torch.inference_mode():  # the final norm where bb's rule applies it (per token)
            spatial, prefix = bb.apply_final_norm(i, spatial), bb.apply_final_norm(i, prefix)
        toks[i] = spatial.float().reshape(b, h, w, -1).cpu().numpy()
        cls[i] = prefix[:, 0].float().cpu().numpy()
    return toks, cls


def cache_key(bb, data, count: int) -> str:
    ident = {
        "backbone": bb.name,
        "timm": bb.timm_name,
        "weights": bb.weights_sha256,
        "image_size": bb.image_size,
        "feature": bb.feature,
        "data": getattr(data, "fingerprint", None) or getattr(data, "spec", repr(data)),
        "count": int(count),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _stem(bb, layer: int) -> str:
    """File stem of a block's cached tokens: ``L<layer>``, with ``n`` after the final norm."""
    return f"L{layer}" + ("n" if bb.final_norm_at(layer) else "")


def _cached(path: str, stem: str, with_cls: bool) -> bool:
    marker = os.path.join(path, f"{stem}.json")
    if not os.path.isfile(marker):
        return False
    try:
        meta = json.load(open(marker))
    except (OSError, ValueError):
        return False
    return bool(meta.get("complete")) and (not with_cls or meta.get("cls", False))


def extract_tokens(
    bb,
    data,
    layers,
    *,
    n: int | None = None,
    batch_size: int = 32,
    with_cls: bool = False,
    cache_dir: str | None = None,
    dtype: str = "float16",
    progress: bool = True,
    desc: str = "tokens",
) -> TokenSet:
    """Tokens of the first ``n`` (default all) images of ``data`` at ``layers`` (block indices).

    ``data`` is anything with ``len()`` and ``batch(indices, image_size, mean, std)`` (an
    :class:`~soapflow.evaluation.datasets.EvalData` or a :class:`~soapflow.sources.Source`).
    """
    from tqdm.auto import tqdm

    layers = sorted({bb.resolve_layer(int(l)) for l in layers})
    count = len(data) if n is None else min(int(n), len(data))
    if count < 1:
        raise SoapError(f"no images to extract tokens from ({getattr(data, 'spec', data)})")
    if batch_size < 1:
        raise SoapError(f"batch size must be ≥ 1, got {batch_size}")
    h, w = bb.grid
    key = None
    path = None
    todo = layers
    if cache_dir is not None:
        key = cache_key(bb, data, count)
        path = os.path.join(cache_dir, key)
        os.makedirs(path, exist_ok=True)
        todo = [l for l in layers if not _cached(path, _stem(bb, l), with_cls)]
    want_cls = with_cls and bb.feature == "out" and bb.num_prefix_tokens >= 1

    arrays: dict[int, np.ndarray] = {}
    cls_arrays: dict[int, np.ndarray] = {}
    if todo:
        store_dtype = np.dtype(dtype) if cache_dir is not None else np.float32
        for l in todo:
            if path is not None:
                arrays[l] = np.lib.format.open_memmap(
                    os.path.join(path, f"{_stem(bb, l)}.npy"), mode="w+", dtype=store_dtype,
                    shape=(count, h, w, bb.dim)
                )
                if want_cls:
                    cls_arrays[l] = np.lib.format.open_memmap(
                        os.path.join(path, f"C{_stem(bb, l)[1:]}.npy"), mode="w+", dtype=store_dtype,
                        shape=(count, bb.dim)
                    )
            else:
                arrays[l] = np.empty((count, h, w, bb.dim), dtype=store_dtype)
                if want_cls:
                    cls_arrays[l] = np.empty((count, bb.dim), dtype=store_dtype)
        bar = tqdm(total=count, desc=desc, unit="img", disable=not progress, leave=False)
        for start in range(0, count, batch_size):
            idx = list(range(start, min(count, start + batch_size)))
            images = data.batch(idx, bb.image_size, bb.mean, bb.std)
            toks, cls = forward_tokens(bb, images, todo, with_cls=want_cls)
            for l in todo:
                t = toks[l]
                if not np.isfinite(t).all():
                    raise SoapError(f"non-finite tokens at layer {l} for images {idx[0]}–{idx[-1]} of {getattr(data, 'spec', data)}")
                arrays[l][start : start + len(idx)] = t
                if want_cls:
                    cls_arrays[l][start : start + len(idx)] = cls[l]
            bar.update(len(idx))
        bar.close()
        if path is not None:
            for l in todo:
                arrays[l].flush()
                if want_cls:
                    cls_arrays[l].flush()
                with open(os.path.join(path, f"{_stem(bb, l)}.json"), "w") as f:
                    json.dump({"complete": True, "cls": want_cls, "count": count, "layer": l,
                               "final_norm": bb.final_norm_at(l), "data": getattr(data, "spec", None),
                               "dtype": str(np.dtype(dtype))}, f)
    if path is not None:
        for l in layers:
            if l not in arrays:
                arrays[l] = np.load(os.path.join(path, f"{_stem(bb, l)}.npy"), mmap_mode="r")
                cfile = os.path.join(path, f"C{_stem(bb, l)[1:]}.npy")
                if want_cls and os.path.isfile(cfile):
                    cls_arrays[l] = np.load(cfile, mmap_mode="r")
    return TokenSet(tokens={l: arrays[l] for l in layers}, cls={l: cls_arrays[l] for l in layers if l in cls_arrays}, key=key)
