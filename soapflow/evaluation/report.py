"""Reports: one JSON-able dict per evaluation, tables (markdown / rich / rows), PNG grids.

Report schema (``schema`` 1)::

    {
      "schema": 1, "evaluation": "salient" | "knn-seg" | "knn-cls",
      "head": {ref, name, version, content_hash, backbone, weights, layer, feature, image_size},
      "dataset": {spec, layout, count, ...}, "n_images": N,
      "config": {...protocol parameters...},
      "metrics": {
        "<metric>": {
          "raw":   {"value": v, "ci95": [lo, hi]},
          "soap":  {"value": v, "ci95": [lo, hi]},
          "delta": {"value": soap − raw, "ci95": [lo, hi], "significant": bool,
                    "improved": i, "worsened": w, "unchanged": u, "n": N, "n_boot": B, "seed": s}
        }, ...
      },
      "timing_s": {...}, "grid_png": path | null
    }
"""

from __future__ import annotations

import json
import os

import numpy as np

from soapflow.common import utc_now

from soapflow.evaluation.stats import Paired

__all__ = [
    "SCHEMA",
    "make_report",
    "write_json",
    "table_rows",
    "resolved_head",
    "head_label",
    "evaluation_label",
    "delta_text",
    "markdown_table",
    "print_report",
    "save_mask_grid",
    "save_label_grid",
]

SCHEMA = 1


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def make_report(
    evaluation: str,
    metrics: dict[str, Paired],
    *,
    head: dict,
    dataset: dict,
    n_images: int,
    config: dict,
    timing_s: dict | None = None,
    grid_png: str | None = None,
    extra: dict | None = None,
) -> dict:
    from soapflow import __version__

    return _jsonable(
        {
            "schema": SCHEMA,
            "evaluation": evaluation,
            "head": head,
            "dataset": dataset,
            "n_images": int(n_images),
            "config": config,
            "metrics": {name: p.to_dict() for name, p in metrics.items()},
            "timing_s": timing_s or {},
            "grid_png": grid_png,
            "soapflow_version": __version__,
            "created": utc_now(),
            **(extra or {}),
        }
    )


def write_json(path: str | os.PathLike, report) -> str:
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_jsonable(report), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def evaluation_label(report: dict, long: bool = False) -> str:
    """What was evaluated, with its settings: compact for tables and plot titles (``salient τ=0.2``),
    or ``long`` for the docs (``TokenCut τ=0.2``)."""
    ev = report.get("evaluation", "?")
    cfg = report.get("config", {})
    k = cfg.get("k")
    if ev == "salient":
        tau, stau = cfg.get("tau"), cfg.get("soap_tau")
        if stau in (None, tau):
            t = f"τ={tau:g}"
        else:
            t = f"τ raw {tau:g} / SOAP {stau:g}" if long else f"τ raw={tau:g}/SOAP={stau:g}"
        fg = cfg.get("foreground", "seed")
        where = "" if fg == "seed" else (f", {fg} foreground" if long else f" fg={fg}")
        return ("TokenCut " if long else "salient ") + t + where
    if ev == "knn-seg":
        return f"patch kNN seg (k={k}, {cfg.get('n_classes', '?')} classes)" if long else f"knn-seg k={k}"
    if ev == "knn-cls":
        return f"kNN classification (k={k})" if long else f"knn-cls k={k}"
    return ev


def resolved_head(report: dict) -> str:
    """The head as evaluated: ``name:version`` for a registry version (what an alias such as
    ``@latest`` resolved to), else the ref (an artifact directory)."""
    head = report.get("head", {})
    if head.get("name") and head.get("version"):
        return f"{head['name']}:{head['version']}"
    return str(head.get("ref"))


def head_label(report: dict) -> str:
    """``ref → name:version`` when the ref was an alias or a bare name, else the version."""
    ref, pinned = str(report.get("head", {}).get("ref")), resolved_head(report)
    return pinned if ref == pinned else f"{ref} → {pinned}"


def _significant(delta: dict) -> bool:
    if "significant" in delta:
        return bool(delta["significant"])
    lo, hi = delta.get("ci95", [None, None])
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def table_rows(report: dict, scale: float = 100.0) -> list[dict]:
    """One row per metric: values in percent (``scale``), CI of Δ, whether the CI excludes 0,
    improved/worsened/unchanged image counts and the head version evaluated."""
    rows = []
    head = report.get("head", {})
    for name, m in report.get("metrics", {}).items():
        raw, soap, delta = m["raw"], m["soap"], m["delta"]
        lo, hi = delta.get("ci95", [None, None])
        rows.append(
            {
                "head": resolved_head(report),
                "layer": head.get("layer"),
                "evaluation": evaluation_label(report),
                "metric": name,
                "n": delta.get("n"),
                "raw": round(raw["value"] * scale, 2),
                "soap": round(soap["value"] * scale, 2),
                "delta": round(delta["value"] * scale, 2),
                "delta_ci95_low": round(lo * scale, 2) if lo is not None else None,
                "delta_ci95_high": round(hi * scale, 2) if hi is not None else None,
                "significant": _significant(delta),
                "improved": delta.get("improved"),
                "worsened": delta.get("worsened"),
                "unchanged": delta.get("unchanged"),
            }
        )
    return rows


