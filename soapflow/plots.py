"""Figures written next to an artifact: what a person looks at to trust a fit."""

from __future__ import annotations

import io

import numpy as np

from soapflow import method


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


def si_scores_plot(scores: np.ndarray, weights: np.ndarray, threshold: float) -> bytes:
    """SI scores sorted descending, suppressed components highlighted."""
    plt = _pyplot()
    order = np.argsort(-scores, kind="stable")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    suppressed = method.suppressed(weights[order], scores[order])
    ax.plot(np.arange(len(scores)), scores[order], color="0.3", lw=1)
    ax.scatter(np.flatnonzero(suppressed), scores[order][suppressed], color="tab:red", zorder=3,
               label=f"suppressed ({int(suppressed.sum())})")
    ax.axhline(threshold, color="tab:blue", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("component, sorted by SI score")
    ax.set_ylabel("SI score")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)
    ax.legend(loc="upper right")
    ax.set_title("Semantic-invariance scores")
    return _figure_bytes(fig)


def response_maps_plot(p: np.ndarray, q: np.ndarray, scores: np.ndarray, top: int = 6) -> bytes:
    """P (real) and Q (synthetic) maps of the most invariant components, side by side."""
    plt = _pyplot()
    order = np.argsort(-scores, kind="stable")[: min(top, len(scores))]
    fig, axes = plt.subplots(2, len(order), figsize=(2.1 * len(order), 4.6), squeeze=False)
    for col, d in enumerate(order):
        for row, (maps, label) in enumerate(((p, "P real"), (q, "Q synthetic"))):
            ax = axes[row, col]
            ax.imshow(maps[:, :, d], vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"rank {d}\nSI {scores[d]:.3f}", fontsize=9)
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle("Activation frequency per position (top SI components)")
    return _figure_bytes(fig)


def fit_plots(fit) -> dict[str, bytes]:
    return {
        "plots/si_scores.png": si_scores_plot(fit.scores, fit.weights, fit.threshold),
        "plots/response_maps.png": response_maps_plot(fit.p, fit.q, fit.scores),
    }
