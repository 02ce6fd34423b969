"""The ``refit`` flow: real ∥ synthetic extraction → fit → artifact (→ registry).

    extract real chunks ─┐
                         ├─> fit ─> artifact ─> publish
    extract noise chunks ┘

Runs with no Prefect server (ephemeral mode), on the default thread pool or on a dask
cluster via ``DaskTaskRunner``; the artifact is the same either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from soapflow import cancel, timeline
from soapflow.extract import default_chunk, default_device
from tasks.extract import extract_shard, finalize_store, prepare_store
from tasks.fit import fit_artifact
from tasks.publish import publish_artifact


def default_workdir() -> Path:
    base = os.environ.get("SOAPFLOW_WORKDIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "soapflow", "work")
    return Path(base)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text).strip("-")[:60] or "x"


def store_uri(workdir: Path, spec: dict, source: str, n, seed: int, chunk: int, dtype: str) -> str:
    """Stores are named by what they hold, so later refits on the same inputs reuse them."""
    key = json.dumps({"spec": spec, "source": source, "n": n, "seed": seed, "chunk": chunk, "dtype": dtype},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    norm = "-norm" if spec.get("final_norm") is True else ""
    return str(workdir / "stores" / f"{_slug(spec['name'])}-L{spec['layer']}-{spec['feature']}{norm}"
               / f"{_slug(source)}-{digest}")


def _extract(spec, uri, source, n, seed, chunk, dtype, shards, num_workers, progress, cpu_decode_share=None):
    plan = prepare_store.submit(uri, spec, source, n, seed, chunk, dtype, shards).result()
    futures = [extract_shard.submit(plan["uri"], plan["created"], chunks, spec, source, n, seed, num_workers, progress,
                                    cpu_decode_share=cpu_decode_share)
               for chunks in plan["shards"]]
    return plan, futures


def backbone_spec(backbone: str, weights: str | None, layer: int, feature: str, image_size: int | None,
                  device: str | None, final_norm: str | bool = "auto") -> dict:
    """The ``cached_backbone`` arguments of a refit (the same dict, so the same cached model)."""
    from soapflow.backbones import parse_final_norm

    return {"name": backbone, "weights": weights, "layer": layer, "feature": feature, "image_size": image_size,
            "device": device or default_device(), "final_norm": parse_final_norm(final_norm)}


@contextlib.contextmanager
def quick_local_run(backbone: str, weights: str | None, layer: int, feature: str, image_size: int | None,
                    device: str | None, data: str, n_real: int | None, seed: int, final_norm: str | bool = "auto"):
    """Around a one-off ``refit`` call (``soap refit``): loads the model and opens the real source
    (raising on bad input before any flow starts) and yields ``soapflow.preflight.Loaded``.

    With no ``PREFECT_API_URL``, Prefect would start its temporary server on the flow's first API
    call (~3 s on 2 cores), and only then would the flow load the model (~3 s): here the server
    process starts first and boots while this thread loads the model, scans the real source and
    imports what the fit needs. When that fails the server is stopped before it was ever used
    (and before it was announced), so a bad input is one line. Flow-run heartbeats are off: they
    let a lasting server spot crashed runs, this server dies with the process, and stopping the
    heartbeat thread costs up to a second.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL, temporary_settings

    from soapflow import preflight

    server = None
    if not PREFECT_API_URL.value():  # no real server: boot the temporary one meanwhile
        from flows.temporary_server import temporary_server

        server = temporary_server()
        server.start()
        timeline.mark("server process start")
    try:
        loaded = preflight.load_inputs(backbone, weights, layer, feature, image_size, device or default_device(),
                                       data, n_real, seed, final_norm=final_norm)
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


def check_parameters(*, data: str, weights: str | None, n_real: int | None, n_synth: int | None, image_size,
                     mu, tau: float, gamma: float, threshold: float, chunk: int, shards: int) -> None:
    """The refit's input checks that need no model (run first, so a bad count creates no store)."""
    from soapflow import preflight

    preflight.check_cheap(data=data, weights=weights, image_size=image_size, fit=(mu, tau, gamma, threshold),
                          counts={"--n-real": n_real, "--n-synth": n_synth, "--chunk": chunk, "--shards": shards})


