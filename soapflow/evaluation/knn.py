"""k-nearest-neighbour probes (SPEC §5): patch kNN segmentation and kNN classification.

Similarity is cosine (tokens L2-normalised, one matrix product per query block). The label of a
query is the **majority vote** of its ``k`` nearest bank items; ties between classes with the
same count go to the class whose voters have the larger summed similarity (deterministic).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "knn_predict",
    "patch_labels",
    "subsample_bank",
    "normalize",
]


def normalize(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    return torch.nn.functional.normalize(t, dim=-1, eps=1e-12)


def knn_predict(
    queries,
    bank,
    bank_labels,
    k: int,
    n_classes: int | None = None,
    *,
    block: int = 4096,
    bank_normalized: bool = False,
) -> np.ndarray:
    """Majority-vote labels ``(M,)`` of queries ``(M, D)`` among bank items ``(N, D)`` with
    integer labels ``(N,)`` (cosine similarity, ``k`` nearest; ``k`` is capped at ``N``)."""
    q = normalize(queries)
    b = bank if bank_normalized and isinstance(bank, torch.Tensor) else normalize(bank)
    labels = torch.as_tensor(np.asarray(bank_labels), dtype=torch.int64)
    if q.ndim != 2 or b.ndim != 2 or q.shape[1] != b.shape[1]:
        raise ValueError(f"queries (M, D) and bank (N, D) must share D, got {tuple(q.shape)} and {tuple(b.shape)}")
    if len(labels) != len(b):
        raise ValueError(f"bank has {len(b)} items but {len(labels)} labels")
    if len(b) == 0:
        raise ValueError("the kNN bank is empty")
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    k = min(int(k), len(b))
    c = int(n_classes if n_classes is not None else int(labels.max()) + 1)
    out = np.empty(len(q), dtype=np.int64)
    bt = b.T.contiguous()
    for start in range(0, len(q), block):
        sim = q[start : start + block] @ bt
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = labels[top_idx]  # (m, k)
        counts = torch.zeros(len(votes), c, dtype=torch.float64)
        counts.scatter_add_(1, votes, torch.ones_like(votes, dtype=torch.float64))
        simsum = torch.zeros(len(votes), c, dtype=torch.float64)
        simsum.scatter_add_(1, votes, top_sim.double())
        # |simsum| ≤ k, so the tie-break term is < 0.5 and never overturns a count
        score = counts + simsum / (2 * k + 2)
        score[counts == 0] = -1.0
        out[start : start + block] = score.argmax(1).numpy()
    return out


def patch_labels(label_map: np.ndarray, grid: tuple[int, int], ignore_index: int = 255) -> np.ndarray:
    """Label of each patch of a pixel label map ``(S, S)``: the most frequent label among its
    pixels (ignoring ``ignore_index``; all-ignored patches get ``ignore_index``)."""
    lm = np.asarray(label_map, dtype=np.int64)
    h, w = grid
    s0, s1 = lm.shape
    if s0 % h or s1 % w:
        raise ValueError(f"label map {lm.shape} does not divide into a {h}x{w} grid")
    ph, pw = s0 // h, s1 // w
    blocks = lm.reshape(h, ph, w, pw).transpose(0, 2, 1, 3).reshape(h * w, ph * pw)
    valid = blocks != ignore_index
    top = int(blocks[valid].max()) + 1 if valid.any() else 1
    counts = np.zeros((h * w, top), dtype=np.int64)
    rows = np.repeat(np.arange(h * w), ph * pw).reshape(h * w, ph * pw)
    np.add.at(counts, (rows[valid], blocks[valid]), 1)
    out = counts.argmax(1)
    out[~valid.any(1)] = ignore_index
    return out.reshape(h, w)


def subsample_bank(n_items: int, max_items: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded random subset of ``max_items`` of ``n_items`` (all if None)."""
    if max_items is None or max_items >= n_items:
        return np.arange(n_items)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_items, size=int(max_items), replace=False))
