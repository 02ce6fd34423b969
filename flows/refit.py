"""The ``refit`` flow: real ∥ synthetic extraction → fit → artifact (→ registry).

    extract real chunks ─┐
                         ├─> fit ─> artifact ─> publish
    extract noise chunks ┘

Runs with no Prefect server (ephemeral mode), on the default thread pool or on a dask
cluster via ``DaskTaskRunner``; the artifact is the same either way.

Calling style: every task is started with ``.submit(...)``, and a value is taken with
``.result()`` only where the flow itself needs it. Submitting is what lets the real and the
synthetic extractions (and the shards of each) run side by side on any task runner; one style
for every task keeps the flows readable as one pattern. Tasks hand each other the typed
records of ``soapflow.results``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import dataclasses
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from soapflow import cancel, timeline
from soapflow.common import default_workdir, is_url, slug
from soapflow.config import BackboneSpec, EvalSettings, RefitConfig, RunSettings
from soapflow.extract import default_chunk
from soapflow.tasks.extract import extract_shard, finalize_store, prepare_store
from soapflow.tasks.fit import fit_artifact
from soapflow.tasks.publish import publish_artifact


def store_uri(workdir: Path, named: dict, source: str, n, seed: int, run: RunSettings) -> str:
    """Stores are named by what they hold (``named``: the backbone spec with its block index and
    final norm resolved), so later refits on the same inputs reuse them."""
    key = json.dumps({"spec": named, "source": source, "n": n, "seed": seed, "chunk": run.chunk, "dtype": run.dtype},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    norm = "-norm" if named.get("final_norm") is True else ""
    return str(workdir / "stores" / f"{slug(named['name'])}-L{named['layer']}-{named['feature']}{norm}"
               / f"{slug(source)}-{digest}")


def _extract(spec: BackboneSpec, uri: str, source: str, n, seed: int, run: RunSettings,
             cpu_decode_share: float | None = None):
    plan = prepare_store.submit(uri, spec, source, n, seed, run.chunk, run.dtype, run.shards).result()
    futures = [extract_shard.submit(plan.uri, plan.created, chunks, spec, source, n, seed, run.num_workers,
                                    run.progress, cpu_decode_share=cpu_decode_share)
               for chunks in plan.shards]
    return plan, futures, finalize_store.submit(plan.uri, futures)


@contextlib.contextmanager
def quick_local_run(config: RefitConfig):
    """Around a one-off ``refit`` call (``soap refit``): loads the model and opens the real source
    (raising on bad input before any flow starts) and yields ``soapflow.preflight.Loaded``.

    With no ``PREFECT_API_URL`` the temporary server boots in its own process while this thread
    loads the model and scans the source, instead of one after the other; when that fails the
    server is stopped before it was ever used, so a bad input is one line. Heartbeats are off:
    this server dies with the process, so nobody needs them.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL, temporary_settings

    from soapflow import preflight

    server = None
    if not PREFECT_API_URL.value():  # no real server: boot the temporary one meanwhile
        from soapflow.flows.temporary_server import temporary_server

        server = temporary_server()
        server.start()
        timeline.mark("server process start")
    try:
        b, d = config.backbone.on_device(), config.data
        loaded = preflight.load_inputs(b.name, b.weights, b.layer, b.feature, b.image_size, b.device, d.real, d.n_real,
                                       d.seed, final_norm=b.final_norm)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    timeline.mark("model (torch, timm imports included) and source scan")
    with contextlib.suppress(Exception):
        import distributed  # noqa: F401  what the fit and its plots import, while the server starts
        import matplotlib.pyplot  # noqa: F401
    timeline.mark("fit's imports")
    quiet_input_errors(console=True)
    if server is None:
        yield loaded
        return
    url = server.wait_ready()
    timeline.mark("waiting for the server")
    # no UI URL: this server serves no UI, so Prefect should not print "View at" links to it
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: "",
                                     PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield loaded


def check_parameters(config: RefitConfig) -> None:
    """The refit's input checks that need no model (run first, so a bad count creates no store)."""
    from soapflow import preflight

    fit, data, run = config.fit, config.data, config.run
    preflight.check_cheap(data=data.real, weights=config.backbone.weights, image_size=config.backbone.image_size,
                          fit=(fit.mu_label, fit.tau, fit.gamma, fit.threshold),
                          counts={"--n-real": data.n_real, "--n-synth": data.n_synth, "--chunk": run.chunk,
                                  "--shards": run.shards})


