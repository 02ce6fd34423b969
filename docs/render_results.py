"""Render docs/results.md and the README's results table from the JSON that docs/results.sh writes.

    python docs/render_results.py [--data docs/data] [--out docs/results.md] [--readme README.md]

Every number on the page comes from these files, never typed by hand:

    docs/data/scan.json                      soap scan: SI per block + τ = 0.2 evaluations per block
    docs/data/salient-L<block>-tau*.json     soap eval salient: the other TokenCut τ pairings
    docs/data/planted.json                   the planted-artifact benchmark (optional; rendered with
                                             soapflow.evaluation.planted.markdown_table when present)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
README_BEGIN = "<!-- results:begin (docs/render_results.py) -->"
README_END = "<!-- results:end -->"
SCALE = 100.0


# ------------------------------------------------------------------------------------ loading


def load(data_dir: str) -> dict:
    """scan.json and the salient reports, keyed by block."""
    with open(os.path.join(data_dir, "scan.json")) as f:
        scan = json.load(f)
    extra: dict[int, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(data_dir, "salient-L*.json"))):
        with open(path) as f:
            rep = json.load(f)
        extra.setdefault(int(rep["head"]["layer"]), []).append(rep)
    return {"scan": scan, "extra": extra}


def blocks(data: dict) -> list[int]:
    """Blocks, last first (the default block leads every table)."""
    return sorted((int(s["layer"]) for s in data["scan"]["layers"]), reverse=True)


def summary(data: dict, block: int) -> dict:
    return next(s for s in data["scan"]["layers"] if int(s["layer"]) == block)


def reports(data: dict, block: int) -> list[dict]:
    """The block's reports in page order: scan's (τ = 0.2 salient, knn-seg, knn-cls), then the
    other τ pairings."""
    scan_reps = data["scan"].get("evaluations", {}).get(str(block), {})
    order = ["salient", "knn-seg", "knn-cls"]
    reps = [scan_reps[k] for k in order if k in scan_reps]
    extra = sorted(data["extra"].get(block, []), key=lambda r: (r["config"].get("tau"), r["config"].get("soap_tau") or 0))
    return reps[:1] + extra + reps[1:]


# ------------------------------------------------------------------------------------ labels


def pct(v: float) -> str:
    return f"{SCALE * v:.2f}"


def delta_text(d: dict) -> str:
    lo, hi = d["ci95"]
    star = " **\\***" if d.get("significant") else ""
    return f"{SCALE * d['value']:+.2f} [{SCALE * lo:+.2f}, {SCALE * hi:+.2f}]{star}"


def norm_text(s: dict) -> str:
    return "after" if s.get("final_norm") else "before"


# ------------------------------------------------------------------------------------ tables


def si_table(data: dict) -> str:
    thr = data["scan"]["fit"]["threshold"]
    lines = [
        f"| block | final norm | max SI | top SI scores (eigen rank) | # SI > {thr:g} | suppressed (μ = "
        f"{data['scan']['fit']['mu']:g}) | explained variance of PC 0 / 1 |",
        "|---:|---|---:|---|---:|---:|---|",
    ]
    for b in blocks(data):
        s = summary(data, b)
        top = ", ".join(f"{v:.3f} (r{r})" for v, r in zip(s["top_si"][:4], s["top_si_ranks"][:4]))
        ev = s.get("explained_variance_top", [])
        evs = " / ".join(f"{SCALE * v:.1f}%" for v in ev[:2])
        lines.append(f"| {b} | {norm_text(s)} | {s['max_si']:.3f} | {top} | {s['n_above_threshold']} | "
                     f"{s['n_suppressed']} | {evs} |")
    return "\n".join(lines)


def results_table(data: dict) -> str:
    from soapflow.evaluation.report import evaluation_label

    lines = [
        "| block | evaluation | metric | raw | SOAP | Δ SOAP − raw [95% CI] | improved / worsened |",
        "|---:|---|---|---:|---:|---|---:|",
    ]
    for b in blocks(data):
        for rep in reports(data, b):
            for metric, m in rep["metrics"].items():
                d = m["delta"]
                lines.append(f"| {b} | {evaluation_label(rep, long=True)} | {metric} | {pct(m['raw']['value'])} | "
                             f"{pct(m['soap']['value'])} | {delta_text(d)} | {d.get('improved')} / {d.get('worsened')} |")
    return "\n".join(lines)


def _find(data: dict, block: int, evaluation: str, metric: str, tau=None, soap_tau=None) -> dict | None:
    for rep in reports(data, block):
        cfg = rep.get("config", {})
        if rep["evaluation"] != evaluation or metric not in rep["metrics"]:
            continue
        if evaluation == "salient":
            if cfg.get("tau") != tau or (cfg.get("soap_tau") or cfg.get("tau")) != (soap_tau or tau):
                continue
            if cfg.get("foreground", "seed") != "seed":
                continue
        return rep["metrics"][metric]
    return None


README_ROWS = (
    ("TokenCut τ=0.2, max Fβ", "salient", "max_fbeta", 0.2, None),
    ("TokenCut raw τ=0.2 vs SOAP τ=0.3 (authors' pairing)", "salient", "max_fbeta", 0.2, 0.3),
    ("TokenCut τ=0.3, max Fβ", "salient", "max_fbeta", 0.3, None),
    ("patch kNN segmentation, mIoU", "knn-seg", "miou", None, None),
    ("kNN classification, class token top-1", "knn-cls", "top1_cls", None, None),
)


def readme_table(data: dict) -> str:
    lines = ["| block | tokens | evaluation | raw → SOAP (%) | Δ [95% CI] |", "|---:|---|---|---|---|"]
    for b in blocks(data):
        s = summary(data, b)
        for label, ev, metric, tau, stau in README_ROWS:
            m = _find(data, b, ev, metric, tau, stau)
            if m is None:
                continue
            delta = delta_text(m["delta"]).replace(" **\\***", "*")
            lines.append(f"| {b} | {norm_text(s)} final norm | {label} | {pct(m['raw']['value'])} → "
                         f"{pct(m['soap']['value'])} | {delta} |")
    return "\n".join(lines)


def si_sentence(data: dict) -> str:
    thr = data["scan"]["fit"]["threshold"]
    parts = []
    for b in blocks(data):
        s = summary(data, b)
        parts.append(f"block {b} ({norm_text(s)} the final norm) {s['n_above_threshold']} (max {s['max_si']:.3f})")
    return f"Components with SI > {thr:g}: " + "; ".join(parts) + "."


def sizes_sentence(data: dict) -> str:
    scan = data["scan"]
    b = blocks(data)[0]
    s = summary(data, b)
    first = reports(data, b)
    n_eval = first[0]["n_images"] if first else "?"
    seg = next((r for r in reports(data, b) if r["evaluation"] == "knn-seg"), None)
    bank = f", kNN bank {seg['config'].get('bank_images')} train images" if seg else ""
    n_real = scan["data"]["real"].get("count", "?")
    n_synth = scan["data"]["synthetic"].get("count", "?")
    return (f"Sizes: fit on {n_real} Fashion-MNIST train + {n_synth} `noise:mixture` images per block, "
            f"evaluated on {n_eval} test images{bank}; {scan['backbone']['image_size']} px.")


def planted_section(data_dir: str) -> str:
    path = os.path.join(data_dir, "planted.json")
    if not os.path.isfile(path):
        return ("_Not rendered: `docs/data/planted.json` is not there yet (write it with the planted-artifact "
                "benchmark, `soap eval planted --json docs/data/planted.json`, then rerun this script)._")
    try:
        from soapflow.evaluation.planted import markdown_table
    except ImportError as exc:
        return f"_Not rendered: `soapflow.evaluation.planted.markdown_table` is not available ({exc})._"
    with open(path) as f:
        report = json.load(f)
    d, bb = report.get("data", {}), report.get("backbone", {})
    head = (f"`{bb.get('backbone')}` block {bb.get('layer')} ({'after' if bb.get('final_norm') else 'before'} the final "
            f"norm), fit on {d.get('n_real')} `{d.get('real')}` + {d.get('n_synth')} `{d.get('synthetic')}` images, "
            f"evaluated on {d.get('n_eval')} `{d.get('eval')}` images, read from `docs/data/planted.json`; "
            "the same setup as a command:\n\n"
            f"    soap eval planted --backbone {bb.get('backbone')} --n-real {d.get('n_real')} --n-synth {d.get('n_synth')} "
            f"--n {d.get('n_eval')} --json docs/data/planted.json --plot docs/data/planted.png\n\n"
            "(the benchmark and its options: `soapflow/evaluation/planted.py`, `benchmarks/planted.py`).")
    return head + "\n\n" + markdown_table(report)


# ------------------------------------------------------------------------------------ page


def setup_text(data: dict) -> str:
    scan = data["scan"]
    bb = scan["backbone"]
    fit = scan["fit"]
    real, synth = scan["data"]["real"], scan["data"]["synthetic"]
    n_real = summary(data, blocks(data)[0]).get("n_real_images")
    first = reports(data, blocks(data)[0])
    n_eval = first[0]["n_images"] if first else "?"
    knn_seg = next((r for b in blocks(data) for r in reports(data, b) if r["evaluation"] == "knn-seg"), None)
    seg_cfg = knn_seg["config"] if knn_seg else {}
    knn_cls = next((r for b in blocks(data) for r in reports(data, b) if r["evaluation"] == "knn-cls"), None)
    cls_k = knn_cls["config"].get("k", "?") if knn_cls else "?"
    return f"""- **Backbone**: `{bb['backbone']}` (timm `{bb['timm_name']}`, weights sha256 `{str(bb['weights_sha256'])[:8]}…`),
  {bb['image_size']} px ({bb['grid'][0]} × {bb['grid'][1]} patch grid, D = {bb['dim']}).
