"""``soap scan``: SI scores (and optionally zero-shot results) per block, from one pass."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from soapflow.errors import SoapError


def scan(
    backbone: Annotated[str, typer.Option(help="Catalog name or timm ViT name.")] = "dinov2_vits14",
    weights: Annotated[Optional[str], typer.Option(help="Weights file, or 'random' (non-catalog backbones).")] = None,
    layers: Annotated[str, typer.Option(help="all, last, or block indices like 4,8,11.")] = "all",
    feature: Annotated[str, typer.Option(help="out, q, k, v or kqv.")] = "out",
    final_norm: Annotated[str, typer.Option(help="The model's final norm on the tokens: auto (last block only), on (every block), off.")] = "auto",
    image_size: Annotated[Optional[int], typer.Option(help="Input size (default: the backbone's).")] = None,
    data: Annotated[str, typer.Option(help="Real images: photos, fashion-mnist[:train], a folder.")] = "fashion-mnist:train",
    n: Annotated[int, typer.Option("--n", help="Real images.")] = 256,
    synth: Annotated[str, typer.Option(help="Synthetic images (noise:<generator>).")] = "noise:mixture",
    synth_n: Annotated[Optional[int], typer.Option(help="Synthetic images (default: --n).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic images and the bootstrap.")] = 0,
    mu: Annotated[str, typer.Option(help="Soft count of suppressed components, or 'auto'.")] = "2",
    tau: Annotated[float, typer.Option(help="Sigmoid temperature of the weights.")] = 0.05,
    threshold: Annotated[float, typer.Option(help="SI threshold (counted per layer; --mu auto).")] = 0.75,
    eval: Annotated[str, typer.Option("--eval", help="Comma list of evaluations per layer: salient,knn-seg,knn-cls.")] = "",
    eval_data: Annotated[str, typer.Option(help="Evaluation dataset.")] = "fashion-mnist:test",
    eval_n: Annotated[Optional[int], typer.Option(help="Evaluation images.")] = 256,
    bank: Annotated[Optional[str], typer.Option(help="kNN bank dataset (default: the other fashion-mnist split).")] = None,
    bank_n: Annotated[Optional[int], typer.Option(help="kNN bank images.")] = 500,
    bank_patches: Annotated[int, typer.Option(help="kNN-seg bank patches (seeded subsample); 0 = all.")] = 16384,
    salient_tau: Annotated[float, typer.Option(help="TokenCut τ.")] = 0.2,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (= store chunk).")] = 32,
    dtype: Annotated[str, typer.Option(help="Store dtype: float16 or float32.")] = "float16",
    work_dir: Annotated[Optional[str], typer.Option(help="Keep per-layer stores and token caches here (default: a temp dir, removed).")] = None,
    artifacts: Annotated[Optional[str], typer.Option(help="Write one artifact per layer here (<dir>/L<layer>).")] = None,
    out: Annotated[str, typer.Option(help="Output folder: scan.json, si_vs_depth.png, metrics_vs_depth.png.")] = "scan-out",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Per-layer SI scores from one pass over the images, optionally raw-vs-SOAP evaluations per layer.

    One forward pass per batch extracts every requested block; per block: max SI, number of
    components above the threshold, and with --eval the zero-shot results; plots vs depth."""
    from rich.console import Console
    from rich.table import Table

    from soapflow.cli.fit import parse_mu
    from soapflow.evaluation.scan import scan as run_scan

    if tau <= 0:
        raise SoapError(f"--tau must be > 0, got {tau}")
    evaluations = [e.strip() for e in eval.split(",") if e.strip()]
    result = run_scan(
        backbone, weights=weights, layers=layers, feature=feature, final_norm=final_norm, image_size=image_size,
        data=data, n=n,
        synth=synth, synth_n=synth_n, seed=seed, mu=parse_mu(mu), tau=tau, threshold=threshold,
        batch_size=batch_size, dtype=dtype, work_dir=work_dir, keep_work=work_dir is not None,
        artifacts_dir=artifacts, evaluations=evaluations, eval_data=eval_data, eval_n=eval_n, bank=bank,
        bank_n=bank_n, bank_patches=bank_patches or None, salient_tau=salient_tau, n_boot=n_boot, out_dir=out, device=device, progress=not quiet,
    )
    console = Console()
    table = Table(title=f"SI per block — {backbone} ({feature}), {n} real / {synth_n or n} synthetic images")
    for col in ("block", "max SI", "2nd SI", f"# > {threshold:g}", "suppressed"):
        table.add_column(col, justify="right")
    for s in result["layers"]:
        table.add_row(str(s["layer"]), f"{s['max_si']:.4f}", f"{s['top_si'][1]:.4f}" if len(s["top_si"]) > 1 else "",
                      str(s["n_above_threshold"]), str(s["n_suppressed"]))
    console.print(table)
    if result["evaluations"]:
        from soapflow.evaluation.report import markdown_table

        reps = [r for layer in sorted(result["evaluations"], key=int) for r in result["evaluations"][layer].values()]
        console.print(markdown_table(reps))
    console.print(f"results: {result.get('json')}")
    for name, path in (result.get("plots") or {}).items():
        console.print(f"plot {name}: {path}")
