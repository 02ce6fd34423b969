"""What the planted benchmark's SOAP removes besides the plant: the clean tokens' own positional
mean along each planted pattern (g_j, see soapflow/evaluation/planted.py).

    nice -n 5 .venv/bin/python benchmarks/planted_natural.py --work-dir /tmp/soapflow-planted

Reads the clean stores a ``benchmarks/planted.py`` run left in --work-dir, subtracts
``Σ_j a_j(h, w)·g_j`` for a set of the planted patterns from the clean evaluation tokens (nothing
planted), and reports TokenCut max Fβ against the clean tokens with the paired bootstrap CI.
When the planted fit removes ``c_j·u_j + g_j``, it removes this natural part too.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soapflow.evaluation import planted as PL  # noqa: E402
from soapflow.evaluation import protocols as P  # noqa: E402
from soapflow.evaluation.datasets import open_eval_data  # noqa: E402
from soapflow.storage.feature_store import FeatureStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work-dir", default="/tmp/soapflow-planted")
    ap.add_argument("--eval-data", default="fashion-mnist:test")
    ap.add_argument("--tau", type=float, default=0.2)
    ap.add_argument("--n-boot", type=int, default=2000)
    a = ap.parse_args()

    real = FeatureStore.open(os.path.join(a.work_dir, "clean", "real"))
    ev = FeatureStore.open(os.path.join(a.work_dir, "clean", "eval"))
    pats, freqs = PL.cosine_patterns(real.grid, 4)
    g = PL.natural_pattern_components(PL._position_mean(real), pats)
    size = int(ev.attrs.get("image_size"))
    masks = open_eval_data(a.eval_data, n=ev.count).masks(range(ev.count), size)
    q = np.asarray(ev.tokens[:])
    base = P.tokencut_images(PL.TokenView(q), masks, tau=a.tau, progress=False)
    print(f"{ev.attrs.get('backbone')} layer {ev.attrs.get('layer')}, {a.eval_data} n={ev.count}, TokenCut τ={a.tau}")
    print("| patterns removed (f_y, f_x) | ‖g_j‖ | clean | clean − Σ a_j g_j | Δ [95% CI] |")
    print("|---|---|---:|---:|---|")
    for sel in ([0], [1], [2], [3], [0, 1], [0, 1, 2, 3]):
        field = -np.einsum("khw,kd->hwd", pats[sel], g[sel]).astype(np.float32)
        run = P.tokencut_images(PL.TokenView(q, field), masks, tau=a.tau, progress=False)
        p = P.compare_salient(base, run, n_boot=a.n_boot)["max_fbeta"]
        lo, hi = p.delta_ci
        print(f"| {', '.join(str(freqs[j]) for j in sel)} | {', '.join(f'{np.linalg.norm(g[j]):.2f}' for j in sel)} | "
              f"{100 * p.raw:.2f} | {100 * p.soap:.2f} | {100 * p.delta:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] |")


if __name__ == "__main__":
    main()