def delta_text(row: dict) -> str:
    """``+1.52 [+0.68, +2.29]*``: Δ, its 95% CI, ``*`` when the CI excludes 0 (as the README)."""
    if row["delta_ci95_low"] is None:
        return f"{row['delta']:+.2f}"
    return (f"{row['delta']:+.2f} [{row['delta_ci95_low']:+.2f}, {row['delta_ci95_high']:+.2f}]"
            + ("*" if row["significant"] else ""))


SIGNIFICANCE_NOTE = "Δ = SOAP − raw, paired bootstrap 95% CI over images; * = the CI excludes 0"


def markdown_table(reports: list[dict], scale: float = 100.0) -> str:
    """A markdown table of several reports (values in %, Δ with its paired 95% bootstrap CI)."""
    lines = [
        "| head | layer | evaluation | metric | n | raw | SOAP | Δ (SOAP − raw) [95% CI] | improved / worsened / unchanged |",
        "|---|---:|---|---|---:|---:|---:|---|---:|",
    ]
    for rep in reports:
        for r in table_rows(rep, scale):
            lines.append(
                f"| {r['head']} | {r['layer']} | {r['evaluation']} | {r['metric']} | {r['n']} | {r['raw']:.2f} | "
                f"{r['soap']:.2f} | {delta_text(r)} | {r['improved']} / {r['worsened']} / {r['unchanged']} |"
            )
    return "\n".join(lines) + f"\n\n{SIGNIFICANCE_NOTE}."


def print_report(report: dict, console=None) -> None:
    """A rich table of one report."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    head = report.get("head", {})
    title = f"{evaluation_label(report)} — {report.get('dataset', {}).get('spec')} (n={report.get('n_images')}), " \
            f"{head.get('backbone')} layer {head.get('layer')}, head {head_label(report)}"
    table = Table(title=title)
    table.add_column("metric")
    for col in ("raw", "SOAP", "Δ [95% CI]"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("images improved / worsened / unchanged", justify="right")
    for r in table_rows(report):
        table.add_row(r["metric"], f"{r['raw']:.2f}", f"{r['soap']:.2f}", delta_text(r),
                      f"{r['improved']} / {r['worsened']} / {r['unchanged']}")
    console.print(table)
    n_boot = next(iter(report["metrics"].values()))["delta"].get("n_boot") if report.get("metrics") else 0
    console.print(f"values in %; {SIGNIFICANCE_NOTE} ({n_boot} resamples)")
    if report.get("grid_png"):
        console.print(f"grid: {report['grid_png']}")


# ---------------------------------------------------------------------------- PNG grids


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_grid(path: str, images: np.ndarray, gts: np.ndarray, columns: dict[str, np.ndarray],
               title: str | None, show_map) -> str:
    """Rows = images; columns = image, ground truth, then each named set of maps, each map
    drawn by ``show_map(ax, map)``."""
    plt = _pyplot()
    k = len(images)
    ncol = 2 + len(columns)
    fig, axes = plt.subplots(k, ncol, figsize=(1.9 * ncol, 1.9 * k + (0.4 if title else 0)), squeeze=False)
    for i in range(k):
        panels = [("ground truth", gts[i])] + [(name, cols[i]) for name, cols in columns.items()]
        axes[i, 0].imshow(images[i], interpolation="nearest")
        for ax, (_, arr) in zip(axes[i, 1:], panels):
            show_map(ax, arr)
        for ax, name in zip(axes[i], ["image"] + [name for name, _ in panels]):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_mask_grid(path: str, images: np.ndarray, gts: np.ndarray, columns: dict[str, np.ndarray],
                   title: str | None = None) -> str:
    """Rows = images; columns = image, ground truth, then each named mask set (raw, SOAP, …)."""
    return _save_grid(path, images, gts, columns, title,
                      lambda ax, m: ax.imshow(m, cmap="gray", vmin=0, vmax=1, interpolation="nearest"))


def save_label_grid(path: str, images: np.ndarray, gts: np.ndarray, columns: dict[str, np.ndarray], n_classes: int,
                    title: str | None = None) -> str:
    """Like :func:`save_mask_grid` for label maps (one colour per class; 255 = ignore, left blank)."""
    cmap = _pyplot().get_cmap("tab20", max(n_classes, 2))
    return _save_grid(path, images, gts, columns, title,
                      lambda ax, m: ax.imshow(np.ma.masked_equal(np.asarray(m), 255), cmap=cmap,
                                              vmin=-0.5, vmax=n_classes - 0.5, interpolation="nearest"))
