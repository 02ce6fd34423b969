"""The ``soap`` command line. Each sub-command module registers itself here."""

from __future__ import annotations

import atexit
import os
import sys
from typing import Annotated

import typer

# Ephemeral Prefect servers would try to send usage telemetry; there is often no internet
# where refits run, and the failed attempt prints an ERROR line. Users can still opt in.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from soapflow.errors import SoapError, TransientError

# Shown under `soap --help`: the environment the commands read, and where run history goes.
ENVIRONMENT_HELP = """\
Environment:

\b
  SOAPFLOW_WORKDIR          feature stores, artifacts and reports of `soap refit` (default ~/.cache/soapflow/work)
  SOAPFLOW_CACHE            converted backbone weights and pulled heads (default ~/.cache/soapflow)
  SOAPFLOW_REGISTRY         registry root, a path or s3://bucket/prefix (default ~/.local/share/soapflow/registry)
  SOAPFLOW_STORAGE_OPTIONS  JSON object for an s3:// registry, e.g. {"client_kwargs": {"endpoint_url": "http://…"}}

PREFECT_API_URL: the Prefect server runs report to. Unset, each run starts a temporary one and its history stays in
~/.prefect/prefect.db ($PREFECT_HOME): `prefect server start` shows it at http://127.0.0.1:4200, and
`export PREFECT_API_URL=http://127.0.0.1:4200/api` makes later runs report there live.
"""

app = typer.Typer(
    name="soap",
    help="SOAP: find and remove non-semantic directions in ViT patch tokens.",
    epilog=ENVIRONMENT_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: no boxes, no "<bool>" after flags
)


def _version(value: bool) -> None:
    if value:
        from soapflow import __version__

        typer.echo(f"soapflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """SOAP: find and remove non-semantic directions in ViT patch tokens."""


def _register() -> None:
    from soapflow.cli import eval as eval_cli
    from soapflow.cli import extract as extract_cli
    from soapflow.cli import fit as fit_cli
    from soapflow.cli import noise as noise_cli
    from soapflow.cli import registry as registry_cli
    from soapflow.cli import scan as scan_cli

    app.command("fit")(fit_cli.fit)
    app.command("extract")(extract_cli.extract)
    app.command("refit")(extract_cli.refit)
    app.add_typer(noise_cli.app, name="noise", help="Synthetic non-semantic images.")
    app.add_typer(registry_cli.app, name="registry", help="Versioned projection artifacts: publish, promote, pull, diff, report.")
    app.add_typer(eval_cli.app, name="eval", help="Zero-shot evaluations: raw vs SOAP, with paired CIs.")
    app.command("scan")(scan_cli.scan)


_register()


def main() -> None:
    """Entry point: user errors (bad input, or an I/O failure a rerun may get past) become one line
    on stderr and exit code 2; Ctrl-C stops the work at
    its next chunk (``soapflow.cancel``), says how to resume and exits 130."""
    from soapflow import cancel

    try:
        with cancel.sigint_handler():
            app()
    except SystemExit as exc:
        if cancel.requested() and exc.code not in (0, None):  # click's "Aborted!" after a second Ctrl-C
            _interrupted()
        raise
    except BaseException as exc:
        if cancel.requested() or isinstance(exc, (KeyboardInterrupt, cancel.Interrupted)):
            _interrupted()
        if isinstance(exc, (SoapError, TransientError)):
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        raise


def _interrupted() -> None:
    from soapflow.cancel import RESUME_HINT

    typer.secho(RESUME_HINT, fg=typer.colors.YELLOW, err=True)
    sys.exit(130)


def _exit_without_teardown(status: list[int]) -> None:
    # Registered first, so it runs after every other atexit hook (Prefect's log and event
    # workers draining, the temporary server stopping). What it skips is the interpreter tearing down
    # torch, Prefect and thousands of modules, which changes nothing on disk.
    from soapflow import timeline

    timeline.report()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status[0])


def run() -> None:
    """The ``soap`` script (and ``python -m soapflow.cli``): ``main`` in a process of its own,
    which ends as soon as its exit hooks have run. Not for in-process use: it ends the process."""
    status = [1]  # an uncaught exception exits 1, as Python would
    atexit.register(_exit_without_teardown, status)
    try:
        main()
        status[0] = 0
    except KeyboardInterrupt:
        status[0] = 130  # what Python itself exits with on Ctrl-C
        raise
    except SystemExit as exc:  # typer/click end every command with one
        code = exc.code
        status[0] = code if isinstance(code, int) else (0 if code is None else 1)
        raise
