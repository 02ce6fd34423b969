"""``soap registry``: publish, list, show, promote, pull, diff, report and export projection artifacts.

The registry root comes from ``--registry``, else ``$SOAPFLOW_REGISTRY``, else
``$XDG_DATA_HOME/soapflow/registry`` (``~/.local/share/soapflow/registry``). Object stores take
``--storage-option KEY=VALUE`` (repeatable; dotted keys nest, values are JSON when they parse)
or the usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …).
"""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Optional

import typer

from soapflow.cli import options as opt
from soapflow.cli.options import parse_storage_options
from soapflow.errors import SoapError, json_object

app = typer.Typer(
    help="Versioned projection artifacts: publish, list, show, promote, pull, diff, report, export.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

RegistryOpt = opt.Registry
StorageOpt = opt.StorageOption
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a summary.")]


@app.callback()
def _group() -> None:
    """Versioned projection artifacts: publish, list, show, promote, pull, diff, report, export."""


def _registry(root: str | None, storage_option: list[str] | None, *, must_exist: bool = True):
    """The registry to read (``must_exist``: a --registry path that is not there is a typo, not an
    empty registry) or to publish into (created on first use)."""
    from soapflow.storage.objectstore import is_url
    from soapflow.storage.registry import Registry

    if must_exist and root and not is_url(str(root)):
        path = os.path.expanduser(str(root))
        if not os.path.exists(path):
            raise SoapError(f"--registry {root}: no such directory (a registry is created by its first "
                            "`soap registry publish` or `soap refit`)")
        if not os.path.isdir(path):
            raise SoapError(f"--registry {root}: is a file, not a registry directory")
    return Registry(root, parse_storage_options(storage_option))


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


@app.command()
def publish(
    artifact_dir: Annotated[str, typer.Argument(help="Artifact directory (soap.safetensors + manifest.json).")],
    name: Annotated[Optional[str], typer.Option("--name", "-n", help="Registry name (default <backbone>/<layer>).")] = None,
    lineage: Annotated[Optional[str], typer.Option("--lineage", help="JSON object recorded as lineage (e.g. the flow run).")] = None,
    registry: RegistryOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Publish an artifact as the next version of NAME; prints NAME:VERSION."""
    lineage_doc = json_object(lineage, "--lineage") if lineage is not None else None
    reg = _registry(registry, storage_option, must_exist=False)
    res = reg.publish(artifact_dir, name=name, lineage=lineage_doc)
    if not res.created:
        typer.echo(
            f"{artifact_dir}: identical content (sha256 {res.content_hash[:16]}…) is already "
            f"{res.ref}; no new version", err=True,
        )
    typer.echo(res.ref)


@app.command("list")
def list_(
    name: Annotated[Optional[str], typer.Argument(help="List this name's versions instead of all names.")] = None,
    registry: RegistryOpt = None,
    storage_option: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List names (with latest version and aliases), or the versions of one NAME."""
    from rich.table import Table

    reg = _registry(registry, storage_option)
    if name is None:
        rows = []
        for n in reg.names():
            aliases = reg.aliases(n)
            rows.append({"name": n, "versions": reg.versions(n), "aliases": aliases})
        if as_json:
            _print_json(rows)
            return
        if not rows:
            typer.echo(f"registry {reg.root} is empty", err=True)
            return
        table = Table(title=f"registry {reg.root}")
        for col in ("name", "versions", "latest", "aliases"):
            table.add_column(col)
        for r in rows:
            others = ", ".join(f"{a}→{v}" for a, v in sorted(r["aliases"].items()) if a != "latest")
            table.add_row(r["name"], str(len(r["versions"])), str(r["aliases"]["latest"]), others)
        _console().print(table)
        return
    aliases = reg.aliases(name)  # raises for an unknown name
    rows = []
    for v in reg.versions(name):
        rec = reg.record(f"{name}:{v}")
        rows.append({
            "version": v, "published": rec.get("published"), "content_hash": rec["content_hash"],
            "aliases": [a for a, av in aliases.items() if av == v], "supersedes": rec.get("supersedes"),
            "n_suppressed": (rec.get("manifest") or {}).get("n_suppressed"),
            "flow_run": (rec.get("lineage") or {}).get("flow_run_name"),
        })
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"{name} in {reg.root}")
    for col in ("version", "published", "sha256", "suppressed", "aliases", "flow run"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["version"]), str(r["published"]), r["content_hash"][:12], str(r["n_suppressed"]),
                      ", ".join(sorted(r["aliases"])), str(r["flow_run"] or ""))
    _console().print(table)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME:VERSION.")],
    registry: RegistryOpt = None,
    storage_option: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one version: manifest, lineage, aliases, evaluations."""
    reg = _registry(registry, storage_option)
    rec = reg.record(ref)
    if as_json:
        _print_json(rec)
        return
    m = rec.get("manifest") or {}
    c = _console()
    c.print(f"[bold]{rec['ref']}[/bold]  aliases: {', '.join(rec['aliases']) or '-'}")
    c.print(f"  registry:    {rec['registry']}")
    c.print(f"  sha256:      {rec['content_hash']}")
    c.print(f"  published:   {rec.get('published')}  supersedes: {rec.get('supersedes') or '-'}")
    c.print(f"  backbone:    {m.get('backbone')}  layer {m.get('layer')}  feature {m.get('feature')}  "
            f"{'after' if m.get('final_norm') else 'before'} the final norm  "
            f"image size {m.get('image_size')}  grid {m.get('grid')}  D={m.get('dim')}")
    c.print(f"  weights:     {m.get('weights')}")
    c.print(f"  parameters:  μ={m.get('mu')} ({m.get('mu_mode')})  τ={m.get('tau')}  γ={m.get('gamma')}  "
            f"threshold={m.get('threshold')}  suppressed={m.get('n_suppressed')}")
    for role, s in ((rec.get("lineage") or {}).get("stores") or {}).items():
        c.print(f"  {role + ' store:':<13}{s.get('uri')}  ({s.get('count')} images, fingerprint {s.get('fingerprint')})")
    extra = {k: v for k, v in (rec.get("lineage") or {}).items() if k not in ("stores", "backbone", "weights")}
    if extra:
        c.print(f"  lineage:     {json.dumps(extra, sort_keys=True, default=str)}")
    if rec.get("evaluations"):
        c.print(f"  evaluations: {json.dumps(rec['evaluations'], sort_keys=True, default=str)}")


@app.command()
def promote(
    ref: Annotated[str, typer.Argument(help="NAME:VERSION (or NAME@ALIAS) to point the alias at.")],
    alias: Annotated[str, typer.Argument(help="Alias to move, e.g. production.")],
    registry: RegistryOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Point ALIAS (production or any user alias) at a version; promoting an older one rolls back."""
    reg = _registry(registry, storage_option)
    name, version = reg.resolve(ref)
    previous = reg.promote(name, version, alias)
    was = f" (was {previous})" if previous is not None else ""
    typer.echo(f"{name}@{alias} → {version}{was}")


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME:VERSION.")],
    to: Annotated[str, typer.Option("--to", help="Directory to write the artifact into.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --to directory.")] = False,
    registry: RegistryOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Copy a version's artifact directory to --to, verifying every file's sha256."""
    reg = _registry(registry, storage_option)
    name, version = reg.resolve(ref)
    path = reg.pull(f"{name}:{version}", to, overwrite=overwrite)
    typer.echo(f"{name}:{version} → {path}")


@app.command()
def diff(
    ref_a: Annotated[str, typer.Argument(help="First version.")],
    ref_b: Annotated[str, typer.Argument(help="Second version.")],
    registry: RegistryOpt = None,
    storage_option: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare two versions: suppressed-subspace angles, SI score changes, projector distance."""
    reg = _registry(registry, storage_option)
    d = reg.diff(ref_a, ref_b)
    if as_json:
        _print_json(d)
        return
    from rich.table import Table

    c = _console()
    c.print(f"[bold]{d['a']}[/bold] vs [bold]{d['b']}[/bold]" + ("  (identical content)" if d["same_content"] else ""))
    c.print(f"  suppressed components: {d['n_suppressed'][0]} vs {d['n_suppressed'][1]} "
            f"(ranks {d['suppressed_ranks'][0]} vs {d['suppressed_ranks'][1]})")
    angles = d["principal_angles_deg"]
    c.print("  principal angles between suppressed subspaces: "
            + (", ".join(f"{a:.2f}°" for a in angles) if angles else "n/a (one side suppresses nothing)"))
    c.print(f"  ‖P_a − P_b‖_F = {d['projector_frobenius']:.6g} (relative {d['projector_frobenius_relative']:.3g})")
    if d["matches_a_to_b"]:
        t = Table(title=f"suppressed components of {d['a']} and their best match in {d['b']}")
        for col in ("rank", "match", "|cos|", "SI score", "→ SI score", "change"):
            t.add_column(col, justify="right")
        for m in d["matches_a_to_b"]:
            t.add_row(str(m["rank"]), str(m["match_rank"]), f"{m['abs_cos']:.3f}", f"{m['score']:.4f}",
                      f"{m['match_score']:.4f}", f"{m['score_change']:+.4f}")
        c.print(t)
    if d["parameters"]:
        c.print("  changed: " + "; ".join(f"{k}: {a!r} → {b!r}" for k, (a, b) in d["parameters"].items()))


