"""``soap extract`` (one feature store) and ``soap refit`` (the whole flow)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from soapflow.errors import SoapError
from soapflow import defaults
from soapflow.cli import options as opt
from soapflow.config import BackboneSpec, DataSpec, FitParams, OutputSettings, RefitConfig, RunSettings
from soapflow.extract import DEFAULT_CHUNK


def extract(
    source: Annotated[str, typer.Option(help="A folder, 'photos', 'fashion-mnist[:train|:test]' or 'noise:<generator>'.")],
    out: Annotated[str, typer.Option(help="Feature store to write (path or URL); an interrupted one resumes.")],
    backbone: opt.Backbone = defaults.DEFAULT_BACKBONE,
    weights: opt.Weights = None,
    layer: opt.Layer = -1,
    feature: opt.Feature = "out",
    final_norm: opt.FinalNorm = "auto",
    n: Annotated[Optional[int], typer.Option(help="Number of images (required for noise; default: all the source has).",
                                             show_default=False)] = None,
    image_size: opt.ImageSize = None,
    chunk: opt.Chunk = None,
    seed: opt.Seed = 0,
    dtype: opt.Dtype = defaults.DEFAULT_DTYPE,
    device: opt.Device = None,
    workers: opt.Workers = None,
    cpu_decode_share: opt.CpuDecodeShare = None,
    compress: Annotated[bool, typer.Option(help="zstd on the tokens of a new store: float16 tokens shrink only to "
                                                "~92 % and the fit reads ~5 % slower, but an object store may bill by the byte.")] = False,
    storage_option: opt.StorageOption = None,
) -> None:
    """Extract patch tokens of one image source into a feature store."""
    from soapflow import preflight

    preflight.check_cheap(data=source, data_flag="--source", weights=weights, image_size=image_size,
                          counts={"--n": n, "--chunk": chunk})
    final_norm = preflight.final_norm(final_norm)
    preflight.decoding(workers, cpu_decode_share)
    storage_options = opt.parse_storage_options(storage_option)
    from rich.console import Console

    from soapflow.extract import extract as run_extract

    device = opt.resolve_device(device)
    loaded = preflight.load_inputs(backbone, weights, layer, feature, image_size, device, source, n, seed,
                                   final_norm=final_norm, n_flag="--n")
    console = Console(soft_wrap=True)
    for note in loaded.notes:
        console.print(f"note: {note}")
    from soapflow import cancel

    with cancel.deferred():  # Ctrl-C: finish the chunks being written, then stop
        spec = BackboneSpec(backbone, weights=weights, layer=layer, feature=feature, final_norm=final_norm,
                            image_size=image_size, device=device)
        store, stats = run_extract(spec, source, out, n=n, chunk=chunk, seed=seed, dtype=dtype, num_workers=workers,
                                   compress=compress, storage_options=storage_options,
                                   cpu_decode_share=cpu_decode_share)
    attrs = store.attrs
    codecs = ", ".join(type(c).__name__ for c in store.tokens.compressors) or "uncompressed"
    console.print(f"store: {store.uri}  tokens {store.shape} {store.tokens.dtype} ({codecs}), block {attrs.get('layer')} "
                  f"{'after' if attrs.get('final_norm') else 'before'} the final norm")
    console.print(f"wrote {stats.images} images in {stats.chunks} chunks ({stats.images_per_second:.1f} img/s: "
                  f"{stats.breakdown()}); skipped files: {attrs.get('n_skipped', 0)}")
    for item in (attrs.get("skipped") or [])[:10]:
        console.print(f"  skipped {item['path']}: {item['reason']}")


def _check_refit_out(out: str | None) -> None:
    """--out is replaced by the new artifact: only an artifact directory (or nothing) may be there."""
    import os

    if out is None or not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise SoapError(f"--out {out} is a file; give an artifact directory")
    if any(os.scandir(out)) and not os.path.isfile(os.path.join(out, "manifest.json")):
        raise SoapError(f"--out {out} exists and is not an artifact directory; refusing to replace what is in it")


def refit(
    backbone: opt.Backbone = defaults.DEFAULT_BACKBONE,
    weights: opt.Weights = None,
    layer: opt.Layer = -1,
    feature: opt.Feature = "out",
    final_norm: opt.FinalNorm = "auto",
    data: opt.Data = defaults.DEFAULT_DATA,
    n_real: opt.NReal = None,
    n_synth: opt.NSynth = None,
    generator: opt.Generator = defaults.DEFAULT_GENERATOR,
    image_size: opt.ImageSize = None,
    seed: opt.Seed = 0,
    mu: opt.Mu = opt.MU_DEFAULT,
    tau: opt.Tau = defaults.DEFAULT_TAU,
    gamma: opt.Gamma = defaults.DEFAULT_GAMMA,
    threshold: opt.Threshold = defaults.DEFAULT_THRESHOLD,
    chunk: opt.Chunk = None,
    device: opt.Device = None,
    workers: opt.Workers = None,
    cpu_decode_share: opt.CpuDecodeShare = None,
    shards: Annotated[int, typer.Option(help="Parallel extraction tasks per store.")] = 1,
    workdir: opt.Workdir = None,
    out: Annotated[Optional[str], typer.Option(
        help="Artifact directory (default: <workdir>/artifacts/<backbone>-L<layer>; a previous artifact there is "
             "replaced, and said so).", show_default=False)] = None,
    registry: opt.Registry = None,
    storage_option: opt.StorageOption = None,
    name: Annotated[Optional[str], typer.Option(help="Registry name (default <backbone>/<layer>).", show_default=False)] = None,
    publish: Annotated[bool, typer.Option("--publish/--no-publish", help="Publish the artifact to the registry.")] = True,
    evaluate: Annotated[Optional[str], typer.Option(help="After publishing, run these evaluations (e.g. knn-seg,salient) "
                                                         "and record them.", show_default=False)] = None,
    dask_address: Annotated[Optional[str], typer.Option(help="Run tasks and the fit on this dask cluster (tcp://…).",
                                                        show_default=False)] = None,
) -> None:
    """Run the refit flow: extract real ∥ synthetic tokens, fit, write (and publish) the artifact."""
    from soapflow import preflight, timeline

    timeline.mark("start, CLI imports")

    # everything that needs no model, before anything starts
    fit = FitParams.parse(mu, tau=tau, gamma=gamma, threshold=threshold)
    preflight.check_cheap(data=data, weights=weights, image_size=image_size,
                          fit=(fit.mu_label, fit.tau, fit.gamma, fit.threshold),
                          counts={"--n-real": n_real, "--n-synth": n_synth, "--chunk": chunk, "--shards": shards})
    final_norm = preflight.final_norm(final_norm)
    preflight.decoding(workers, cpu_decode_share)
    storage_options = opt.parse_storage_options(storage_option)
    _check_refit_out(out)
    evaluations = [e.strip() for e in evaluate.split(",") if e.strip()] if evaluate else None
    if evaluations:
        from soapflow.evaluation.scan import EVALUATIONS

        bad = [e for e in evaluations if e not in EVALUATIONS]
        if bad:
            raise SoapError(f"--evaluate: unknown evaluation {bad[0]!r}; choose from {', '.join(EVALUATIONS)}")
    from rich.console import Console
    from rich.table import Table

    from soapflow.flows.refit import quick_local_run
    from soapflow.flows.refit import refit as refit_flow
    from soapflow import cancel
    from soapflow.extract import TIMINGS, ExtractStats

    timeline.mark("prefect and flow imports")
    config = RefitConfig(
        backbone=BackboneSpec(backbone, weights=weights, layer=layer, feature=feature, final_norm=final_norm,
                              image_size=image_size, device=opt.resolve_device(device)),
        fit=fit,
        data=DataSpec(real=data, n_real=n_real, generator=generator, n_synth=n_synth, seed=seed),
        run=RunSettings(chunk=chunk, shards=shards, num_workers=workers, cpu_decode_share=cpu_decode_share,
                        workdir=workdir, dask_address=dask_address),
        output=OutputSettings(out=out, registry=registry, name=name, publish=publish, storage_options=storage_options,
                              evaluate_after=tuple(evaluations) if evaluations else None),
    )
    flow = refit_flow
    if dask_address:
        from prefect_dask import DaskTaskRunner

        flow = refit_flow.with_options(task_runner=DaskTaskRunner(address=dask_address))
    console = Console(soft_wrap=True)
    # the model and the real source load (and fail on bad input) before the flow starts
    with quick_local_run(config) as loaded:
        for note in loaded.notes:
            console.print(f"note: {note}")
        timeline.mark("settings")
        with cancel.deferred():  # Ctrl-C: the extraction threads stop at their next chunk
            result = flow(config)
    timeline.mark("flow end, server stop")
    table = Table(title="Top SI scores")
    for col in ("rank", "SI score", "weight", "explained var."):
        table.add_column(col, justify="right")
    for row in result["top"]:
        table.add_row(str(row["rank"]), f"{row['si_score']:.4f}", f"{row['weight']:.4f}",
                      f"{row['explained_variance']:.2%}")
    console.print(table)
    ext = result["extraction"]
    for kind in ("real", "synthetic"):
        e = ext[kind]
        stats = ExtractStats(images=e["written_images"], **{k: e.get(k, 0.0) for k in TIMINGS})
        console.print(f"{kind:9s} store: {e['uri']}  ({e['count']} images; {e['written_images']} extracted now"
                      + (f", {stats.images_per_second:.1f} img/s: {stats.breakdown()}" if stats.images else ", all reused")
                      + ")")
    if result["skipped_images"]:
        console.print(f"skipped unreadable real images: {result['skipped_images']} (listed in the store's attributes)")
    console.print(f"components suppressed: {result['n_suppressed']} (μ = {result['mu']:g})")
    for warning in result.get("warnings") or ():
        console.print(f"warning: {warning}")
    replaced = result.get("replaced")
    console.print(f"artifact: {result['artifact']}"
                  + (f"  (replaced the previous artifact there, sha256 {replaced[:16]}…)" if replaced else ""))
    console.print(f"plots:    {result['artifact']}/plots/")
    console.print(f"report:   {result['report']}")
    if result.get("ref"):
        note = "" if result.get("published_new_version") else " (identical content was already published)"
        console.print(f"registry: {result['ref']}  in {result['registry']}{note}")
    if result.get("evaluation"):
        console.print(f"evaluations recorded in {result['ref']}: soap registry show {result['ref']}")
