"""Per-layer analysis: SOAP fitted at several blocks from one pass over the images.

1. **Extract** — one forward pass per batch yields the tokens of every requested block
   (``Backbone.tokens_multi``); each block's tokens go to its own feature store
   (``<work>/stores/{real,synthetic}/L<layer>``), so they can be fitted again with ``soap fit``.
2. **Fit** — per block, from the stores, with the functions of :mod:`soapflow.method`
   (``moments``/``merge_moments`` → ``principal_components`` → ``activation_counts`` on real and
   synthetic tokens → ``soap_from_statistics``); optionally written as artifacts.
3. **SI per layer** — max SI and the number of components above the threshold.
4. **Evaluate** (optional) — the zero-shot protocols per block, raw vs SOAP, on tokens extracted
   once for all blocks (token cache), and plots of max SI and of each metric vs depth.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from soapflow import method
from soapflow.errors import SoapError

__all__ = ["LayerFit", "parse_layers", "extract_layer_stores", "fit_layer", "scan", "plot_si_vs_depth",
           "plot_metric_vs_depth", "EVALUATIONS"]

EVALUATIONS = ("salient", "knn-seg", "knn-cls")


@dataclass
class LayerFit:
    layer: int
    fit: method.SoapFit
    n_real_images: int
    n_synth_images: int
    real_uri: str
    synth_uri: str
    artifact: str | None = None

    @property
    def max_si(self) -> float:
        return float(self.fit.scores.max())

    @property
    def n_above(self) -> int:
        return int(np.count_nonzero(self.fit.scores > self.fit.threshold))

    def summary(self) -> dict:
        s = np.sort(self.fit.scores)[::-1]
        return {
            "layer": self.layer,
            "max_si": self.max_si,
            "n_above_threshold": self.n_above,
            "threshold": self.fit.threshold,
            "top_si": [float(v) for v in s[:8]],
            "top_si_ranks": [int(r) for r in np.argsort(-self.fit.scores, kind="stable")[:8]],
            "mu": self.fit.mu,
            "n_suppressed": int(np.count_nonzero(self.fit.weights > 0.5 * self.fit.scores)),
            "explained_variance_top": [float(v) for v in self.fit.explained_variance[:4]],
            "artifact": self.artifact,
        }


def parse_layers(spec, depth: int) -> list[int]:
    """``all``, ``last``, or a comma list of block indices (negative allowed), e.g. ``6,-1``."""
    if isinstance(spec, (list, tuple)):
        items = list(spec)
    else:
        text = str(spec).strip().lower()
        if text == "all":
            return list(range(depth))
        if text == "last":
            return [depth - 1]
        items = [p for p in text.split(",") if p.strip()]
    out = []
    for p in items:
        try:
            v = int(p)
        except (TypeError, ValueError):
            raise SoapError(f"--layers takes all, last, or block indices like 6,8,11; got {spec!r}") from None
        if not -depth <= v < depth:
            raise SoapError(f"layer {v} is out of range for a backbone with {depth} blocks (0..{depth - 1})")
        out.append(v % depth)
    if not out:
        raise SoapError(f"--layers names no layer: {spec!r}")
    return sorted(set(out))


def _store_attrs(bb, source, layer: int, dtype: str) -> dict:
    try:
        from soapflow.extract import store_attributes

        attrs = store_attributes(bb, source, dtype)
    except ImportError:  # pragma: no cover
        attrs = {"backbone": bb.name, "weights": bb.weights_sha256, "feature": bb.feature,
                 "image_size": bb.image_size, "source": {"spec": source.spec, **source.fingerprint}}
    attrs["layer"] = int(layer)
    attrs["final_norm"] = bb.final_norm_at(layer)
    return attrs


def extract_layer_stores(bb, source, layers: list[int], root: str, *, batch_size: int = 32, dtype: str = "float16",
                         progress: bool = True, desc: str = "extract") -> dict[int, str]:
    """One pass over ``source``: block ``l``'s tokens into the store ``<root>/L<l>``; resumable
    (complete chunks are skipped). Returns ``{layer: uri}``."""
    from tqdm.auto import tqdm

    from storage.feature_store import FeatureStore

    count = len(source)
    stores = {}
    for l in layers:
        uri = os.path.join(root, f"L{l}")
        stores[l] = FeatureStore.create(uri, count=count, grid=bb.grid, dim=bb.dim, chunk=batch_size, dtype=dtype,
                                        attrs=_store_attrs(bb, source, l, dtype))
    pending = sorted(set().union(*(s.pending_chunks() for s in stores.values())))
    first = stores[layers[0]]
    bar = tqdm(total=sum(len(first.chunk_range(c)) for c in pending), desc=desc, unit="img", disable=not progress,
               leave=False)
    for c in pending:
        rows = first.chunk_range(c)
        images = source.batch(list(rows), bb.image_size, bb.mean, bb.std)
        toks = bb.tokens_multi(images, layers)
        for l, s in stores.items():
            if c in s.pending_chunks():
                s.write_chunk(c, toks[l].cpu().numpy())
        bar.update(len(rows))
    bar.close()
    for s in stores.values():
        s.finalize(count=count)
    return {l: s.uri for l, s in stores.items()}


def _blocks(store):
    from soapflow.fit import block_images

    n = store.count
    b = block_images(store.grid, store.dim)
    for start in range(0, n, b):
        yield np.asarray(store.tokens[start : min(n, start + b)])


def fit_layer(real_uri: str, synth_uri: str, *, mu=2.0, tau=0.05, gamma=1.0, threshold=0.75) -> method.SoapFit:
    """SPEC §1 on two stores, block by block, with :mod:`soapflow.method`."""
    from storage.feature_store import FeatureStore, check_compatible

    real = FeatureStore.open(real_uri)
    synth = FeatureStore.open(synth_uri)
    check_compatible(real, synth)
    real.require_complete()
    synth.require_complete()
    d = real.dim
    moments = method.Moments(0, np.zeros(d), np.zeros((d, d)))
    for block in _blocks(real):
        if not np.isfinite(block).all():
            raise SoapError(f"feature store {real_uri}: NaN/Inf tokens")
        moments = method.merge_moments(moments, method.moments(block))
    eigenvalues, components = method.principal_components(moments)
    real_counts = sum(method.activation_counts(b, moments.mean, components) for b in _blocks(real))
    synth_counts = sum(method.activation_counts(b, moments.mean, components) for b in _blocks(synth))
    try:
        return method.soap_from_statistics(moments, components, eigenvalues, real_counts, real.count, synth_counts,
                                           synth.count, mu=mu, tau=tau, gamma=gamma, threshold=threshold)
    except ValueError as exc:
        raise SoapError(str(exc)) from None


def _write_artifact(fit, real_uri, synth_uri, out_dir, mu_arg, plots=True) -> str:
    from soapflow.fit import FitInputs, fit_manifest
    from storage.artifact import fit_tensors, write_artifact
    from storage.feature_store import FeatureStore

    real, synth = FeatureStore.open(real_uri), FeatureStore.open(synth_uri)
    h, w = real.grid
    inputs = FitInputs(real, synth, real.count, real.count * h * w, synth.count, synth.count * h * w)
    manifest = fit_manifest(fit, inputs, mu_arg=mu_arg)
    extra = {}
    if plots:
        from soapflow import plots as soap_plots

        extra = soap_plots.fit_plots(fit, manifest)
    return str(write_artifact(out_dir, fit_tensors(fit), manifest, overwrite=True, extra_files=extra))


# -------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_si_vs_depth(summaries: list[dict], path: str, title: str = "") -> str:
    plt = _pyplot()
    layers = [s["layer"] for s in summaries]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ax.plot(layers, [s["max_si"] for s in summaries], "o-", color="tab:red", label="max SI")
    if summaries and len(summaries[0]["top_si"]) > 1:
        ax.plot(layers, [s["top_si"][1] for s in summaries], "s--", color="tab:orange", label="2nd SI")
    thr = summaries[0]["threshold"] if summaries else 0.75
    ax.axhline(thr, color="tab:blue", ls=":", lw=1, label=f"threshold {thr:g}")
    ax.set_xlabel("block")
    ax.set_ylabel("SI score")
    ax2 = ax.twinx()
    ax2.bar(layers, [s["n_above_threshold"] for s in summaries], alpha=0.2, color="0.3", label="# above threshold")
    ax2.set_ylabel("# components above threshold")
    ax2.set_ylim(0, max([1] + [s["n_above_threshold"] for s in summaries]) + 1)
    ax.set_zorder(ax2.get_zorder() + 1)
    ax.patch.set_visible(False)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="best")
    ax.set_title(title or "SI vs depth", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_metric_vs_depth(reports: dict[int, dict[str, dict]], path: str, title: str = "") -> str:
    """One panel per (evaluation, metric): raw and SOAP with their 95% CIs vs block."""
    plt = _pyplot()
    panels = []
    for layer in sorted(reports):
        for key, rep in reports[layer].items():
            for metric in rep["metrics"]:
                if (key, metric) not in panels:
                    panels.append((key, metric))
    if not panels:
        raise SoapError("no evaluation results to plot")
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax, (key, metric) in zip(axes.ravel(), panels):
        for variant, color, off in (("raw", "0.35", -0.08), ("soap", "tab:red", 0.08)):
            xs, ys, lo, hi = [], [], [], []
            for layer in sorted(reports):
                rep = reports[layer].get(key)
                if rep is None or metric not in rep["metrics"]:
                    continue
                m = rep["metrics"][metric][variant]
                xs.append(layer + off)
                ys.append(100 * m["value"])
                lo.append(100 * (m["value"] - m["ci95"][0]))
                hi.append(100 * (m["ci95"][1] - m["value"]))
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=color, capsize=2, ms=4,
                        label="SOAP" if variant == "soap" else "raw")
        ax.set_title(f"{key}: {metric}", fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylabel("%")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------- scan


def scan(
    backbone: str,
    *,
    weights: str | None = None,
    layers="all",
    feature: str = "out",
    final_norm: str | bool = "auto",
    image_size: int | None = None,
    data: str = "fashion-mnist:train",
    n: int = 256,
    synth: str = "noise:mixture",
    synth_n: int | None = None,
    seed: int = 0,
    mu=2.0,
    tau: float = 0.05,
    gamma: float = 1.0,
    threshold: float = 0.75,
    batch_size: int = 32,
    dtype: str = "float16",
    work_dir: str | None = None,
    keep_work: bool = False,
    artifacts_dir: str | None = None,
    evaluations=(),
    eval_data: str = "fashion-mnist:test",
    eval_n: int | None = 256,
    bank: str | None = None,
    bank_n: int | None = 500,
    salient_tau: float = 0.2,
    knn_seg_k: int = 10,
    knn_cls_k: int = 20,
    bank_patches: int | None = 16384,
    n_boot: int = 2000,
    out_dir: str | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Fit SOAP at several blocks from one extraction pass; SI per layer and, optionally, the
    zero-shot evaluations per layer. Returns a JSON-able summary (also written to
    ``<out_dir>/scan.json`` with ``si_vs_depth.png`` and ``metrics_vs_depth.png``)."""
    from soapflow.backbones import load_backbone
    from soapflow.sources import open_source

    evaluations = [e for e in evaluations if e]
    bad = [e for e in evaluations if e not in EVALUATIONS]
    if bad:
        raise SoapError(f"--eval: unknown evaluation(s) {bad}; choose from {', '.join(EVALUATIONS)}")
    if n < 2:
        raise SoapError(f"--n must be ≥ 2 real images, got {n}")
    t0 = time.perf_counter()
    bb = load_backbone(backbone, weights=weights, layer=-1, feature=feature, image_size=image_size, device=device,
                       final_norm=final_norm)
    layer_list = parse_layers(layers, bb.depth)
    real_src = open_source(data, n=n, seed=seed)
    synth_src = open_source(synth, n=synth_n or n, seed=seed)
    own_work = work_dir is None
    work = work_dir or tempfile.mkdtemp(prefix="soap-scan-")
    os.makedirs(work, exist_ok=True)
    timing = {}
    try:
        real_uris = extract_layer_stores(bb, real_src, layer_list, os.path.join(work, "stores", "real"),
                                         batch_size=batch_size, dtype=dtype, progress=progress, desc=f"extract {data}")
        synth_uris = extract_layer_stores(bb, synth_src, layer_list, os.path.join(work, "stores", "synthetic"),
                                          batch_size=batch_size, dtype=dtype, progress=progress,
                                          desc=f"extract {synth}")
        timing["extract"] = round(time.perf_counter() - t0, 2)
        fits: dict[int, LayerFit] = {}
        t1 = time.perf_counter()
        for l in layer_list:
            fit = fit_layer(real_uris[l], synth_uris[l], mu=mu, tau=tau, gamma=gamma, threshold=threshold)
            art = None
            if artifacts_dir:
                art = _write_artifact(fit, real_uris[l], synth_uris[l], os.path.join(artifacts_dir, f"L{l}"), mu)
            fits[l] = LayerFit(l, fit, len(real_src), len(synth_src), real_uris[l], synth_uris[l], art)
        timing["fit"] = round(time.perf_counter() - t1, 2)

        reports: dict[int, dict[str, dict]] = {}
        if evaluations:
            t2 = time.perf_counter()
            reports = _evaluate_layers(bb, fits, evaluations, eval_data=eval_data, eval_n=eval_n, bank=bank,
                                       bank_n=bank_n, salient_tau=salient_tau, knn_seg_k=knn_seg_k,
                                       knn_cls_k=knn_cls_k, bank_patches=bank_patches, n_boot=n_boot, seed=seed,
                                       batch_size=batch_size, cache_dir=os.path.join(work, "tokens"),
                                       progress=progress)
            timing["evaluate"] = round(time.perf_counter() - t2, 2)
    finally:
        if own_work and not keep_work:
            shutil.rmtree(work, ignore_errors=True)

    summaries = [{**fits[l].summary(), "final_norm": bb.final_norm_at(l)} for l in layer_list]
    if keep_work or not own_work:
        for s in summaries:
            s["stores"] = {"real": fits[s["layer"]].real_uri, "synthetic": fits[s["layer"]].synth_uri}
    result = {
        "backbone": bb.info(),
        "layers": summaries,
        "data": {"real": real_src.fingerprint, "synthetic": synth_src.fingerprint},
        "fit": {"mu": mu, "tau": tau, "gamma": gamma, "threshold": threshold, "store_dtype": dtype},
        "work_dir": work if (keep_work or not own_work) else None,
        "evaluations": {str(l): reps for l, reps in reports.items()},
        "timing_s": {**timing, "total": round(time.perf_counter() - t0, 2)},
    }
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        result["plots"] = {"si_vs_depth": plot_si_vs_depth(summaries, os.path.join(out_dir, "si_vs_depth.png"),
                                                           title=f"{bb.name}: SI vs depth")}
        if reports:
            result["plots"]["metrics_vs_depth"] = plot_metric_vs_depth(
                reports, os.path.join(out_dir, "metrics_vs_depth.png"), title=f"{bb.name}: raw vs SOAP per block")
        from soapflow.evaluation.report import write_json

        result["json"] = write_json(os.path.join(out_dir, "scan.json"), result)
    return result


