"""Figures written next to an artifact: what a person looks at to trust a fit.

Each plot has a ``*_figure`` function returning the matplotlib figure (what tests inspect) and
a ``*_plot`` function returning it as PNG bytes (what the artifact and the HTML report hold).
Titles say which backbone, layer and images the fit came from, taken from the manifest.
"""

from __future__ import annotations

import io

import numpy as np

SUPPRESSED_COLOR = "tab:red"
RANK_NOTE = "rank = position in eigenvalue order (0 = most variance)"


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def suppressed_mask(scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Components (rank order) the projector removes: the manifest's ``n_suppressed`` rule."""
    return np.asarray(weights) > 0.5 * np.asarray(scores)


def fit_description(manifest: dict | None) -> str:
    """``dinov2_vits14 · layer 11 (out) · n = 50 real + 50 synthetic images`` from a manifest."""
    m = manifest or {}
    parts = []
    if m.get("backbone"):
        parts.append(str(m["backbone"]))
    if m.get("layer") is not None:
        feature = m.get("feature") or "out"
        parts.append(f"layer {m['layer']}" + ("" if feature == "out" else f" ({feature})"))
    n_real, n_synth = m.get("n_real_images"), m.get("n_synth_images")
    if n_real is not None:
        parts.append(f"n = {n_real} real + {n_synth} synthetic images" if n_synth is not None else f"n = {n_real}")
    if m.get("name") and m.get("version"):
        parts.append(f"{m['name']}:{m['version']}")
    return " · ".join(parts)


def si_scores_figure(scores: np.ndarray, weights: np.ndarray, threshold: float, manifest: dict | None = None):
    """SI scores sorted descending on a linear axis, the threshold and the suppressed components.

    Left: every component; right: the most invariant ones, each labelled with its rank."""
    plt = _pyplot()
    scores, weights = np.asarray(scores, np.float64), np.asarray(weights, np.float64)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    suppressed = suppressed_mask(scores, weights)[order]
    above = int(np.count_nonzero(scores > threshold))
    top = min(len(scores), 12)

    # the threshold always lies inside the y range, with room above the highest score for labels
    lo, hi = float(min(sorted_scores.min(), threshold)), float(max(sorted_scores.max(), threshold))
    pad = max(0.06 * (hi - lo), 0.02)
    ylim = (lo - pad, hi + 3 * pad)

    # a second panel zooms on the most invariant components when the full axis is too crowded
    zoom = len(scores) > 2 * top
    if zoom:
        fig, (ax_all, ax_top) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]},
                                             sharey=True)
    else:
        fig, ax_all = plt.subplots(figsize=(7, 3.8))
        ax_top = ax_all
    x = np.arange(len(scores))
    ax_all.plot(x, sorted_scores, color="0.35", lw=1.2, marker=None if zoom else "o", ms=4, label="SI score")
    if zoom:
        ax_top.plot(x[:top], sorted_scores[:top], color="0.35", lw=1, marker="o", ms=4)
    for ax in {ax_all, ax_top}:
        ax.axhline(threshold, color="tab:blue", ls="--", lw=1.2,
                   label=f"threshold {threshold:g} ({above} component{'s' if above != 1 else ''} above)")
        ax.scatter(x[suppressed], sorted_scores[suppressed], s=42, color=SUPPRESSED_COLOR, zorder=3,
                   label=f"suppressed ({int(suppressed.sum())})")
        ax.set_xscale("linear")
        ax.grid(True, axis="y", color="0.9")
    for i in range(top):
        ax_top.annotate(f"r{order[i]}", (i, sorted_scores[i]), textcoords="offset points", xytext=(0, 5),
                        ha="center", va="bottom", rotation=90, fontsize=7.5,
                        color=SUPPRESSED_COLOR if suppressed[i] else "0.3")
    if zoom:
        ax_all.set_xlim(-0.01 * len(scores), len(scores) - 1 + 0.01 * len(scores))
        ax_top.set_xlim(-0.6, top - 0.4)
        ax_top.set_xticks(range(0, top, 2 if top > 8 else 1))
        ax_top.set_xlabel(f"the {top} most invariant (label: rN = eigenvalue rank N)")
    else:
        ax_all.set_xlim(-0.6, len(scores) - 0.4)
    ax_all.set_ylim(*ylim)
    ax_all.set_xlabel("component, sorted by SI score (0 = most invariant)"
                      + ("" if zoom else "; label rN = eigenvalue rank N"))
    ax_all.set_ylabel("SI score")
    ax_all.legend(loc="upper right", fontsize=8, framealpha=0.9)
    desc = fit_description(manifest)
    fig.suptitle("Semantic-invariance (SI) scores" + (f"\n{desc}" if desc else ""), fontsize=11)
    fig.tight_layout()
    return fig


