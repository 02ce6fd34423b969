"""One self-contained HTML page per registry version: ``soap registry report NAME:V --out report.html``.

The page holds everything a reviewer needs without the registry at hand: the manifest and
lineage, the SI plot and the response maps (inline base64 PNG, regenerated from the tensors so
that every version is drawn the same way), the most invariant components, the recorded
evaluations with their CIs, and the diff against the previous version. No external file,
script or style sheet: it can be mailed, attached to a ticket or opened from a Prefect link.

    from soapflow.storage.html_report import version_report, write_report
    write_report("report.html", version_report(Registry(root), "dinov2_vits14/11:3"))
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import tempfile
import uuid
from pathlib import Path

import jinja2
import numpy as np

from soapflow.errors import SoapError
from soapflow.storage.artifact import Artifact, read_artifact

TOP_COMPONENTS = 12
# manifest keys shown in their own sections rather than the manifest table
_SECTIONED = ("evaluation", "stores", "lineage")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    rows = []
    for key in sorted(d):
        value = d[key]
        if isinstance(value, dict) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value, default=str)))
    return rows


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _plots(art: Artifact, regenerate: bool) -> dict[str, str]:
    """Data URIs of the SI plot and the response maps: the artifact's own files when asked to
    reuse them and present, else drawn from the tensors."""
    from soapflow.plots import artifact_plots

    stored = {rel: art.path / rel for rel in ("plots/si_scores.png", "plots/response_maps.png")}
    if not regenerate and all(p.is_file() for p in stored.values()):
        files = {rel: p.read_bytes() for rel, p in stored.items()}
    else:
        files = artifact_plots(art.tensors, art.manifest)
    return {Path(rel).stem: _png_data_uri(data) for rel, data in files.items()}


def _components(art: Artifact) -> list[dict]:
    from soapflow.plots import suppressed_mask

    t = art.tensors
    scores, weights, eig = (np.asarray(t[k], np.float64) for k in ("scores", "weights", "eigenvalues"))
    supp = suppressed_mask(scores, weights)
    explained = eig / eig.sum() if eig.sum() > 0 else np.zeros_like(eig)
    order = np.argsort(-scores, kind="stable")[:TOP_COMPONENTS]
    return [{"rank": int(d), "score": float(scores[d]), "weight": float(weights[d]),
             "explained": float(explained[d]), "suppressed": bool(supp[d])} for d in order]


def _evaluations(evaluations: dict) -> tuple[list[dict], dict]:
    """(table rows of schema-1 evaluation reports, other recorded values shown as JSON)."""
    from soapflow.evaluation.report import delta_text, table_rows

    rows, other = [], {}
    for key in sorted(evaluations or {}):
        value = evaluations[key]
        if isinstance(value, dict) and isinstance(value.get("metrics"), dict) and value.get("evaluation"):
            try:
                for r in table_rows(value):
                    rows.append({**r, "key": key, "dataset": (value.get("dataset") or {}).get("spec"),
                                 "delta_text": delta_text(r), "n_images": value.get("n_images")})
                continue
            except (KeyError, TypeError):
                pass  # not a report this version of soapflow can read: shown as recorded
        other[key] = json.dumps(value, indent=2, sort_keys=True, default=str)
    return rows, other


_TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string("""\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SOAP report — {{ title }}</title>
<style>
 body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
        padding: 0 1em; color: #222; }
 h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
 .sub { color: #555; margin-top: 0; }
 table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
 th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
 th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
 td.key { font-family: ui-monospace, monospace; white-space: nowrap; }
 td.val { font-family: ui-monospace, monospace; word-break: break-all; }
 tr.suppressed td { color: #b00; font-weight: 600; }
 .sig { color: #0a6; font-weight: 700; }
 img { max-width: 100%; border: 1px solid #eee; }
 pre { background: #f8f8f8; padding: .6em; overflow-x: auto; font-size: 12px; }
 .note { color: #666; font-size: 12px; }
 nav a { margin-right: 1em; }
</style>
</head>
<body>
<h1>SOAP report — {{ title }}</h1>
<p class="sub">{{ description }}</p>
<nav><a href="#summary">summary</a><a href="#plots">plots</a><a href="#components">components</a>
<a href="#evaluations">evaluations</a><a href="#diff">diff</a><a href="#manifest">manifest</a><a href="#lineage">lineage</a></nav>

<h2 id="summary">Summary</h2>
<table id="summary-table">
{% for k, v in summary %}<tr><th>{{ k }}</th><td class="val">{{ v }}</td></tr>
{% endfor %}</table>

<h2 id="plots">Semantic-invariance scores and response maps</h2>
<p class="note">SI near 1: the component fires at the same positions for real and synthetic images
(non-semantic). Rank = position in eigenvalue order (0 = most variance). Suppressed components in red.</p>
<figure id="si-scores"><img alt="SI scores" src="{{ plots.si_scores }}"></figure>
<figure id="response-maps"><img alt="response maps" src="{{ plots.response_maps }}"></figure>

<h2 id="components">Most invariant components</h2>
<table id="components-table">
<tr><th>rank</th><th>SI score</th><th>weight</th><th>explained variance</th><th>suppressed</th></tr>
{% for c in components %}<tr{% if c.suppressed %} class="suppressed"{% endif %}><td class="num">{{ c.rank }}</td>
<td class="num">{{ "%.4f" % c.score }}</td><td class="num">{{ "%.4f" % c.weight }}</td>
<td class="num">{{ "%.2f" % (100 * c.explained) }} %</td><td>{{ "yes" if c.suppressed else "" }}</td></tr>
{% endfor %}</table>

<h2 id="evaluations">Recorded evaluations</h2>
{% if eval_rows %}
<p class="note">Values in %. Δ = SOAP − raw with a paired bootstrap 95% CI over images; <span class="sig">*</span> = the CI excludes 0.</p>
<table id="evaluations-table">
<tr><th>evaluation</th><th>dataset</th><th>metric</th><th>n</th><th>raw</th><th>SOAP</th><th>Δ [95% CI]</th>
<th>improved / worsened / unchanged</th><th>head</th></tr>
{% for r in eval_rows %}<tr><td>{{ r.evaluation }}</td><td>{{ r.dataset }}</td><td>{{ r.metric }}</td><td class="num">{{ r.n }}</td>
<td class="num">{{ "%.2f" % r.raw }}</td><td class="num">{{ "%.2f" % r.soap }}</td>
<td class="num{% if r.significant %} sig{% endif %}">{{ r.delta_text }}</td>
<td class="num">{{ r.improved }} / {{ r.worsened }} / {{ r.unchanged }}</td><td>{{ r.head }}</td></tr>
{% endfor %}</table>
{% else %}<p id="no-evaluations">No evaluation recorded for this version
(<code>soap eval … --head {{ title }} --record</code> or <code>soap refit --evaluate …</code> adds them).</p>{% endif %}
{% for key, text in eval_other.items() %}<h3>{{ key }}</h3><pre>{{ text }}</pre>{% endfor %}

<h2 id="diff">Changes since the previous version</h2>
{% if diff %}
<p>{{ diff.a }} → {{ diff.b }}{% if diff.same_content %} (identical content){% endif %}</p>
<table id="diff-table">
<tr><th>suppressed components</th><td>{{ diff.n_suppressed[0] }} → {{ diff.n_suppressed[1] }}
 (ranks {{ diff.suppressed_ranks[0] }} → {{ diff.suppressed_ranks[1] }})</td></tr>
<tr><th>principal angles between the suppressed subspaces</th><td>{{ angles }}</td></tr>
<tr><th>‖P<sub>a</sub> − P<sub>b</sub>‖<sub>F</sub></th><td>{{ "%.6g" % diff.projector_frobenius }}
 (relative {{ "%.3g" % diff.projector_frobenius_relative }})</td></tr>
{% for k, ab in diff.parameters.items() %}<tr><th>{{ k }}</th><td class="val">{{ ab[0] }} → {{ ab[1] }}</td></tr>
{% endfor %}</table>
{% if diff.matches_a_to_b %}
<table id="diff-matches">
<tr><th colspan="6">suppressed components of {{ diff.a }} and their best match in {{ diff.b }}</th></tr>
<tr><th>rank</th><th>match rank</th><th>|cos|</th><th>SI score</th><th>→ SI score</th><th>change</th></tr>
{% for m in diff.matches_a_to_b %}<tr><td class="num">{{ m.rank }}</td><td class="num">{{ m.match_rank }}</td>
<td class="num">{{ "%.3f" % m.abs_cos }}</td><td class="num">{{ "%.4f" % m.score }}</td>
<td class="num">{{ "%.4f" % m.match_score }}</td><td class="num">{{ "%+.4f" % m.score_change }}</td></tr>
{% endfor %}</table>{% endif %}
{% else %}<p id="no-diff">{{ no_diff_reason }}</p>{% endif %}

<h2 id="manifest">Manifest</h2>
<table id="manifest-table">
{% for k, v in manifest %}<tr><td class="key">{{ k }}</td><td class="val">{{ v }}</td></tr>
{% endfor %}</table>

<h2 id="lineage">Lineage</h2>
<table id="lineage-table">
{% for k, v in lineage %}<tr><td class="key">{{ k }}</td><td class="val">{{ v }}</td></tr>
{% endfor %}</table>

<p class="note">Written by soapflow {{ soapflow_version }} at {{ now }}.</p>
</body>
</html>
""")


def render_report(art: Artifact, record: dict | None = None, diff: dict | None = None, *,
                  regenerate_plots: bool = True, no_diff_reason: str | None = None) -> str:
    """The HTML page of one artifact; ``record`` (``Registry.record``) adds the registry's view:
    version, aliases, lineage and evaluations; ``diff`` (``diff_artifacts``) the previous version."""
    from soapflow import __version__
    from soapflow.plots import fit_description

    m = art.manifest
    rec = record or {}
    title = rec.get("ref") or (f"{m['name']}:{m['version']}" if m.get("name") and m.get("version") else str(art.path))
    summary = [("backbone", f"{m.get('backbone')} layer {m.get('layer')} ({m.get('feature') or 'out'}), "
                            f"grid {m.get('grid')}, D = {m.get('dim')}, image size {m.get('image_size')}"),
               ("parameters", f"μ = {m.get('mu')} ({m.get('mu_mode')}), τ = {m.get('tau')}, γ = {m.get('gamma')}, "
                              f"threshold = {m.get('threshold')}"),
               ("suppressed components", m.get("n_suppressed")),
               ("images", f"{m.get('n_real_images')} real, {m.get('n_synth_images')} synthetic"),
               ("sha256", m.get("content_hash"))]
    if rec:
        summary += [("registry", rec.get("registry")), ("aliases", ", ".join(rec.get("aliases") or []) or "-"),
                    ("published", rec.get("published")), ("supersedes", rec.get("supersedes") or "-")]
    else:
        summary.append(("artifact", str(art.path)))
    lineage = dict(rec.get("lineage") or m.get("lineage") or {})
    if not rec.get("lineage"):
        lineage["stores"] = m.get("stores") or {}
    for key in ("publisher", "source", "committed"):
        if rec.get(key):
            lineage[key] = rec[key]
    evaluations = rec.get("evaluations") if rec else m.get("evaluation")
    eval_rows, eval_other = _evaluations(evaluations or {})
    angles = (diff or {}).get("principal_angles_deg") or []
    return _TEMPLATE.render(
        title=title, description=fit_description(m), summary=summary, plots=_plots(art, regenerate_plots),
        components=_components(art), eval_rows=eval_rows, eval_other=eval_other, diff=diff,
        angles=", ".join(f"{a:.2f}°" for a in angles) if angles else "n/a (one side suppresses nothing)",
        no_diff_reason=no_diff_reason or "This is the first version of its name: nothing to compare with.",
        manifest=_flatten({k: v for k, v in m.items() if k not in _SECTIONED}),
        lineage=_flatten(lineage), soapflow_version=__version__,
        now=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def previous_version(registry, name: str, version: int, record: dict | None = None) -> int | None:
    """The version this one superseded when published, else the highest committed one below it."""
    sup = (record or {}).get("supersedes")
    versions = registry.versions(name)
    if isinstance(sup, int) and sup in versions:
        return sup
    older = [v for v in versions if v < version]
    return older[-1] if older else None


def version_report(registry, ref: str, *, regenerate_plots: bool = True) -> str:
    """The HTML page of one registry version (pulled and hash-verified into a temporary directory)."""
    from soapflow.storage.diff import diff_artifacts

    name, version = registry.resolve(ref)
    record = registry.record(f"{name}:{version}")
    prev = previous_version(registry, name, version, record)
    with tempfile.TemporaryDirectory(prefix="soap-report-") as tmp:
        art = read_artifact(registry.pull(f"{name}:{version}", Path(tmp) / "this"))
        diff = None
        if prev is not None:
            old = read_artifact(registry.pull(f"{name}:{prev}", Path(tmp) / "previous"))
            diff = diff_artifacts((f"{name}:{prev}", old), (f"{name}:{version}", art))
        return render_report(art, record, diff, regenerate_plots=regenerate_plots)


def artifact_report(path: str | os.PathLike, *, regenerate_plots: bool = True) -> str:
    """The HTML page of an artifact directory that was not published."""
    return render_report(read_artifact(path), None, None, regenerate_plots=regenerate_plots,
                         no_diff_reason="Not published to a registry: no previous version to compare with.")


def write_report(path: str | os.PathLike, html: str) -> Path:
    """Write the page atomically (a reader never sees half of it)."""
    path = Path(path)
    if path.is_dir():
        raise SoapError(f"report {path}: that is a directory; give a file name such as report.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SoapError(f"report {path}: cannot write it ({exc.strerror or exc})") from None
    return path


def report_path_beside(artifact_dir: str | os.PathLike) -> Path:
    """Where a refit puts the page: next to the artifact directory, ``<artifact>.report.html``."""
    p = Path(artifact_dir)
    return p.with_name(f"{p.name}.report.html")



def refit_report(artifact_dir: str | os.PathLike, registry: str | None = None, ref: str | None = None) -> Path:
    """The page a refit writes beside its artifact: from the registry when it was published
    (with evaluations and the diff), else from the directory. Reuses the plots the fit drew."""
    if ref:
        from soapflow.storage.registry import Registry

        html = version_report(Registry(registry), ref, regenerate_plots=False)
    else:
        html = artifact_report(artifact_dir, regenerate_plots=False)
    return write_report(report_path_beside(artifact_dir), html)
