"""Checks of a command's input that run before any work starts, with messages that name the flag.

Two kinds: :func:`check_cheap` needs no heavy import (counts, fit parameters, paths) and runs
before ``soap refit`` starts anything; :func:`load_inputs` loads the backbone and opens the real
source (what the run needs first anyway), translating the library's wording (``weights=<path>``)
into the command line's (``--weights PATH``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from soapflow.errors import SoapError

_NAMED_SOURCES = ("photos", "fashion-mnist")


def count(flag: str, value: int | None, minimum: int = 1) -> None:
    """``--n-real must be ≥ 1, got 0``; None (not given) passes."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise SoapError(f"{flag} must be an integer ≥ {minimum}, got {value!r}")
    if value < minimum:
        raise SoapError(f"{flag} must be ≥ {minimum}, got {value}")


def fit_parameters(mu: float | str, tau: float, gamma: float, threshold: float) -> None:
    if mu != "auto" and not (isinstance(mu, (int, float)) and mu >= 0):
        raise SoapError(f"--mu must be ≥ 0 or 'auto', got {mu}")
    if not (isinstance(tau, (int, float)) and tau > 0):
        raise SoapError(f"--tau must be > 0, got {tau}")
    if not (isinstance(gamma, (int, float)) and gamma > 0):
        raise SoapError(f"--gamma must be > 0, got {gamma}")
    if not (isinstance(threshold, (int, float)) and not math.isnan(threshold) and 0 <= threshold <= 1):
        raise SoapError(f"--threshold is an SI score in [0, 1], got {threshold}")


def source_path(flag: str, spec: str) -> None:
    """A folder source that is not there; named sources are checked when opened."""
    if not isinstance(spec, str) or not spec.strip():
        raise SoapError(f"{flag} must name images: 'photos', 'fashion-mnist[:train|:test]' or a folder, got {spec!r}")
    low = spec.strip().lower()
    if low.startswith("noise:") or any(low == s or low.startswith(s + ":") for s in _NAMED_SOURCES):
        return
    path = os.path.expanduser(spec.strip())
    if not os.path.exists(path):
        raise SoapError(f"{flag} {spec}: the folder does not exist (or use 'photos', 'fashion-mnist[:train|:test]')")
    if not os.path.isdir(path):
        raise SoapError(f"{flag} {spec}: is not a folder")


def weights_path(weights: str | None) -> None:
    if weights is None or weights == "random":
        return
    if not os.path.isfile(os.path.expanduser(weights)):
        raise SoapError(f"--weights {weights}: weights file not found (give a checkpoint PATH or 'random')")


def check_cheap(*, data: str | None = None, data_flag: str = "--data", weights: str | None = None,
                counts: dict[str, int | None] | None = None, image_size: int | None = None,
                fit: tuple | None = None) -> None:
    """Everything that can be checked without torch: counts (``{"--n-real": 0}``), the image size,
    fit parameters ``(mu, tau, gamma, threshold)``, the weights file and a folder source."""
    for flag, value in (counts or {}).items():
        count(flag, value)
    count("--image-size", image_size)
    if fit is not None:
        fit_parameters(*fit)
    weights_path(weights)
    if data is not None:
        source_path(data_flag, data)


FINAL_NORM_CHOICES = ("auto", "on", "off")  # soapflow.backbones.FINAL_NORM, without importing torch


def decoding(workers: int | None, cpu_decode_share: float | None) -> None:
    """``--workers`` and ``--cpu-decode-share``, as extract and refit both take them."""
    if workers is not None:
        count("--workers", workers, minimum=0)
    if cpu_decode_share is not None and not 0 <= cpu_decode_share <= 1:
        raise SoapError(f"--cpu-decode-share must be from 0 to 1, got {cpu_decode_share:g}")


def final_norm(value: str | bool) -> str:
    """``--final-norm`` as auto/on/off (booleans from YAML too)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, str) and value.strip().lower() in FINAL_NORM_CHOICES:
        return value.strip().lower()
    raise SoapError(f"--final-norm must be one of {', '.join(FINAL_NORM_CHOICES)}, got {value!r}")


def check_bundled_weights(backbone: str, weights: str | None) -> None:
    """A backbone without bundled weights needs ``--weights``: say so in the command line's words."""
    if weights is not None:
        return
    from soapflow.backbones import BACKBONES, _resolve_name

    timm_name, entry = _resolve_name(backbone)  # unknown names: "did you mean …"
    if entry is None or entry.weights is None:
        hint = next((n for n, e in BACKBONES.items() if e.timm_name == timm_name and e.weights is not None), None)
        alt = f", or use the catalog name {hint!r}, which bundles them" if hint else ""
        raise SoapError(
            f"backbone {backbone!r} (timm {timm_name}) has no bundled weights and soapflow never downloads: "
            f"pass --weights PATH (a .safetensors/.pt/.pth/.bin checkpoint) or --weights random{alt}"
        )


@dataclass(frozen=True)
class Loaded:
    backbone: object
    source: object
    notes: tuple[str, ...]  # things the user should know (fewer images than asked, …)


def load_inputs(backbone: str, weights: str | None, layer: int, feature: str, image_size: int | None,
                device: str, data: str, n: int | None, seed: int, *, final_norm: str | bool = "auto",
                n_flag: str = "--n-real") -> Loaded:
    """Load the backbone (cached for the run) and open the real source; raise on bad input."""
    from soapflow.extract import cached_backbone, cached_source

    src = cached_source(data, n, seed)  # (a scan: cheaper than the model, so first)
    check_bundled_weights(backbone, weights)
    bb = cached_backbone(backbone, weights, layer, feature, image_size, device, final_norm)
    if len(src) == 0:
        raise SoapError(f"source {src.spec} has no usable images ({len(src.skipped)} skipped)")
    notes = []
    if n is not None and len(src) < n:
        notes.append(f"{n_flag} {n}: {data} has only {len(src)} usable images; using {len(src)}")
    return Loaded(bb, src, tuple(notes))
