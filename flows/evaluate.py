"""The ``evaluate`` flow: zero-shot evaluations of one SOAP head, raw vs SOAP (SPEC §5).

    resolve head (pin name:version) ─> salient (per τ) ─> knn-seg ─> knn-cls ─> record ─> Prefect artifacts

Runs with no Prefect server (ephemeral mode). Evaluations run one after another (they share
the CPU/GPU and the token cache: each dataset is extracted once per run). Results go into the
registry version's record when the head is a registry ref (an artifact directory is immutable:
its results are returned and written as JSON under ``out_dir`` only).

Calling style, as in every flow: tasks are started with ``.submit(...)`` and their values taken
with ``.result()``. Here each step needs the previous one's value (or the device it holds), so
each ``.result()`` follows at once; the style is the one that lets ``refit`` run its
extractions side by side, kept here so that all flows read alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from soapflow.common import default_workdir, slug, utc_stamp
from soapflow.config import EVALUATIONS, EvalSettings
from soapflow.tasks.evaluate import knn_cls_task, knn_seg_task, record_task, resolve_head_task, salient_task


def default_out_dir(head_ref: str) -> Path:
    name = slug(os.path.basename(head_ref.rstrip("/")) or head_ref, limit=80)
    return default_workdir() / "evaluations" / f"{name}-{utc_stamp()}"


@flow(name="evaluate", log_prints=True)
def evaluate(
    head_ref: str,
    settings: EvalSettings = EvalSettings(),  # noqa: B008 - frozen: Prefect copies parameters anyway
    *,
    registry: str | None = None,
    image_size: int | None = None,
    weights: str | None = None,
    device: str = "cpu",
    cache_dir: str | None = None,
    out_dir: str | None = None,
    record: bool = True,
    progress: bool = False,
) -> dict:
    """Evaluate ``head_ref`` (registry ref or artifact directory) raw vs SOAP, as ``settings`` say.

    ``image_size`` None = the size the head was fitted at. Returns
    ``{"head": ..., "reports": {key: report}, "recorded": ..., "out_dir": ...}``."""
    from soapflow.errors import SoapError
    from soapflow.evaluation.report import markdown_table, table_rows, write_json
    from soapflow.evaluation.run import report_key

    logger = get_run_logger()
    s = settings
    if not s.evaluations:
        raise SoapError(f"evaluations must be a non-empty subset of {list(EVALUATIONS)}, got []")
    head = resolve_head_task.submit(head_ref, registry).result()
    pinned = head["pinned"]
    logger.info("head %s -> %s (%s layer %s)", head_ref, pinned, head["manifest"].get("backbone"),
                head["manifest"].get("layer"))
    out = Path(out_dir) if out_dir else default_out_dir(head_ref)
    out.mkdir(parents=True, exist_ok=True)
    own_cache = cache_dir is None
    cache = cache_dir or tempfile.mkdtemp(prefix="soap-eval-tokens-")
    ctx_kw = dict(registry=registry, weights=weights, image_size=image_size, device=device)
    common = dict(settings=s, cache_dir=cache, progress=progress)
    reports: dict[str, dict] = {}
    try:
        if "salient" in s.evaluations:
            for tau in s.taus:
                rep = salient_task.submit(pinned, **ctx_kw, tau=tau, grid_png=str(out / f"salient-tau{tau:g}.png"),
                                          **common).result()
                reports[report_key(rep)] = rep
        if "knn-seg" in s.evaluations:
            rep = knn_seg_task.submit(pinned, **ctx_kw, grid_png=str(out / "knn-seg.png"), **common).result()
            reports[report_key(rep)] = rep
        if "knn-cls" in s.evaluations:
            rep = knn_cls_task.submit(pinned, **ctx_kw, **common).result()
            reports[report_key(rep)] = rep
    finally:
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)

    for key, rep in reports.items():
        write_json(out / f"{key}.json", rep)
    recorded = None
    if record and head["from_registry"]:
        recorded = record_task.submit(pinned, registry, reports).result()
        logger.info("recorded %d evaluations in %s %s", len(reports), recorded["registry"], pinned)
    elif record:
        logger.info("head %s is an artifact directory (immutable): results only in %s", head_ref, out)

    _publish(head, list(reports.values()), out, recorded)
    rows = [row for rep in reports.values() for row in table_rows(rep)]
    print(markdown_table(list(reports.values())))
    return {"head": head, "reports": reports, "rows": rows, "recorded": recorded, "out_dir": str(out)}


def _publish(head: dict, reports: list[dict], out: Path, recorded: dict | None) -> None:
    from soapflow.evaluation.report import markdown_table, table_rows

    m = head["manifest"]
    rows = [row for rep in reports for row in table_rows(rep)]
    create_table_artifact(table=rows, key="soap-eval-table",
                          description=f"Raw vs SOAP (values in %), {m.get('backbone')} layer {m.get('layer')}, "
                                      f"head {head['pinned']}")
    lines = [f"# SOAP zero-shot evaluation: {m.get('backbone')}, layer {m.get('layer')}", "",
             f"- head: `{head['pinned']}` (sha256 `{str(m.get('content_hash'))[:16]}…`)",
             f"- results: `{out}`"]
    if recorded:
        lines.append(f"- recorded in `{recorded['registry']}` as {', '.join(recorded['keys'])}")
    lines += ["", "Δ = SOAP − raw with a paired bootstrap 95% CI over images (* = CI excludes 0).", "",
              markdown_table(reports), ""]
    for rep in reports:
        if rep.get("grid_png"):
            uri = Path(rep["grid_png"]).resolve().as_uri()
            lines.append(f"- [{rep['evaluation']} grid (image, GT, raw, SOAP)]({uri})")
    create_markdown_artifact(markdown="\n".join(lines), key="soap-eval-summary")


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(evaluate(sys.argv[1]))