def si_scores_plot(scores: np.ndarray, weights: np.ndarray, threshold: float, manifest: dict | None = None) -> bytes:
    return _figure_bytes(si_scores_figure(scores, weights, threshold, manifest))


MAX_ROWS = 8


def shown_components(scores: np.ndarray, weights: np.ndarray, top: int = 6) -> list[int]:
    """Ranks shown in the response maps: the suppressed ones (at most ``MAX_ROWS``), then the
    most invariant others, ``top`` in all, in descending SI order."""
    order = [int(d) for d in np.argsort(-np.asarray(scores), kind="stable")]
    supp = suppressed_mask(scores, weights)
    chosen = [d for d in order if supp[d]][:max(MAX_ROWS, top)]
    chosen += [d for d in order if not supp[d]][: max(top - len(chosen), 0)]
    return sorted(chosen, key=order.index)


def response_maps_figure(p: np.ndarray, q: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None,
                         manifest: dict | None = None, top: int = 6):
    """Per component (one row each): P (real), Q (synthetic) and |P − Q| side by side, with
    colorbars; suppressed components framed in red."""
    plt = _pyplot()
    if weights is None:
        weights = np.zeros_like(scores)
    comps = shown_components(scores, weights, top)
    supp = suppressed_mask(scores, weights)
    diff = np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64))
    dmax = max(float(diff[:, :, comps].max()) if comps else 0.0, 1e-3)
    h, w = p.shape[:2]
    cell = 1.5 * max(w / h, 0.5)
    fig, axes = plt.subplots(len(comps), 3, figsize=(3 * cell + 3.2, 1.5 * len(comps) + 1.3), squeeze=False,
                             layout="constrained")
    columns = ("P: real images", "Q: synthetic images", "|P − Q|")
    pq_image = d_image = None
    for row, d in enumerate(comps):
        for col in range(3):
            ax = axes[row, col]
            if col < 2:
                pq_image = ax.imshow((p if col == 0 else q)[:, :, d], vmin=0, vmax=1, cmap="viridis")
            else:
                d_image = ax.imshow(diff[:, :, d], vmin=0, vmax=dmax, cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=10)
            if supp[d]:
                for spine in ax.spines.values():
                    spine.set_edgecolor(SUPPRESSED_COLOR)
                    spine.set_linewidth(3)
        label = f"rank {d}\nSI {scores[d]:.3f}" + ("\nSUPPRESSED" if supp[d] else "")
        axes[row, 0].set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center", labelpad=8,
                                color=SUPPRESSED_COLOR if supp[d] else "black",
                                fontweight="bold" if supp[d] else "normal")
    if comps:
        fig.colorbar(pq_image, ax=axes[:, 1], shrink=0.6, label="P, Q: fraction of images where the component fires")
        fig.colorbar(d_image, ax=axes[:, 2], shrink=0.6, label="|P − Q|")
    desc = fit_description(manifest)
    n_supp = int(supp.sum())
    hidden = n_supp - int(supp[comps].sum()) if comps else 0
    fig.suptitle("Response maps of the most invariant components" + (f"\n{desc}" if desc else "")
                 + (f"\n{n_supp - hidden} of {n_supp} suppressed components shown" if hidden else "")
                 + f"\n{RANK_NOTE}; red = suppressed", fontsize=10)
    return fig


def response_maps_plot(p: np.ndarray, q: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None,
                       manifest: dict | None = None, top: int = 6) -> bytes:
    return _figure_bytes(response_maps_figure(p, q, scores, weights, manifest, top))


def artifact_plots(tensors: dict, manifest: dict) -> dict[str, bytes]:
    """The plots of an artifact from its tensors and manifest (what ``fit_plots`` writes)."""
    threshold = manifest.get("threshold")
    return {
        "plots/si_scores.png": si_scores_plot(tensors["scores"], tensors["weights"],
                                              0.75 if threshold is None else float(threshold), manifest),
        "plots/response_maps.png": response_maps_plot(tensors["p"], tensors["q"], tensors["scores"],
                                                      tensors["weights"], manifest),
    }


def fit_plots(fit, manifest: dict | None = None) -> dict[str, bytes]:
    return {
        "plots/si_scores.png": si_scores_plot(fit.scores, fit.weights, fit.threshold, manifest),
        "plots/response_maps.png": response_maps_plot(fit.p, fit.q, fit.scores, fit.weights, manifest),
    }