@flow(name="refit", log_prints=True)
def refit(config: RefitConfig = RefitConfig()) -> dict:  # noqa: B008 - frozen, and Prefect copies parameters
    """Refit SOAP for one backbone/layer on real images and synthetic noise.

    ``config`` (``soapflow.config.RefitConfig``): the backbone, the fit parameters, the images,
    how the work runs, and where the artifact goes. It is published to ``config.output.registry``
    (default: ``$SOAPFLOW_REGISTRY`` or the per-user registry) unless ``output.publish`` is false;
    ``output.evaluate_after`` (e.g. ``["knn-seg"]``) runs the ``evaluate`` flow on the published
    version, which records its results there.
    """
    from soapflow.extract import load

    timeline.mark("flow run created")
    quiet_input_errors()
    logger = get_run_logger()
    data, run, output = config.data, config.run, config.output
    check_parameters(config)
    work = Path(run.workdir) if run.workdir else default_workdir()
    spec = config.backbone.on_device()
    bb = load(spec)  # fail fast on a bad name/weights/layer, before any task runs
    # Stores are named by the resolved block index and final norm (the same store whether given as
    # -1 or 11, auto or on); tasks get the spec as given, so they hit the model already cached here.
    named = {**asdict(spec), "layer": bb.layer, "final_norm": bb.final_norm_at()}
    logger.info("backbone %s layer %d (%s, %s the final norm) grid %s dim %d on %s", bb.name, bb.layer, bb.feature,
                "after" if bb.final_norm_at() else "before", bb.grid, bb.dim, spec.device)

    # the chunk by device when not given: the store's name and layout then say which it is
    run = dataclasses.replace(run, chunk=run.chunk or default_chunk(spec.device))
    real_uri = store_uri(work, named, data.real, data.n_real, data.seed, run)
    real_plan, real_shards, real_done = _extract(spec, real_uri, data.real, data.n_real, data.seed, run,
                                                 run.cpu_decode_share)
    synth_n = data.n_synth or real_plan.count
    synth_uri = store_uri(work, named, data.synthetic, synth_n, data.seed, run)
    _, synth_shards, synth_done = _extract(spec, synth_uri, data.synthetic, synth_n, data.seed, run)

    artifact_dir = output.out or str(work / "artifacts" / f"{slug(bb.name)}-L{bb.layer}")
    previous = _artifact_hash(artifact_dir)
    from prefect.runtime import flow_run

    lineage = {"flow_run_id": str(flow_run.id) if flow_run.id else None, "flow_run_name": flow_run.name,
               "final_norm": bb.final_norm_at()}
    for shard in (*real_shards, *synth_shards):
        # a failed extraction's own error (bad input, Ctrl-C): finalizing after it would only say
        # "upstream task did not complete"
        shard.result()
    real_extracted, synth_extracted = real_done.result(), synth_done.result()
    timeline.mark("extraction")
    cancel.check()  # Ctrl-C between stages: the stores are complete, the fit has not started
    fitted = fit_artifact.submit(real_extracted.uri, synth_extracted.uri, artifact_dir, config.fit,
                                 dask_address=run.dask_address, extra_manifest={"lineage": lineage},
                                 device=spec.device).result()
    timeline.mark("fit")
    result = {
        "artifact": fitted.path,
        "content_hash": fitted.content_hash,
        "n_suppressed": fitted.manifest["n_suppressed"],
        "mu": fitted.manifest["mu"],
        "final_norm": fitted.manifest.get("final_norm", False),
        "top": fitted.top,
        "stores": {"real": real_uri, "synthetic": synth_uri},
        "extraction": {"real": real_extracted.summary(), "synthetic": synth_extracted.summary()},
        "skipped_images": real_plan.skipped,
        "ref": None,
        "warnings": fitted.warnings,
        "replaced": previous if previous not in (None, fitted.content_hash) else None,
    }
    cancel.check()  # Ctrl-C during the fit: the artifact is written, nothing is published
    if output.publish:
        published = publish_artifact.submit(fitted.path, output.registry, output.name, lineage,
                                            output.storage_options).result()
        result["ref"] = published.ref
        result["registry"] = published.registry
        result["published_new_version"] = published.created
        logger.info("published %s%s", published.ref, "" if published.created else " (identical content already there)")
        if output.evaluate_after:
            from soapflow.flows.evaluate import evaluate

            settings = EvalSettings(evaluations=tuple(output.evaluate_after), dataset=output.eval_dataset,
                                    n=output.eval_n)
            result["evaluation"] = evaluate(published.ref, settings, registry=published.registry,
                                            weights=spec.weights, device=spec.device, progress=False)
    timeline.mark("publish")
    from soapflow.storage.html_report import refit_report

    result["report"] = str(refit_report(result["artifact"], result.get("registry"), result["ref"]))
    timeline.mark("report")
    _publish_prefect_artifacts(result, bb)
    timeline.mark("prefect artifacts")
    return result


