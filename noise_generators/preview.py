"""A PNG contact sheet of generators: one row per generator, one column per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from soapflow.noise_generators import IMAGENET_MEAN, IMAGENET_STD, generate


def preview_grid(path, names, count=6, size=224, seed=0, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Path:
    """Write the grid to ``path`` (PNG); images are unnormalized with mean/std and clipped to [0, 1]."""
    path = Path(path)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    rows = [generate(n, count, size, seed=seed, mean=mean, std=std).numpy() for n in names]
    fig = Figure(figsize=(1.6 * count + 1.2, 1.6 * len(names)), dpi=100)  # no pyplot: no global state
    axes = fig.subplots(len(names), count, squeeze=False)
    for name, images, axrow in zip(names, rows, axes):
        for col, (img, ax) in enumerate(zip(images, axrow)):
            rgb = np.clip(img * s + m, 0.0, 1.0)
            ax.imshow(rgb.transpose(1, 2, 0) if rgb.shape[0] == 3 else rgb.mean(0), cmap="gray",
                      vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
    fig.suptitle(f"noise generators — seed {seed}, {size}×{size}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