- **Tokens** (SPEC §1 step 1, `--final-norm auto`): block {bb['depth'] - 1}, the last, is taken *after* the
  model's final norm — timm's `forward_features` patch tokens, which is what the authors fit; the other
  blocks are their block outputs (the residual stream) without it. Before soapflow applied the final norm
  (issue 15) the last block was fitted before it: those earlier numbers are replaced by this page.
- **Fit** (per block): real = the first {real.get('count', n_real)} Fashion-MNIST **train** images (`{real.get('spec', '?')}`),
  synthetic = {synth.get('count', '?')} `{synth.get('spec', '?')}` images (seed {synth.get('seed', '?')}), μ = {fit['mu']:g},
  τ = {fit['tau']:g} (the two most semantic-invariant components suppressed, each scaled by its SI score),
  stores in {fit.get('store_dtype', '?')}; all blocks from one extraction pass (`soap scan`).
- **Evaluation**: the first {n_eval} Fashion-MNIST **test** images, same size (each 28 px image resized
  bicubically). Ground-truth mask = pixel > 0 of the original image (nearest resize); label map for
  patch kNN segmentation = background (0) or class + 1.
- **TokenCut**: cosine affinities, edge 1 where cos > τ else 1e-5, second generalized eigenvector of
  `(D − A)x = λDx`, bipartition at its mean, foreground = the side holding the token with the largest
  |x − mean(x)|; max Fβ (β² = 0.3) over thresholds of the soft map (one threshold per dataset), IoU and
  pixel accuracy of the binary mask. Three τ pairings: τ = 0.2 for both (TokenCut's), raw τ = 0.2 vs
  SOAP τ = 0.3 (the authors' pairing with SOAP), and τ = 0.3 for both (what the τ change alone does).
- **Patch kNN segmentation**: bank = patches of the first {seg_cfg.get('bank_images', '?')} train images,
  subsampled to {seg_cfg.get('bank_patches', '?')} patches (seeded); k = {seg_cfg.get('k', '?')} nearest (cosine), majority label;
  mIoU of the dataset confusion matrix and pixel accuracy. **kNN classification**: k = {cls_k}, cosine;
  features = mean-pooled patch tokens (`top1_mean`) or the class token of the same block (`top1_cls`;
  at block {bb['depth'] - 1} also after the final norm; SOAP applies Pφ to it as well).
- **Statistics**: Δ = SOAP − raw on the same images with a paired percentile bootstrap 95% CI over
  images; **\\*** = the CI excludes 0. "improved / worsened" counts images whose own score moved."""


def render_page(data: dict, data_dir: str, commands: str, notes: str) -> str:
    return f"""# Zero-shot results: DINOv2 ViT-S/14 on Fashion-MNIST, raw vs SOAP

<!-- Generated by docs/render_results.py from docs/data/*.json; edit the script, not this page. -->

What SOAP does to zero-shot use of patch tokens on the embedded default backbone at blocks
{", ".join(str(b) for b in blocks(data))}, measured on CPU. Every number on this page is read from the JSON
files in `docs/data/`, written by the commands at the end. The protocols are SPEC §5; the code is
`soapflow/evaluation/`.

## Setup

{sizes_sentence(data)}

{setup_text(data)}

## SI per block

{si_table(data)}

{si_sentence(data)}

## Results (values in %)

{results_table(data)}

## Planted artifacts: does the pipeline find what is really there?

{planted_section(data_dir)}

{notes}

## Reproduce (CPU)

These numbers were made with

```bash
N={data["scan"]["data"]["real"].get("count", "?")} bash docs/results.sh   # SOAP="python -m soapflow.cli" without the soap script
python docs/render_results.py
```

where `docs/results.sh` runs:

```bash
{commands.strip()}
```
"""


def update_readme(path: str, table: str, sentence: str) -> bool:
    text = open(path).read()
    if README_BEGIN not in text or README_END not in text:
        return False
    block = f"{README_BEGIN}\n{table}\n\n{sentence}\n{README_END}"
    new = re.sub(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), lambda _: block, text, flags=re.S)
    if new != text:
        with open(path, "w") as f:
            f.write(new)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(HERE, "data"))
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"))
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"), help="'' to leave it alone")
    ap.add_argument("--commands", default=os.path.join(HERE, "results.sh"))
    ap.add_argument("--notes", default=os.path.join(HERE, "results_notes.md"),
                    help="hand-written discussion (no numbers: those are in the tables) placed after the tables")
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)  # soapflow: the evaluation labels, and the planted table when rendered
    data = load(args.data)
    commands = open(args.commands).read() if os.path.isfile(args.commands) else ""
    commands = "\n".join(l for l in commands.splitlines() if not l.startswith("#!"))
    notes = open(args.notes).read().strip() if os.path.isfile(args.notes) else ""
    with open(args.out, "w") as f:
        f.write(render_page(data, args.data, commands, notes))
    print(f"wrote {args.out}")
    if args.readme:
        if update_readme(args.readme, readme_table(data), f"{sizes_sentence(data)} {si_sentence(data)}"):
            print(f"updated the results table in {args.readme}")
        else:
            print(f"{args.readme}: no {README_BEGIN} … {README_END} markers; left alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