@app.command()
def report(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME:VERSION.")],
    out: Annotated[str, typer.Option("--out", help="HTML file to write (one self-contained page, images inline).")],
    registry: RegistryOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Write one HTML page for a version: manifest, lineage, SI plot, response maps, recorded
    evaluations with CIs, and the diff against the previous version."""
    from soapflow.storage.html_report import version_report, write_report

    if not out.lower().endswith((".html", ".htm")):
        raise SoapError(f"--out {out}: give an .html file name")
    reg = _registry(registry, storage_option)
    name, version = reg.resolve(ref)
    path = write_report(out, version_report(reg, f"{name}:{version}"))
    typer.echo(f"{name}:{version} → {path}")


@app.command("export-mlflow")
def export_mlflow(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@ALIAS or NAME:VERSION.")],
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="MLflow tracking URI, e.g. sqlite:///mlflow.db.")],
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Registered model name (default soap-<name with . for />).")] = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the export run.")] = "soapflow",
    artifact_location: Annotated[Optional[str], typer.Option(help="Artifact location of a newly created experiment.")] = None,
    registry: RegistryOpt = None,
    storage_option: StorageOpt = None,
) -> None:
    """Log a version's artifact to MLflow and register a model version with the same aliases."""
    from soapflow.storage.mlflow_export import export_mlflow as do_export

    reg = _registry(registry, storage_option)
    out = do_export(reg, ref, tracking_uri, model_name=model_name, experiment=experiment,
                    artifact_location=artifact_location)
    aliases = f" aliases {', '.join(out['aliases'])}" if out["aliases"] else ""
    verb = "registered" if out["created"] else "already registered as"
    typer.echo(f"{out['ref']} {verb} MLflow model {out['model_name']} version {out['model_version']}{aliases}")
