"""Per-layer analysis: SOAP fitted at several blocks from one pass over the images.

1. **Extract** — ``soapflow.extract.extract_layers``: one forward pass per chunk yields the tokens
   of every requested block; each block's tokens go to its own feature store
   (``<work>/stores/{real,synthetic}/L<layer>``), with the leases and device lock of ``soap extract``.
2. **Fit** — per block, ``soapflow.fit`` on one local dask client: the fit of ``soap fit``, so an
   artifact written here is bit-identical to ``soap fit`` on the same stores.
3. **SI per layer** — max SI and the number of components above the threshold.
4. **Evaluate** (optional) — the zero-shot protocols per block, raw vs SOAP, on tokens extracted
   once for all blocks (token cache), and plots of max SI and of each metric vs depth.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from soapflow import method
from soapflow.config import EVALUATIONS, BackboneSpec, DataSpec, EvalSettings, FitParams, RunSettings
from soapflow.errors import SoapError

__all__ = ["LayerFit", "parse_layers", "scan", "plot_si_vs_depth", "plot_metric_vs_depth", "EVALUATIONS"]


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
            "n_suppressed": int(np.count_nonzero(method.suppressed(self.fit.weights, self.fit.scores))),
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


#: scan's own defaults: a quick pass over Fashion-MNIST, small chunks, no evaluation unless asked
SCAN_DATA = DataSpec(real="fashion-mnist:train", n_real=256)
SCAN_RUN = RunSettings(chunk=32)
SCAN_EVALUATION = EvalSettings(evaluations=(), dataset="fashion-mnist:test", n=256, bank_n=500)


def scan(
    backbone: BackboneSpec,
    layers="all",
    data: DataSpec = SCAN_DATA,
    fit: FitParams = FitParams(),
    *,
    evaluation: EvalSettings = SCAN_EVALUATION,
    run: RunSettings = SCAN_RUN,
    keep_work: bool = False,
    artifacts_dir: str | None = None,
    out_dir: str | None = None,
) -> dict:
    """Fit SOAP at several blocks (``layers``: all, last, or block indices) from one extraction
    pass; SI per layer and, with ``evaluation.evaluations``, the zero-shot evaluations per layer.
    ``run``: the store chunk (= forward batch), dtype, work folder (None: a temporary one,
    removed unless ``keep_work``) and progress bars. Returns a JSON-able summary (also written
    to ``<out_dir>/scan.json`` with ``si_vs_depth.png`` and ``metrics_vs_depth.png``)."""
    from soapflow.backbones import load_backbone
    from soapflow.sources import open_source

    if data.n_real is not None and data.n_real < 2:
        raise SoapError(f"--n must be ≥ 2 real images, got {data.n_real}")
    n, synth, seed, progress = data.n_real, data.synthetic, data.seed, run.progress
    batch_size, dtype, work_dir = run.chunk, run.dtype, run.workdir
    t0 = time.perf_counter()
    bb = load_backbone(backbone.name, weights=backbone.weights, layer=-1, feature=backbone.feature,
                       image_size=backbone.image_size, device=backbone.device or "cpu", final_norm=backbone.final_norm)
    layer_list = parse_layers(layers, bb.depth)
    real_src = open_source(data.real, n=n, seed=seed)
    synth_src = open_source(synth, n=data.n_synth or n or len(real_src), seed=seed)
    own_work = work_dir is None
    work = work_dir or tempfile.mkdtemp(prefix="soap-scan-")
    os.makedirs(work, exist_ok=True)
    timing = {}
    try:
        stores = os.path.join(work, "stores")
        real_uris = _extract_layers(bb, real_src, layer_list, os.path.join(stores, "real"), batch_size, dtype,
                                    progress, f"extract {data.real}")
        synth_uris = _extract_layers(bb, synth_src, layer_list, os.path.join(stores, "synthetic"), batch_size, dtype,
                                     progress, f"extract {synth}")
        timing["extract"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        fits = _fit_layers(real_uris, synth_uris, artifacts_dir, fit, progress)
        timing["fit"] = round(time.perf_counter() - t1, 2)

        reports: dict[int, dict[str, dict]] = {}
        if evaluation.evaluations:
            t2 = time.perf_counter()
            reports = _evaluate_layers(bb, fits, evaluation, os.path.join(work, "tokens"), progress)
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
        "fit": {"mu": fit.mu_label, "tau": fit.tau, "gamma": fit.gamma, "threshold": fit.threshold,
                "store_dtype": dtype},
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


def _extract_layers(bb, source, layers, root, chunk, dtype, progress, desc) -> dict[int, str]:
    from soapflow.extract import extract_layers

    uris = {l: os.path.join(root, f"L{l}") for l in layers}
    extract_layers(bb, source, uris, chunk=chunk, dtype=dtype, progress=progress, desc=desc)
    return uris


def _fit_layers(real_uris, synth_uris, artifacts_dir, params: FitParams, progress: bool) -> dict[int, LayerFit]:
    """Each block's fit with ``soapflow.fit`` on one local cluster (started once for all)."""
    from soapflow.cluster import dask_client
    from soapflow.fit import fit_stores, fit_to_artifact

    fits = {}
    with dask_client() as client:
        for l in real_uris:
            art = None
            if artifacts_dir:
                path, fit, manifest = fit_to_artifact(real_uris[l], synth_uris[l], os.path.join(artifacts_dir, f"L{l}"),
                                                      params, cluster=client, overwrite=True, progress=progress)
                art, n_real, n_synth = str(path), manifest["n_real_images"], manifest["n_synth_images"]
            else:
                fit, inputs = fit_stores(real_uris[l], synth_uris[l], params, client=client, progress=progress)
                n_real, n_synth = inputs.n_real_images, inputs.n_synth_images
            fits[l] = LayerFit(l, fit, n_real, n_synth, real_uris[l], synth_uris[l], art)
    return fits


def _evaluate_layers(bb, fits: dict[int, LayerFit], settings: EvalSettings, cache_dir: str, progress: bool):
    from soapflow.evaluation import run as R
    from soapflow.evaluation.datasets import open_eval_data
    from soapflow.evaluation.tokens import extract_tokens
    from soapflow.head import SOAPHead

    import torch

    layers = sorted(fits)
    s = settings
    data = open_eval_data(s.dataset, n=s.n)
    with_cls = "knn-cls" in s.evaluations
    # one pass per dataset for all layers; the per-layer runs below then read the cache
    extract_tokens(bb, data, layers, n=s.n, batch_size=s.batch_size, cache_dir=cache_dir, with_cls=with_cls,
                   progress=progress, desc=f"tokens {data.spec}")
    bank_data = None
    if "knn-seg" in s.evaluations or "knn-cls" in s.evaluations:
        bank_data = open_eval_data(R._bank_spec(data, s.bank), n=s.bank_n)
        extract_tokens(bb, bank_data, layers, n=s.bank_n, batch_size=s.batch_size, cache_dir=cache_dir,
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
        common = dict(dataset=data, cache_dir=cache_dir, progress=progress)
        if "salient" in s.evaluations:
            reports[l]["salient"] = R.run_salient(ctx, s, **common)
        if "knn-seg" in s.evaluations:
            reports[l]["knn-seg"] = R.run_knn_seg(ctx, s, bank=bank_data, **common)
        if "knn-cls" in s.evaluations:
            reports[l]["knn-cls"] = R.run_knn_cls(ctx, s, bank=bank_data, **common)
    return reports
