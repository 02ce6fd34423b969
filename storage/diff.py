"""What changed between two projection artifacts (``soap registry diff``): parameters, the
suppressed subspaces (principal angles, best-aligned components), scores and the projector."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from soapflow.errors import SoapError
from soapflow.method import suppressed
from soapflow.storage.artifact import final_norm_of


def same_value(a: Any, b: Any) -> bool:
    """Equal, numbers to a relative 1e-9 (a manifest value read back from JSON)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    return a == b


def dotted(d: dict, key: str) -> Any:
    """``d["stores"]["real"]["uri"]`` for the key ``stores.real.uri``; None where any part is missing."""
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def suppressed_rows(tensors: dict) -> np.ndarray:
    return np.flatnonzero(suppressed(tensors["weights"], tensors["scores"]))


DIFF_KEYS = (
    "backbone", "weights", "layer", "feature", "final_norm", "image_size", "grid", "dim", "mu", "mu_mode", "tau",
    "gamma", "threshold", "suppress", "n_suppressed", "n_real_images", "n_synth_images",
    "stores.real.uri", "stores.real.fingerprint", "stores.synthetic.uri", "stores.synthetic.fingerprint",
)


def diff_artifacts(a: tuple[str, Any], b: tuple[str, Any]) -> dict:
    """Compare two loaded artifacts (``(label, Artifact)`` each)."""
    from scipy.linalg import subspace_angles

    (la, art_a), (lb, art_b) = a, b
    ta, tb = art_a.tensors, art_b.tensors
    da, db = ta["projector"].shape[0], tb["projector"].shape[0]
    if da != db:
        raise SoapError(f"cannot diff {la} (D={da}) and {lb} (D={db}): token dimensions differ")
    sa, sb = suppressed_rows(ta), suppressed_rows(tb)
    ca, cb = ta["components"].astype(np.float64), tb["components"].astype(np.float64)
    if len(sa) and len(sb):
        angles = np.degrees(subspace_angles(ca[sa].T, cb[sb].T))
        angles = sorted(float(x) for x in angles)
    else:
        angles = []
    # each suppressed component of A against its best-aligned component of B (and back)
    def matches(src_rows, c_src, c_dst, t_src, t_dst):
        out = []
        for r in src_rows:
            cos = np.abs(c_dst @ c_src[r])
            j = int(np.argmax(cos))
            out.append({
                "rank": int(r), "match_rank": j, "abs_cos": float(cos[j]),
                "score": float(t_src["scores"][r]), "match_score": float(t_dst["scores"][j]),
                "score_change": float(t_dst["scores"][j] - t_src["scores"][r]),
                "weight": float(t_src["weights"][r]), "match_weight": float(t_dst["weights"][j]),
            })
        return out

    pa = ta["projector"].astype(np.float64)
    pb = tb["projector"].astype(np.float64)
    fro = float(np.linalg.norm(pa - pb))
    k = min(len(ta["scores"]), 10)
    params = {}
    for key in DIFF_KEYS:
        va, vb = dotted(art_a.manifest, key), dotted(art_b.manifest, key)
        if key == "final_norm":
            va, vb = final_norm_of(art_a.manifest), final_norm_of(art_b.manifest)
        if not same_value(va, vb):
            params[key] = [va, vb]
    return {
        "a": la,
        "b": lb,
        "same_content": art_a.content_hash == art_b.content_hash,
        "dim": da,
        "n_suppressed": [int(len(sa)), int(len(sb))],
        "suppressed_ranks": [[int(x) for x in sa], [int(x) for x in sb]],
        "principal_angles_deg": angles,
        "max_principal_angle_deg": max(angles) if angles else None,
        "matches_a_to_b": matches(sa, ca, cb, ta, tb),
        "matches_b_to_a": matches(sb, cb, ca, tb, ta),
        "score_change_by_rank": [
            {"rank": i, "a": float(ta["scores"][i]), "b": float(tb["scores"][i]),
             "change": float(tb["scores"][i] - ta["scores"][i])}
            for i in range(k)
        ],
        "projector_frobenius": fro,
        "projector_frobenius_relative": fro / max(float(np.linalg.norm(pa)), 1e-30),
        "parameters": params,
    }
