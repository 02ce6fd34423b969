"""Planted-artifact benchmark: does the pipeline find and remove what is really there?

    nice -n 5 .venv/bin/python benchmarks/planted.py [--n-real 300 --n-synth 300 --n-eval 300]
        [--k 1,2,4] [--amplitudes 0.5,1,2,4] [--work-dir /tmp/planted-work] [--json docs/data/planted.json]

The same engine as ``soap eval planted`` (soapflow/evaluation/planted.py): clean stores
extracted from DINOv2 ViT-S/14 on Fashion-MNIST (train for the fit and the kNN bank, test for
the evaluations) and noise:mixture; k cosine positional artifacts planted into every token at
amplitudes × λ_max of the clean real tokens; each planted pair of stores fitted by the dask fit
(μ = auto); recovery (principal angles of the suppressed subspace to the planted span) and the
zero-shot results of clean, clean+SOAP, planted and planted+SOAP. Prints the markdown table
(the one docs/results.md shows) and the time each stage took. The clean stores in --work-dir
are reused by a later run with the same inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from soapflow.config import EvalSettings  # noqa: E402
from soapflow.evaluation import planted as PL  # noqa: E402
from soapflow.evaluation.report import write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--layer", type=int, default=-1)
    ap.add_argument("--final-norm", default="auto", help="auto (after the last block only), on, off")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--data", default="fashion-mnist:train")
    ap.add_argument("--n-real", type=int, default=300)
    ap.add_argument("--synth", default="noise:mixture")
    ap.add_argument("--n-synth", type=int, default=300)
    ap.add_argument("--eval-data", default="fashion-mnist:test")
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--k", default="1,2,4")
    ap.add_argument("--amplitudes", default="0.5,1,2,4")
    ap.add_argument("--plant", default="quiet", help="quiet (patterns and directions the clean tokens are quiet along) or plain")
    ap.add_argument("--evaluate", default="salient,knn-seg,knn-cls", help="comma list, or 'none'")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work-dir", default="/tmp/soapflow-planted")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args()

    evals = () if a.evaluate == "none" else tuple(e.strip() for e in a.evaluate.split(","))
    planting = PL.Planting(ks=tuple(int(x) for x in a.k.split(",")),
                           amplitudes=tuple(float(x) for x in a.amplitudes.split(",")), seed=a.seed,
                           plant=a.plant)
    data = PL.PlantedData(backbone=a.backbone, weights=a.weights, layer=a.layer, final_norm=a.final_norm,
                          image_size=a.image_size, real=a.data,
                          n_real=a.n_real, synth=a.synth, n_synth=a.n_synth, eval_data=a.eval_data, n_eval=a.n_eval,
                          chunk=a.chunk, device=a.device, seed=a.seed)
    ev = EvalSettings(evaluations=evals, n_boot=a.n_boot, seed=a.seed)
    t0 = time.perf_counter()
    report = PL.run_planted(data, planting, ev, a.work_dir, progress=not a.quiet)
    if a.plot:
        report["plot_png"] = PL.plot_report(report, a.plot)
    if a.json:
        write_json(a.json, report)
    b = report["backbone"]
    print(f"{b.get('backbone')} layer {b.get('layer')} (final norm: {b.get('final_norm', 'n/a')}), "
          f"{a.data} {a.n_real} + {a.synth} {a.n_synth}, eval {a.eval_data} {a.n_eval}, "
          f"{len(report['runs'])} planted fits + 1 clean\n")
    print(PL.markdown_table(report))
    t = report["timing_s"]
    print(f"\ntime: extract {t['extract']} s, fits {t['fits']} s "
          f"({t['fits'] / (len(report['runs']) + 1):.1f} s per fit incl. planting the stores), "
          f"evaluate {t['evaluate']} s, total {time.perf_counter() - t0:.1f} s")
    s = report["summary"]
    print(f"every planted direction recovered at amplitudes ≥ 2×: {'yes' if s['recovered_at_2x_and_above'] else 'NO'}")
    if a.json:
        print(f"report: {a.json}")


if __name__ == "__main__":
    main()