def _evaluate_layers(bb, fits: dict[int, LayerFit], evaluations, *, eval_data, eval_n, bank, bank_n, salient_tau,
                     knn_seg_k, knn_cls_k, bank_patches, n_boot, seed, batch_size, cache_dir, progress):
    from soapflow.evaluation import run as R
    from soapflow.evaluation.datasets import open_eval_data
    from soapflow.evaluation.tokens import extract_tokens
    from soapflow.head import SOAPHead

    import torch

    layers = sorted(fits)
    data = open_eval_data(eval_data, n=eval_n)
    with_cls = "knn-cls" in evaluations
    # one pass per dataset for all layers; the per-layer runs below then read the cache
    extract_tokens(bb, data, layers, n=eval_n, batch_size=batch_size, cache_dir=cache_dir, with_cls=with_cls,
                   progress=progress, desc=f"tokens {data.spec}")
    bank_data = None
    if "knn-seg" in evaluations or "knn-cls" in evaluations:
        bank_data = open_eval_data(R._bank_spec(data, bank), n=bank_n)
        extract_tokens(bb, bank_data, layers, n=bank_n, batch_size=batch_size, cache_dir=cache_dir,
                       with_cls=with_cls, progress=progress, desc=f"tokens {bank_data.spec}")
    reports: dict[int, dict[str, dict]] = {}
    for l in layers:
        fit = fits[l]
        manifest = {"backbone": bb.name, "weights": bb.weights_sha256, "layer": l, "feature": bb.feature,
                    "final_norm": bb.final_norm_at(l), "image_size": bb.image_size, "mu": fit.fit.mu,
                    "name": f"scan:{bb.name}/L{l}"}
        head = SOAPHead(torch.from_numpy(fit.fit.projector.astype(np.float32)), manifest)
        ctx = R.EvalContext(head, manifest, f"scan:L{l}", False, dataclasses.replace(bb, layer=l))
        reports[l] = {}
        common = dict(n_boot=n_boot, seed=seed, batch_size=batch_size, cache_dir=cache_dir, progress=progress)
        if "salient" in evaluations:
            reports[l]["salient"] = R.run_salient(ctx, data, n=eval_n, tau=salient_tau, **common)
        if "knn-seg" in evaluations:
            reports[l]["knn-seg"] = R.run_knn_seg(ctx, data, bank_data, n=eval_n, bank_n=bank_n, k=knn_seg_k,
                                                 bank_patches=bank_patches, **common)
        if "knn-cls" in evaluations:
            reports[l]["knn-cls"] = R.run_knn_cls(ctx, data, bank_data, n=eval_n, bank_n=bank_n, k=knn_cls_k,
                                                 **common)
    return reports
