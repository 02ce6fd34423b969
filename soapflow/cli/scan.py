"""``soap scan``: SI scores (and optionally zero-shot results) per block, from one pass."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from soapflow import defaults
from soapflow.cli import options as opt
from soapflow.errors import SoapError


def scan(
    backbone: opt.Backbone = defaults.DEFAULT_BACKBONE,
    weights: opt.Weights = None,
    layers: Annotated[str, typer.Option(help="all, last, or block indices like 4,8,11.")] = "all",
    feature: opt.Feature = "out",
    final_norm: opt.FinalNorm = "auto",
    image_size: opt.ImageSize = None,
    data: opt.Data = defaults.DEFAULT_DATA,
    n_real: opt.NReal = None,
    n_synth: opt.NSynth = None,
    generator: opt.Generator = defaults.DEFAULT_GENERATOR,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic images and the bootstrap.")] = 0,
    mu: opt.Mu = opt.MU_DEFAULT,
    tau: opt.Tau = defaults.DEFAULT_TAU,
    gamma: opt.Gamma = defaults.DEFAULT_GAMMA,
    threshold: opt.Threshold = defaults.DEFAULT_THRESHOLD,
    eval: Annotated[str, typer.Option("--eval", help="Comma list of evaluations per layer: salient,knn-seg,knn-cls.")] = "",
    eval_data: Annotated[str, typer.Option(help="Evaluation dataset.")] = "fashion-mnist:test",
    eval_n: Annotated[Optional[int], typer.Option(help="Evaluation images.")] = 256,
    bank: Annotated[Optional[str], typer.Option(help="kNN bank dataset (default: the other fashion-mnist split).",
                                                show_default=False)] = None,
    bank_n: Annotated[Optional[int], typer.Option(help="kNN bank images.")] = 500,
    bank_patches: Annotated[int, typer.Option(help="kNN-seg bank patches (seeded subsample); 0 = all.")] = 16384,
    salient_tau: Annotated[float, typer.Option(help="TokenCut τ.")] = 0.2,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (= store chunk).")] = 32,
    dtype: opt.Dtype = defaults.DEFAULT_DTYPE,
    workdir: opt.ScanWorkdir = None,
    artifacts: Annotated[Optional[str], typer.Option(help="Write one artifact per layer here (<dir>/L<layer>).",
                                                     show_default=False)] = None,
    out: Annotated[str, typer.Option(help="Output folder: scan.json, si_vs_depth.png, metrics_vs_depth.png.")] = "scan-out",
    n_boot: Annotated[int, typer.Option(help="Bootstrap resamples.")] = 2000,
    device: opt.Device = None,
    quiet: opt.Quiet = False,
    # the names before 0.2, kept working (hidden)
    old_n: Annotated[Optional[int], typer.Option("--n", hidden=True, help="Deprecated: --n-real.")] = None,
    old_synth_n: Annotated[Optional[int], typer.Option("--synth-n", hidden=True, help="Deprecated: --n-synth.")] = None,
    old_synth: Annotated[Optional[str], typer.Option("--synth", hidden=True, help="Deprecated: --generator.")] = None,
    old_work_dir: Annotated[Optional[str], typer.Option("--work-dir", hidden=True, help="Deprecated: --workdir.")] = None,
) -> None:
    """Per-layer SI scores from one pass over the images, optionally raw-vs-SOAP evaluations per layer.

    One forward pass per batch extracts every requested block; per block: max SI, number of
    components above the threshold, and with --eval the zero-shot results; plots vs depth."""
    from rich.console import Console
    from rich.table import Table

    from soapflow import preflight
    from soapflow.evaluation.scan import scan as run_scan

    def deprecated(old_flag, new_flag, old_value, new_value):
        if old_value is None:
            return new_value
        if new_value is not None:
            raise SoapError(f"{old_flag} is the old name of {new_flag}: give only {new_flag}")
        typer.echo(f"note: {old_flag} is deprecated; use {new_flag}", err=True)
        return old_value

    n_real = deprecated("--n", "--n-real", old_n, n_real)
    n_synth = deprecated("--synth-n", "--n-synth", old_synth_n, n_synth)
    workdir = deprecated("--work-dir", "--workdir", old_work_dir, workdir)
    if old_synth is not None:
        typer.echo("note: --synth is deprecated; use --generator", err=True)
        generator = old_synth.split(":", 1)[1] if old_synth.startswith("noise:") else old_synth
    mu_value = opt.parse_mu(mu)
    final_norm = preflight.final_norm(final_norm)
    preflight.check_cheap(data=data, weights=weights, image_size=image_size, fit=(mu_value, tau, gamma, threshold),
                          counts={"--n-real": n_real, "--n-synth": n_synth, "--batch-size": batch_size})
    device = opt.resolve_device(device)
    preflight.check_bundled_weights(backbone, weights)
    if n_real is None:  # all the source has (like refit)
        from soapflow.sources import open_source

        n_real = len(open_source(data, seed=seed))
    evaluations = [e.strip() for e in eval.split(",") if e.strip()]
    synth = f"noise:{generator}"
    result = run_scan(
        backbone, weights=weights, layers=layers, feature=feature, final_norm=final_norm, image_size=image_size,
        data=data, n=n_real,
        synth=synth, synth_n=n_synth, seed=seed, mu=mu_value, tau=tau, gamma=gamma, threshold=threshold,
        batch_size=batch_size, dtype=dtype, work_dir=workdir, keep_work=workdir is not None,
        artifacts_dir=artifacts, evaluations=evaluations, eval_data=eval_data, eval_n=eval_n, bank=bank,
        bank_n=bank_n, bank_patches=bank_patches or None, salient_tau=salient_tau, n_boot=n_boot, out_dir=out,
        device=device, progress=not quiet,
    )
    console = Console()
    table = Table(title=f"SI per block — {backbone} ({feature}), {n_real} real / {n_synth or n_real} synthetic images")
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
