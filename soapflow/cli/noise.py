"""``soap noise``: look at the synthetic non-semantic images."""

from __future__ import annotations

from pathlib import Path

import typer

from soapflow.errors import SoapError

app = typer.Typer(help="Synthetic non-semantic images (docs/method.md §2).", no_args_is_help=True,
                  rich_markup_mode=None)


@app.callback()
def _group() -> None:
    """Synthetic non-semantic images (docs/method.md §2)."""  # a callback keeps `preview` a sub-command


@app.command()
def preview(
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    size: int = typer.Option(224, "--size", help="Image side in pixels."),
    count: int = typer.Option(6, "--count", help="Images per generator (columns)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic set."),
    names: str = typer.Option("all", "--names",
                              help="Comma-separated generators (pink, modulated_white, gradient, constant, "
                                   "uniform, gaussian, mixture, marginal), or 'all'."),
) -> None:
    """Write a PNG grid: one row per generator, COUNT images each."""
    from soapflow.noise_generators import GENERATORS  # torch: only when the command runs
    from soapflow.noise_generators.preview import preview_grid  # matplotlib only when needed

    chosen = list(GENERATORS) if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    if not chosen:
        raise SoapError(f"--names is empty; valid names: {', '.join(GENERATORS)}")
    bad = [n for n in chosen if n not in GENERATORS]
    if bad:
        raise SoapError(f"--names: unknown noise generator {bad[0]!r}; valid names: {', '.join(GENERATORS)}")
    if count < 1:
        raise SoapError(f"--count must be >= 1, got {count}")
    if size < 1:
        raise SoapError(f"--size must be >= 1, got {size}")
    if out.exists() and out.is_dir():
        raise SoapError(f"--out {str(out)!r} is a directory; give a .png file path")
    path = preview_grid(out, chosen, count=count, size=size, seed=seed)
    typer.echo(f"wrote {path}")