@flow(name="refit", log_prints=True)
def refit(
    backbone: str = "dinov2_vits14",
    weights: str | None = None,
    layer: int = -1,
    feature: str = "out",
    final_norm: str | bool = "auto",
    data: str = "photos",
    n_real: int | None = None,
    n_synth: int | None = None,
    generator: str = "mixture",
    image_size: int | None = None,
    seed: int = 0,
    mu: float | str = 2.0,
    tau: float = 0.05,
    gamma: float = 1.0,
    threshold: float = 0.75,
    chunk: int | None = None,
    dtype: str = "float16",
    device: str | None = None,
    shards: int = 1,
    num_workers: int | None = None,
    cpu_decode_share: float | None = None,
    workdir: str | None = None,
    out: str | None = None,
    registry: str | None = None,
    name: str | None = None,
    publish: bool = True,
    evaluate_after: list[str] | None = None,
    storage_options: dict | None = None,
    eval_dataset: str = "fashion-mnist",
    eval_n: int | None = 1000,
    dask_address: str | None = None,
    progress: bool = True,
) -> dict:
    """Refit SOAP for one backbone/layer on real images and synthetic noise.

    The artifact is published to ``registry`` (default: ``$SOAPFLOW_REGISTRY`` or the
    per-user registry; ``storage_options`` for an ``s3://`` one) unless ``publish`` is false.
    ``final_norm`` (auto / on / off): whether the tokens pass through the model's final norm (auto:
    at the last block only, as the authors fit). ``evaluate_after`` (e.g. ``["knn-seg"]``) runs the
    ``evaluate`` flow on the published version, which records its results there.
    """
    from soapflow.extract import cached_backbone

    timeline.mark("flow run created")
    quiet_input_errors()
    logger = get_run_logger()
    check_parameters(data=data, weights=weights, n_real=n_real, n_synth=n_synth, image_size=image_size, mu=mu, tau=tau,
                     gamma=gamma, threshold=threshold, chunk=chunk, shards=shards)
    work = Path(workdir) if workdir else default_workdir()
    spec = backbone_spec(backbone, weights, layer, feature, image_size, device, final_norm)
    bb = cached_backbone(**spec)  # fail fast on a bad name/weights/layer, before any task runs
    # Stores are named by the resolved block index and final norm (the same store whether given as
    # -1 or 11, auto or on); tasks get the spec as given, so they hit the model already cached here.
    named = {**spec, "layer": bb.layer, "final_norm": bb.final_norm_at()}
    logger.info("backbone %s layer %d (%s, %s the final norm) grid %s dim %d on %s", bb.name, bb.layer, bb.feature,
                "after" if bb.final_norm_at() else "before", bb.grid, bb.dim, spec["device"])

    chunk = chunk or default_chunk(spec["device"])
    real_uri = store_uri(work, named, data, n_real, seed, chunk, dtype)
    real_plan, real_futures = _extract(spec, real_uri, data, n_real, seed, chunk, dtype, shards, num_workers, progress,
                                       cpu_decode_share)
    synth_source = f"noise:{generator}"
    synth_n = n_synth or real_plan["count"]
    synth_uri = store_uri(work, named, synth_source, synth_n, seed, chunk, dtype)
    synth_plan, synth_futures = _extract(spec, synth_uri, synth_source, synth_n, seed, chunk, dtype, shards,
                                         num_workers, progress)
    real_done = finalize_store.submit(real_uri, real_futures)
    synth_done = finalize_store.submit(synth_uri, synth_futures)

    artifact_dir = out or str(work / "artifacts" / f"{_slug(bb.name)}-L{bb.layer}")
    previous = _artifact_hash(artifact_dir)
    from prefect.runtime import flow_run

    lineage = {"flow_run_id": str(flow_run.id) if flow_run.id else None, "flow_run_name": flow_run.name,
               "final_norm": bb.final_norm_at()}
    for shard in (*real_futures, *synth_futures):
        # a failed extraction's own error (bad input, Ctrl-C): finalizing after it would only say
        # "upstream task did not complete"
        shard.result()
    real_done.result(), synth_done.result()
    timeline.mark("extraction")
    cancel.check()  # Ctrl-C between stages: the stores are complete, the fit has not started
    fitted = fit_artifact.submit(real_done.result()["uri"], synth_done.result()["uri"], artifact_dir, mu=mu, tau=tau,
                                 gamma=gamma, threshold=threshold, dask_address=dask_address,
                                 extra_manifest={"lineage": lineage}, device=spec["device"]).result()
    timeline.mark("fit")
    result = {
        "artifact": fitted["path"],
        "content_hash": fitted["manifest"]["content_hash"],
        "n_suppressed": fitted["manifest"]["n_suppressed"],
        "mu": fitted["manifest"]["mu"],
        "final_norm": fitted["manifest"].get("final_norm", False),
        "top": fitted["top"],
        "stores": {"real": real_uri, "synthetic": synth_uri},
        "extraction": {"real": real_done.result(), "synthetic": synth_done.result()},
        "skipped_images": real_plan["skipped"],
        "ref": None,
        "warnings": fitted.get("warnings", []),
        "replaced": previous if previous not in (None, fitted["manifest"]["content_hash"]) else None,
    }
    cancel.check()  # Ctrl-C during the fit: the artifact is written, nothing is published
    if publish:
        published = publish_artifact.submit(fitted["path"], registry, name, lineage, storage_options).result()
        result["ref"] = published["ref"]
        result["registry"] = published["registry"]
        result["published_new_version"] = published["created"]
        logger.info("published %s%s", published["ref"], "" if published["created"] else " (identical content already there)")
        if evaluate_after:
            from flows.evaluate import evaluate

            result["evaluation"] = evaluate(head_ref=published["ref"], evaluations=list(evaluate_after),
                                            dataset=eval_dataset, n=eval_n, registry=published["registry"],
                                            weights=weights, device=spec["device"], progress=False)
    timeline.mark("publish")
    from storage.html_report import refit_report

    result["report"] = str(refit_report(result["artifact"], result.get("registry"), result["ref"]))
    timeline.mark("report")
    _publish_prefect_artifacts(result, bb)
    timeline.mark("prefect artifacts")
    return result


def _artifact_hash(path: str) -> str | None:
    """Content hash of the artifact already at ``path`` (None when there is none)."""
    from storage.artifact import read_manifest

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
        link = Path(uri).resolve().as_uri() if "://" not in uri else uri
        create_link_artifact(link=link, link_text=f"{kind} feature store", key=f"soap-{kind}-store")
