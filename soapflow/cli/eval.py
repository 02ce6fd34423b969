"""``soap eval``: zero-shot evaluations of a SOAP head, raw vs SOAP on the same images (SPEC §5).

    soap eval salient --head dinov2_vits14/11@latest --dataset fashion-mnist --n 1000 --json out.json
    soap eval knn-seg --head artifacts/run-1 --dataset fashion-mnist --bank fashion-mnist:train
    soap eval knn-cls --head artifacts/run-1 --dataset fashion-mnist --pool mean,cls

``--head`` is an artifact directory or a registry ref. Every report gives raw, SOAP and the
paired difference with a 95% bootstrap CI over images, and how many images improved/worsened.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from soapflow.cli import options as opt
from soapflow.config import EvalSettings
from soapflow.errors import SoapError

app = typer.Typer(help="Zero-shot evaluations of a SOAP head: raw vs SOAP tokens.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, rich_markup_mode=None)

Head = Annotated[str, typer.Option("--head", help="Artifact directory or registry ref (name, name@alias, name:3).")]
Dataset = Annotated[str, typer.Option(help="fashion-mnist[:test|:train] or a dataset folder (ECSSD, DUTS-TE, DUT-OMRON, images/+masks/ …).")]
N = Annotated[Optional[int], typer.Option("--n", help="Evaluate the first N images (default: all).")]
ImageSize = Annotated[Optional[int], typer.Option(help="Input size (default: the head's fit size).")]
Json = Annotated[Optional[str], typer.Option("--json", help="Write the report as JSON here.")]
Registry = opt.Registry
StorageOption = opt.StorageOption
Weights = opt.Weights
Device = opt.Device
BatchSize = Annotated[int, typer.Option(help="Images per forward pass.")]
NBoot = Annotated[int, typer.Option(help="Bootstrap resamples for the CIs.")]
Seed = Annotated[int, typer.Option(help="Seed of the bootstrap (and of bank subsampling).")]
CacheDir = Annotated[Optional[str], typer.Option(help="Cache extracted tokens here (reused across evaluations).")]
Record = Annotated[bool, typer.Option("--record/--no-record", help="Also write the results into the registry version's record.")]
Quiet = opt.Quiet
Bank = Annotated[Optional[str], typer.Option(help="Labelled bank dataset (default for fashion-mnist: the other split).")]
BankN = Annotated[Optional[int], typer.Option(help="Bank images (first N).")]
Neighbours = Annotated[int, typer.Option(help="Neighbours.")]


def _check_knn(k: int, bank_n: int | None) -> None:
    if k < 1:
        raise SoapError(f"--k must be ≥ 1, got {k}")
    if bank_n is not None and bank_n < 1:
        raise SoapError(f"--bank-n must be ≥ 1, got {bank_n}")


def _context(head, registry, storage_option, weights, image_size, device):
    from soapflow.evaluation.run import load_context

    storage_options = opt.parse_storage_options(storage_option)
    if storage_options is not None:
        from soapflow.storage.registry import Registry as _Registry

        registry = _Registry(registry, storage_options)
    return load_context(head, registry=registry, weights=weights, image_size=image_size,
                        device=opt.resolve_device(device))


def _finish(report: dict, ctx, json_path: str | None, record: bool) -> None:
    from soapflow.evaluation.report import print_report, write_json
    from soapflow.evaluation.run import report_key

    print_report(report)
    if json_path:
        write_json(json_path, report)
        typer.echo(f"report: {json_path}")
    if record:
        if not ctx.from_registry:
            raise SoapError(
                f"--record needs a registry --head; {ctx.ref} is an artifact directory (artifacts are immutable: "
                "use --json to keep the results)"
            )
        from soapflow.storage.registry import Registry

        reg = ctx.registry if isinstance(ctx.registry, Registry) else Registry(ctx.registry)
        ref = f"{ctx.manifest.get('name')}:{ctx.manifest.get('version')}" if ctx.manifest.get("name") else ctx.ref
        key = report_key(report)
        reg.record_evaluation(ref, {key: report})
        typer.echo(f"recorded in {reg.root} {ref} as evaluation {key!r}")


@app.command("salient")
def salient(
    head: Head,
    dataset: Dataset = "fashion-mnist",
    n: N = None,
    image_size: ImageSize = None,
    tau: Annotated[float, typer.Option(help="Affinity threshold τ of TokenCut.")] = 0.2,
    soap_tau: Annotated[Optional[float], typer.Option(help="τ for the SOAP tokens (default: --tau; the authors use 0.3).")] = None,
    foreground: Annotated[str, typer.Option(help="Foreground rule: seed (largest |x − mean|) or pca (principal-component guide).")] = "seed",
    component: Annotated[bool, typer.Option("--component", help="Keep only the seed's connected component (TokenCut's detect_box).")] = False,
    refine: Annotated[bool, typer.Option("--refine", help="Also report masks refined by the fast bilateral solver.")] = False,
    json_path: Json = None,
    grid: Annotated[Optional[str], typer.Option(help="PNG grid (image, GT, raw mask, SOAP mask) path.")] = None,
    n_grid: Annotated[int, typer.Option(help="Images in the PNG grid.")] = 6,
    registry: Registry = None,
    storage_option: StorageOption = None,
    weights: Weights = None,
    device: Device = None,
    batch_size: BatchSize = 32,
    n_boot: NBoot = 2000,
    seed: Seed = 0,
    cache_dir: CacheDir = None,
    record: Record = False,
    quiet: Quiet = False,
) -> None:
    """Salient segmentation with TokenCut: max Fβ (β²=0.3), IoU, pixel accuracy."""
    from soapflow.evaluation.run import run_salient
    from soapflow.evaluation.tokencut import FOREGROUND_RULES

    if foreground not in FOREGROUND_RULES:
        raise SoapError(f"--foreground must be one of {', '.join(FOREGROUND_RULES)}, got {foreground!r}")
    if not -1 <= tau <= 1 or (soap_tau is not None and not -1 <= soap_tau <= 1):
        raise SoapError(f"--tau/--soap-tau are cosine thresholds in [-1, 1], got {tau} / {soap_tau}")
    _check_common(n, n_boot)
    ctx = _context(head, registry, storage_option, weights, image_size, device)
    settings = EvalSettings(evaluations=("salient",), dataset=dataset, n=n, taus=(tau,), soap_tau=soap_tau,
                            foreground=foreground, component=component, refine=refine, n_boot=n_boot, seed=seed,
                            batch_size=batch_size, n_grid=n_grid)
    report = run_salient(ctx, settings, cache_dir=cache_dir, grid_png=grid, progress=not quiet)
    _finish(report, ctx, json_path, record)


@app.command("knn-seg")
def knn_seg(
    head: Head,
    dataset: Dataset = "fashion-mnist",
    bank: Bank = None,
    n: N = None,
    bank_n: BankN = 1000,
    k: Neighbours = 10,
    bank_patches: Annotated[Optional[int], typer.Option(help="Subsample the bank to this many patches (seeded); 0 = all.")] = 16384,
    image_size: ImageSize = None,
    json_path: Json = None,
    grid: Annotated[Optional[str], typer.Option(help="PNG grid (image, GT, raw, SOAP label maps) path.")] = None,
    n_grid: Annotated[int, typer.Option(help="Images in the PNG grid.")] = 6,
    registry: Registry = None,
    storage_option: StorageOption = None,
    weights: Weights = None,
    device: Device = None,
    batch_size: BatchSize = 32,
    n_boot: NBoot = 2000,
    seed: Seed = 0,
    cache_dir: CacheDir = None,
    record: Record = False,
    quiet: Quiet = False,
) -> None:
    """Patch kNN segmentation (cosine, majority vote): mIoU and pixel accuracy."""
    from soapflow.evaluation.run import run_knn_seg

    _check_common(n, n_boot)
    _check_knn(k, bank_n)
    ctx = _context(head, registry, storage_option, weights, image_size, device)
    settings = EvalSettings(evaluations=("knn-seg",), dataset=dataset, bank=bank, n=n, bank_n=bank_n, knn_seg_k=k,
                            bank_patches=bank_patches or None, n_boot=n_boot, seed=seed, batch_size=batch_size,
                            n_grid=n_grid)
    report = run_knn_seg(ctx, settings, cache_dir=cache_dir, grid_png=grid, progress=not quiet)
    _finish(report, ctx, json_path, record)


@app.command("knn-cls")
def knn_cls(
    head: Head,
    dataset: Dataset = "fashion-mnist",
    bank: Bank = None,
    n: N = None,
    bank_n: BankN = 1000,
    k: Neighbours = 20,
    pool: Annotated[str, typer.Option(help="Comma-separated: mean (mean-pooled patch tokens), cls (class token).")] = "mean,cls",
    image_size: ImageSize = None,
    json_path: Json = None,
    registry: Registry = None,
    storage_option: StorageOption = None,
    weights: Weights = None,
    device: Device = None,
    batch_size: BatchSize = 32,
    n_boot: NBoot = 2000,
    seed: Seed = 0,
    cache_dir: CacheDir = None,
    record: Record = False,
    quiet: Quiet = False,
) -> None:
    """kNN classification (cosine, majority vote) on pooled tokens: top-1 accuracy."""
    from soapflow.evaluation.run import run_knn_cls

    _check_common(n, n_boot)
    _check_knn(k, bank_n)
    pools = tuple(p.strip() for p in pool.split(",") if p.strip())
    ctx = _context(head, registry, storage_option, weights, image_size, device)
    settings = EvalSettings(evaluations=("knn-cls",), dataset=dataset, bank=bank, n=n, bank_n=bank_n, knn_cls_k=k,
                            pools=pools, n_boot=n_boot, seed=seed, batch_size=batch_size)
    report = run_knn_cls(ctx, settings, cache_dir=cache_dir, progress=not quiet)
    _finish(report, ctx, json_path, record)


def _check_common(n, n_boot) -> None:
    if n is not None and n < 1:
        raise SoapError(f"--n must be ≥ 1, got {n}")
    if n_boot < 100:
        raise SoapError(f"--n-boot must be ≥ 100 for a usable 95% CI, got {n_boot}")


def _numbers(text: str, kind, what: str) -> tuple:
    try:
        return tuple(kind(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise SoapError(f"{what} takes a comma list of numbers, got {text!r}") from None


@app.command("planted")
def planted(
    backbone: Annotated[str, typer.Option(help="Catalog name or timm ViT name.")] = "dinov2_vits14",
    weights: Weights = None,
    layer: Annotated[int, typer.Option(help="Block whose tokens are fitted.")] = -1,
    final_norm: Annotated[str, typer.Option(help="The model's final norm on the tokens: auto (after the last block only), on, off.")] = "auto",
    image_size: ImageSize = None,
    data: Annotated[str, typer.Option(help="Real images for the fit (also the kNN bank).")] = "fashion-mnist:train",
    n_real: Annotated[int, typer.Option(help="Real images.")] = 300,
    synth: Annotated[str, typer.Option(help="Synthetic images (noise:<generator>).")] = "noise:mixture",
    n_synth: Annotated[int, typer.Option(help="Synthetic images.")] = 300,
    dataset: Annotated[str, typer.Option(help="Evaluation images (fashion-mnist[:test|:train]).")] = "fashion-mnist:test",
    n: Annotated[int, typer.Option("--n", help="Evaluation images.")] = 300,
    k: Annotated[str, typer.Option("--k", help="Comma list: numbers of planted directions.")] = "1,2,4",
    amplitudes: Annotated[str, typer.Option(help="Comma list: variance per planted direction, × λ_max of the clean real tokens.")] = "0.5,1,2,4",
    mu: Annotated[str, typer.Option(help="Soft count of suppressed components, or 'auto'.")] = "auto",
    tau: Annotated[float, typer.Option(help="Sigmoid temperature of the weights.")] = 0.05,
    threshold: Annotated[float, typer.Option(help="SI threshold of --mu auto.")] = 0.75,
    plant: Annotated[str, typer.Option(help="quiet: plant where the clean tokens are quiet — the low-frequency cosines their positional mean varies least along, directions orthogonal to their top principal components — so u_j is the ground truth; plain: the lowest frequencies, any random directions.")] = "quiet",
    evaluate: Annotated[str, typer.Option(help="Comma list of salient,knn-seg,knn-cls; 'none' for recovery only.")] = "salient,knn-seg,knn-cls",
    salient_tau: Annotated[float, typer.Option(help="TokenCut τ.")] = 0.2,
    bank_patches: Annotated[int, typer.Option(help="kNN-seg bank patches (seeded subsample); 0 = all.")] = 16384,
    workdir: Annotated[str, typer.Option(help="Clean stores (reused when present), planted fits and artifacts.")] = "planted-work",
    keep_stores: Annotated[bool, typer.Option("--keep-stores", help="Keep the planted feature stores.")] = False,
    json_path: Json = None,
    plot: Annotated[Optional[str], typer.Option(help="PNG: angles and planted SI vs amplitude per k (and metrics).")] = None,
    chunk: Annotated[int, typer.Option(help="Images per store chunk (and forward pass).")] = 32,
    device: Device = None,
    n_boot: NBoot = 2000,
    seed: Seed = 0,
    quiet: Quiet = False,
) -> None:
    """Planted-artifact benchmark: plant k positional directions in real tokens, fit, measure recovery and zero-shot loss."""
    from soapflow.evaluation import planted as PL
    from soapflow.evaluation.report import write_json

    mu_value = "auto" if mu.strip() == "auto" else (_numbers(mu, float, "--mu") or (mu,))[0]
    evals = () if evaluate.strip().lower() == "none" else tuple(e.strip() for e in evaluate.split(","))
    planting = PL.Planting(ks=_numbers(k, int, "--k"), amplitudes=_numbers(amplitudes, float, "--amplitudes"),
                           seed=seed, mu=mu_value, tau=tau, threshold=threshold, plant=plant)
    data_cfg = PL.PlantedData(backbone=backbone, weights=weights, layer=layer, final_norm=final_norm,
                              image_size=image_size, real=data,
                              n_real=n_real, synth=synth, n_synth=n_synth, eval_data=dataset, n_eval=n, chunk=chunk,
                              device=opt.resolve_device(device), seed=seed)
    ev = EvalSettings(evaluations=evals, taus=(salient_tau,), bank_patches=bank_patches or None, n_boot=n_boot,
                      seed=seed)
    report = PL.run_planted(data_cfg, planting, ev, workdir, keep_stores=keep_stores, progress=not quiet)
    if plot:
        report["plot_png"] = PL.plot_report(report, plot)
    PL.print_report(report)
    if json_path:
        write_json(json_path, report)
        typer.echo(f"report: {json_path}")
    if plot:
        typer.echo(f"plot: {plot}")
