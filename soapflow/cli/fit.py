"""``soap fit``: fit SOAP on a real and a synthetic feature store, write an artifact."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from soapflow.errors import SoapError


def parse_mu(value: str) -> float | str:
    if value == "auto":
        return "auto"
    try:
        mu = float(value)
    except ValueError:
        raise SoapError(f"--mu must be a number ≥ 0 or 'auto', got {value!r}") from None
    if mu < 0:
        raise SoapError(f"--mu must be ≥ 0 or 'auto', got {value}")
    return mu


def parse_ranks(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise SoapError(f"--suppress takes comma-separated eigenvalue ranks like 0,3, got {value!r}") from None


def fit(
    real_store: Annotated[str, typer.Argument(help="Feature store of real images (path or URL).")],
    synth_store: Annotated[str, typer.Argument(help="Feature store of synthetic images.")],
    out: Annotated[str, typer.Option("--out", help="Artifact directory to write.")],
    mu: Annotated[str, typer.Option(help="Soft count of components to suppress, or 'auto'.")] = "2",
    tau: Annotated[float, typer.Option(help="Sigmoid temperature of the weights.")] = 0.05,
    gamma: Annotated[float, typer.Option(help="Exponent of the SI agreement.")] = 1.0,
    threshold: Annotated[float, typer.Option(help="SI threshold for --mu auto.")] = 0.75,
    suppress: Annotated[Optional[str], typer.Option(help="Instead remove these eigenvalue ranks fully, e.g. 0,3.")] = None,
    dask_address: Annotated[Optional[str], typer.Option(help="Scheduler of a running dask cluster.")] = None,
    workers: Annotated[int, typer.Option(help="Workers of the local cluster (without --dask-address).")] = 1,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing artifact directory.")] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip writing plots/.")] = False,
    device: Annotated[str, typer.Option(help="Where the fit computes: auto (CUDA if present), cpu, cuda, cuda:N.")] = "auto",
) -> None:
    """Fit SOAP exactly (float64, out of core) and write the projection artifact."""
    from rich.console import Console

    from soapflow.fit import fit_to_artifact

    if tau <= 0:
        raise SoapError(f"--tau must be > 0, got {tau}")
    path, fitted, manifest = fit_to_artifact(
        real_store, synth_store, out, dask_address=dask_address, workers=workers,
        mu=parse_mu(mu), tau=tau, gamma=gamma, threshold=threshold, suppress=parse_ranks(suppress),
        overwrite=overwrite, plots=not no_plots, device=device,
    )
    print_fit_summary(Console(soft_wrap=True), fitted, manifest, path)


def print_fit_summary(console, fitted, manifest, path) -> None:
    import numpy as np
    from rich.table import Table

    table = Table(title="Top SI scores")
    for col in ("rank", "SI score", "weight", "explained var."):
        table.add_column(col, justify="right")
    explained = fitted.explained_variance
    for d in np.argsort(-fitted.scores, kind="stable")[:8]:
        table.add_row(str(d), f"{fitted.scores[d]:.4f}", f"{fitted.weights[d]:.4f}", f"{explained[d]:.2%}")
    console.print(table)
    console.print(
        f"μ={manifest['mu']:g} ({manifest['mu_mode']}), components suppressed: {manifest['n_suppressed']}, "
        f"real tokens {manifest['n_real_tokens']:,}, synthetic tokens {manifest['n_synth_tokens']:,}"
    )
    console.print(f"artifact: {path}  (sha256 {manifest['content_hash'][:16]}…)")
    console.print(f"plots:    {path}/plots/")
