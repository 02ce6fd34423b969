"""``soap extract`` (one feature store) and ``soap refit`` (the whole flow)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from soapflow.cli.fit import parse_mu
from soapflow.extract import DEFAULT_CHUNK, DEFAULT_GPU_CHUNK

CHUNK_HELP = f"Images per store chunk (default: {DEFAULT_CHUNK} on CPU, {DEFAULT_GPU_CHUNK} on GPU)."
SHARE_HELP = ("Share of JPEGs the decode processes decode with Pillow while the GPU decodes the rest (nvJPEG), "
              "every image by its index; 0 to 1 (default on GPU: from the measured rates and --workers).")


def extract(
    source: Annotated[str, typer.Option(help="A folder, 'photos', 'fashion-mnist[:train|:test]' or 'noise:<generator>'.")],
    out: Annotated[str, typer.Option(help="Feature store to write (path or URL); an interrupted one resumes.")],
    backbone: Annotated[str, typer.Option(help="Catalog name or timm ViT name.")] = "dinov2_vits14",
    weights: Annotated[Optional[str], typer.Option(help="Checkpoint path, or 'random'.")] = None,
    layer: Annotated[int, typer.Option(help="Block index; negative counts from the end.")] = -1,
    feature: Annotated[str, typer.Option(help="out | q | k | v | kqv")] = "out",
    final_norm: Annotated[str, typer.Option(help="The model's final norm on the tokens: auto (after the last block "
                                                  "only, as forward_features and the authors), on (every block), off.")] = "auto",
    n: Annotated[Optional[int], typer.Option(help="Number of images (required for noise).")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Input size (multiple of the patch size).")] = None,
    chunk: Annotated[Optional[int], typer.Option(help=CHUNK_HELP)] = None,
    seed: Annotated[int, typer.Option(help="Seed of synthetic images.")] = 0,
    dtype: Annotated[str, typer.Option(help="float16 or float32.")] = "float16",
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 … (default: cuda if available).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decode processes (default: 0 on CPU, all cores but two on GPU).")] = None,
    cpu_decode_share: Annotated[Optional[float], typer.Option(help=SHARE_HELP)] = None,
    compress: Annotated[bool, typer.Option(help="zstd on the tokens of a new store: float16 tokens shrink only to "
                                                "~92 % and the fit reads ~5 % slower, but an object store may bill by the byte.")] = False,
) -> None:
    """Extract patch tokens of one image source into a feature store."""
    from rich.console import Console

    from soapflow.extract import extract as run_extract

    store, stats = run_extract(backbone, source, out, weights=weights, layer=layer, feature=feature, n=n,
                               image_size=image_size, chunk=chunk, seed=seed, dtype=dtype, device=device,
                               num_workers=workers, compress=compress, final_norm=final_norm,
                               cpu_decode_share=cpu_decode_share)
    attrs = store.attrs
    console = Console(soft_wrap=True)
    codecs = ", ".join(type(c).__name__ for c in store.tokens.compressors) or "uncompressed"
    console.print(f"store: {store.uri}  tokens {store.shape} {store.tokens.dtype} ({codecs}), block {attrs.get('layer')} "
                  f"{'after' if attrs.get('final_norm') else 'before'} the final norm")
    console.print(f"wrote {stats.images} images in {stats.chunks} chunks ({stats.images_per_second:.1f} img/s: "
                  f"{stats.breakdown()}); skipped files: {attrs.get('n_skipped', 0)}")
    for item in (attrs.get("skipped") or [])[:10]:
        console.print(f"  skipped {item['path']}: {item['reason']}")


def refit(
    backbone: Annotated[str, typer.Option(help="Catalog name or timm ViT name.")] = "dinov2_vits14",
    weights: Annotated[Optional[str], typer.Option(help="Checkpoint path, or 'random'.")] = None,
    layer: Annotated[int, typer.Option(help="Block index; negative counts from the end.")] = -1,
    feature: Annotated[str, typer.Option(help="out | q | k | v | kqv")] = "out",
    final_norm: Annotated[str, typer.Option(help="The model's final norm on the tokens: auto (after the last block "
                                                  "only, as forward_features and the authors), on (every block), off.")] = "auto",
    data: Annotated[str, typer.Option(help="Real images: folder, 'photos', 'fashion-mnist[:split]'.")] = "photos",
    n_real: Annotated[Optional[int], typer.Option(help="Real images to use (default: all).")] = None,
    n_synth: Annotated[Optional[int], typer.Option(help="Synthetic images (default: as many as real).")] = None,
    generator: Annotated[str, typer.Option(help="Noise generator of the synthetic set.")] = "mixture",
    image_size: Annotated[Optional[int], typer.Option(help="Input size.")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    mu: Annotated[str, typer.Option(help="Soft count of suppressed components, or 'auto'.")] = "2",
    tau: Annotated[float, typer.Option()] = 0.05,
    gamma: Annotated[float, typer.Option()] = 1.0,
    threshold: Annotated[float, typer.Option()] = 0.75,
    chunk: Annotated[Optional[int], typer.Option(help=CHUNK_HELP)] = None,
    device: Annotated[Optional[str], typer.Option()] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader decode processes per extraction (default: 0 on CPU, all cores but two on GPU).")] = None,
    cpu_decode_share: Annotated[Optional[float], typer.Option(help=SHARE_HELP)] = None,
    shards: Annotated[int, typer.Option(help="Parallel extraction tasks per store.")] = 1,
    workdir: Annotated[Optional[str], typer.Option(help="Where stores and artifacts go (default ~/.cache/soapflow/work).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Artifact directory.")] = None,
    registry: Annotated[Optional[str], typer.Option(help="Registry root to publish to.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Registry name (default <backbone>/<layer>).")] = None,
    publish: Annotated[bool, typer.Option(help="Publish the artifact to the registry.")] = True,
    evaluate: Annotated[Optional[str], typer.Option(help="After publishing, run these evaluations (e.g. knn-seg,salient) and record them.")] = None,
    dask_address: Annotated[Optional[str], typer.Option(help="Run tasks and the fit on this dask cluster.")] = None,
) -> None:
    """Run the refit flow: extract real ∥ synthetic tokens, fit, write (and publish) the artifact."""
    from soapflow import timeline

    timeline.mark("start, CLI imports")
    from rich.console import Console
    from rich.table import Table

    from flows.refit import refit as refit_flow
    from flows.refit import quick_local_run
    from soapflow.errors import SoapError
    from soapflow.extract import TIMINGS, ExtractStats

    timeline.mark("prefect and flow imports")

    if tau <= 0:
        raise SoapError(f"--tau must be > 0, got {tau}")
    mu_value = parse_mu(mu)
    from soapflow.backbones import parse_final_norm

    final_norm = parse_final_norm(final_norm)
    flow = refit_flow
    if dask_address:
        from prefect_dask import DaskTaskRunner

        flow = refit_flow.with_options(task_runner=DaskTaskRunner(address=dask_address))
    with quick_local_run(backbone, weights, layer, feature, image_size, device, data, n_real, seed, final_norm):
        timeline.mark("settings")
        result = flow(backbone=backbone, weights=weights, layer=layer, feature=feature, final_norm=final_norm,
                      data=data, n_real=n_real,
                      n_synth=n_synth, generator=generator, image_size=image_size, seed=seed, mu=mu_value, tau=tau,
                      gamma=gamma, threshold=threshold, chunk=chunk, device=device, shards=shards,
                      num_workers=workers, cpu_decode_share=cpu_decode_share, workdir=workdir, out=out,
                      registry=registry, name=name, publish=publish,
                      evaluate_after=[e.strip() for e in evaluate.split(",") if e.strip()] if evaluate else None,
                      dask_address=dask_address)
    timeline.mark("flow end, server stop")
    console = Console(soft_wrap=True)
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
    console.print(f"artifact: {result['artifact']}")
    console.print(f"plots:    {result['artifact']}/plots/")
    if result.get("ref"):
        note = "" if result.get("published_new_version") else " (identical content was already published)"
        console.print(f"registry: {result['ref']}  in {result['registry']}{note}")
    if result.get("evaluation"):
        console.print(f"evaluations recorded in {result['ref']}: soap registry show {result['ref']}")