def _artifact_hash(path: str) -> str | None:
    """Content hash of the artifact already at ``path`` (None when there is none)."""
    from soapflow.storage.artifact import read_manifest

    try:
        return read_manifest(path).get("content_hash")
    except Exception:  # nothing there, or not an artifact: nothing is being replaced
        return None


def quiet_input_errors(console: bool = False) -> None:
    """Prefect logs a task's or flow's exception with its traceback; for bad input (``SoapError``)
    and Ctrl-C (``Interrupted``) one line says it all. ``console``: also keep those lines off the
    terminal, where the command prints its own ``error: …`` (they still reach the Prefect API).
    Idempotent."""
    import logging

    from soapflow.cancel import Interrupted
    from soapflow.errors import SoapError

    class _OneLine(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            exc = record.exc_info[1] if record.exc_info else None
            if isinstance(exc, (SoapError, Interrupted)):
                record.exc_info = None
                record.exc_text = None
            return True

    class _OffConsole(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
                return True
            exc = record.exc_info[1] if record.exc_info else None
            text = record.getMessage()
            return not (isinstance(exc, (SoapError, Interrupted)) or "SoapError" in text or "Interrupted" in text)

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(type(f).__name__ == "_OneLine" for f in logger.filters):
            logger.addFilter(_OneLine())
    if console:
        from prefect.logging.handlers import PrefectConsoleHandler

        for handler in logging.getLogger().handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                    type(f).__name__ == "_OffConsole" for f in handler.filters):
                handler.addFilter(_OffConsole())


def _publish_prefect_artifacts(result: dict, bb) -> None:
    create_table_artifact(table=result["top"], key="soap-top-si-scores",
                          description=f"Top SI scores, {bb.name} layer {bb.layer}")
    lines = [
        f"# SOAP refit: {bb.name}, layer {bb.layer} ({bb.feature}, "
        f"{'after' if result.get('final_norm') else 'before'} the final norm)",
        "",
        f"- components suppressed: **{result['n_suppressed']}** (μ = {result['mu']:g})",
        f"- artifact: `{result['artifact']}` (sha256 `{result['content_hash'][:16]}…`)",
        f"- real store: `{result['stores']['real']}`",
        f"- synthetic store: `{result['stores']['synthetic']}`",
        f"- skipped real images: {result['skipped_images']}",
        f"- HTML report: `{result['report']}`",
    ]
    if result.get("ref"):
        lines.append(f"- registry: `{result['ref']}`")
    if result.get("replaced"):
        lines.append(f"- replaced the previous artifact in that directory (sha256 `{result['replaced'][:16]}…`)")
    lines += [f"- **warning:** {w}" for w in result.get("warnings") or ()]
    create_markdown_artifact(markdown="\n".join(lines), key="soap-refit-summary")
    create_link_artifact(link=Path(result["artifact"]).resolve().as_uri(), link_text="SOAP artifact",
                         key="soap-artifact")
    create_link_artifact(link=Path(result["report"]).resolve().as_uri(), link_text="SOAP report (HTML)",
                         key="soap-report")
    for kind, uri in result["stores"].items():
        link = Path(uri).resolve().as_uri() if not is_url(uri) else uri
        create_link_artifact(link=link, link_text=f"{kind} feature store", key=f"soap-{kind}-store")
