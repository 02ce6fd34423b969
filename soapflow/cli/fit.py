"""``soap fit``: fit SOAP on a real and a synthetic feature store, write an artifact."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from soapflow import defaults
from soapflow.cli import options as opt
from soapflow.cli.options import parse_mu  # noqa: F401  (its old home)
from soapflow.errors import SoapError


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
    mu: opt.Mu = opt.MU_DEFAULT,
    tau: opt.Tau = defaults.DEFAULT_TAU,
    gamma: opt.Gamma = defaults.DEFAULT_GAMMA,
    threshold: opt.Threshold = defaults.DEFAULT_THRESHOLD,
    suppress: Annotated[Optional[str], typer.Option(help="Instead remove these eigenvalue ranks fully, e.g. 0,3.")] = None,
    dask_address: Annotated[Optional[str], typer.Option(help="Scheduler of a running dask cluster (tcp://…).",
                                                        show_default=False)] = None,
    workers: Annotated[int, typer.Option(help="Workers of the local cluster (without --dask-address).")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing artifact directory.")] = False,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip writing plots/.")] = False,
    storage_option: opt.StorageOption = None,
    device: opt.Device = None,
) -> None:
    """Fit SOAP exactly (float64, out of core) and write the projection artifact."""
    from rich.console import Console

    from soapflow.fit import fit_to_artifact

    mu_value = parse_mu(mu)
    opt.check_fit_parameters(tau, gamma, threshold)
    path, fitted, manifest = fit_to_artifact(
        real_store, synth_store, out, dask_address=dask_address, workers=workers,
        mu=mu_value, tau=tau, gamma=gamma, threshold=threshold, suppress=parse_ranks(suppress),
        overwrite=overwrite, plots=not no_plots, storage_options=opt.parse_storage_options(storage_option),
        device=device,  # None: CUDA if the workers have it
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
    from soapflow.fit import fit_warnings

    for warning in fit_warnings(fitted, manifest):
        console.print(f"warning: {warning}")
    console.print(f"artifact: {path}  (sha256 {manifest['content_hash'][:16]}…)")
    console.print(f"plots:    {path}/plots/")
