"""Every ``soap`` option that more than one command takes, defined once.

Commands annotate their parameters with these aliases, so ``extract``, ``refit``, ``scan``, ``fit``,
``eval`` and ``registry`` agree on names, defaults and help text. Defaults come from
``soapflow.defaults`` (and ``soapflow.extract.DEFAULT_CHUNK``). ``tests/test_cli_options.py`` walks
every command's options and checks each has help text.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer

from soapflow import defaults
from soapflow.errors import SoapError
from soapflow.extract import DEFAULT_CHUNK, DEFAULT_GPU_CHUNK

__all__ = [
    "Backbone", "Weights", "Layer", "Feature", "FinalNorm", "ImageSize", "Data", "NReal", "NSynth", "Generator", "Seed",
    "Mu", "Tau", "Gamma", "Threshold", "Chunk", "Dtype", "Device", "Workers", "CpuDecodeShare", "Workdir", "ScanWorkdir",
    "Registry", "StorageOption", "Quiet", "DEFAULT_CHUNK", "DEVICE_DEFAULT_TEXT", "parse_mu",
    "parse_storage_options", "positive", "resolve_device",
]

DEVICE_DEFAULT_TEXT = "cuda if available, else cpu"
MU_DEFAULT = f"{defaults.DEFAULT_MU:g}"

# -- the backbone -------------------------------------------------------------------------
Backbone = Annotated[str, typer.Option(
    help="Catalog name (dinov2_vits14 is embedded) or any timm ViT name (then --weights is needed).")]
Weights = Annotated[Optional[str], typer.Option(
    metavar="PATH|random",
    help="Checkpoint (.safetensors, or a plain state dict .pt/.pth/.bin) or 'random'; catalog backbones "
         "bring their own.", show_default=False)]
Layer = Annotated[int, typer.Option(help="Block index; negative counts from the end (-1 = last block).")]
Feature = Annotated[str, typer.Option(help="Token kind: out (block output) | q | k | v | kqv.")]
ImageSize = Annotated[Optional[int], typer.Option(
    help="Input size in pixels, a multiple of the patch size (default: the backbone's).", show_default=False)]
FinalNorm = Annotated[str, typer.Option(
    help="The model's final norm on the tokens: auto (after the last block only, as forward_features and the "
         "authors), on (every block), off.")]
Device = Annotated[Optional[str], typer.Option(
    help="torch device: cpu, cuda, cuda:1 …", show_default=DEVICE_DEFAULT_TEXT)]

# -- the images ---------------------------------------------------------------------------
Data = Annotated[str, typer.Option(
    help="Real images: 'photos' (bundled), 'fashion-mnist[:train|:test]' or a folder.")]
NReal = Annotated[Optional[int], typer.Option(
    "--n-real", help="Real images to use (default: all the source has).", show_default=False)]
NSynth = Annotated[Optional[int], typer.Option(
    "--n-synth", help="Synthetic images (default: as many as real).", show_default=False)]
Generator = Annotated[str, typer.Option(
    help="Noise generator of the synthetic images (see `soap noise preview`): mixture, pink, gradient, …")]
Seed = Annotated[int, typer.Option(help="Seed of the synthetic images (and of any subsampling).")]
Chunk = Annotated[Optional[int], typer.Option(
    help=f"Images per feature-store chunk (the unit of work and of resuming; default: {DEFAULT_CHUNK} on a CPU, "
         f"{DEFAULT_GPU_CHUNK} on a GPU).", show_default=False)]
Dtype = Annotated[str, typer.Option(help="Feature-store dtype: float16 or float32.")]
Workers = Annotated[Optional[int], typer.Option(
    help="DataLoader decode processes per extraction (default: 0 on a CPU, all cores but two on a GPU).",
    show_default=False)]
CpuDecodeShare = Annotated[Optional[float], typer.Option(
    help="On a GPU, the share of JPEGs the decode processes decode with Pillow while nvJPEG decodes the rest, "
         "chosen by image index (0 to 1; default: from the measured rates and --workers).", show_default=False)]

# -- the fit ------------------------------------------------------------------------------
Mu = Annotated[str, typer.Option(
    help="Soft count of components to suppress, or 'auto' (= the number with SI above --threshold).")]
Tau = Annotated[float, typer.Option(help="Sigmoid temperature of the suppression weights.")]
Gamma = Annotated[float, typer.Option(help="Exponent of the SI agreement term.")]
Threshold = Annotated[float, typer.Option(help="SI threshold: what --mu auto counts, and what counts as invariant.")]

# -- where things go ----------------------------------------------------------------------
Workdir = Annotated[Optional[str], typer.Option(
    help="Where feature stores and artifacts are kept (default: $SOAPFLOW_WORKDIR, else "
         "~/.cache/soapflow/work).", show_default=False)]
ScanWorkdir = Annotated[Optional[str], typer.Option(
    "--workdir", help="Keep per-layer stores and token caches here (default: a temporary folder, removed).",
    show_default=False)]
Registry = Annotated[Optional[str], typer.Option(
    "--registry", "-r", help="Registry root: a path or s3://bucket/prefix (default: $SOAPFLOW_REGISTRY, else "
                             "~/.local/share/soapflow/registry).", show_default=False)]
StorageOption = Annotated[Optional[list[str]], typer.Option(
    "--storage-option", "-o", metavar="KEY=VALUE",
    help="Object-store setting for s3:// URIs (repeatable; dotted keys nest, values are JSON when they parse), "
         "e.g. client_kwargs.endpoint_url=http://…; default: $SOAPFLOW_STORAGE_OPTIONS.", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


# -- parsing shared by the commands -------------------------------------------------------
def parse_mu(value: str) -> float | str:
    if value == "auto":
        return "auto"
    try:
        mu = float(value)
    except ValueError:
        raise SoapError(f"--mu must be a number ≥ 0 or 'auto', got {value!r}") from None
    if not mu >= 0:
        raise SoapError(f"--mu must be ≥ 0 or 'auto', got {value}")
    return mu


def check_fit_parameters(tau: float, gamma: float, threshold: float) -> None:
    if not tau > 0:
        raise SoapError(f"--tau must be > 0, got {tau}")
    if not gamma > 0:
        raise SoapError(f"--gamma must be > 0, got {gamma}")
    if not 0 <= threshold <= 1:
        raise SoapError(f"--threshold is an SI score in [0, 1], got {threshold}")


def positive(flag: str, value: int | None) -> None:
    """``--flag must be ≥ 1, got 0`` for a count given on the command line (None = not given)."""
    if value is not None and value < 1:
        raise SoapError(f"{flag} must be ≥ 1, got {value}")


def resolve_device(device: str | None) -> str:
    from soapflow.extract import default_device

    return device or default_device()


def parse_storage_options(items: list[str] | None) -> dict | None:
    """``KEY=VALUE`` items as a nested dict (None when there are none)."""
    if not items:
        return None
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SoapError(f"--storage-option takes KEY=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        cur = out
        parts = key.split(".")
        for part in parts[:-1]:
            cur = cur.setdefault(part, {})
            if not isinstance(cur, dict):
                raise SoapError(f"--storage-option {item!r} conflicts with an earlier option")
        cur[parts[-1]] = value
    return out
