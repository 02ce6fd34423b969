"""The ``refit-catalog`` flow: refit every catalog entry that has no registry version yet.

A catalog is a YAML (or JSON) file:

    defaults:            # optional, applied to every entry
      data: photos
      image_size: 224
      mu: 2
    entries:
      - backbone: dinov2_vits14          # catalog or timm name
        layers: [-1, 8]
      - backbone: vit_base_patch16_224.mae
        weights: /checkpoints/mae-ep800.safetensors   # or "random"
        layers: [-1]
        data: /data/val-images
        n_real: 2000
        final_norm: auto                 # auto (last block only) | on | off

An entry × layer is skipped when the registry already holds a version fitted from the same
weights sha256, layer, final norm, real-data fingerprint and parameters; so dropping a new checkpoint
into the catalog is all it takes to get its projection by the next scheduled run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from soapflow.flows.refit import refit
from soapflow.config import RefitConfig
from soapflow.errors import SoapError

ENTRY_KEYS = {"backbone", "weights", "layers", "layer", "feature", "final_norm", "data", "n_real", "n_synth", "generator",
              "image_size", "seed", "mu", "tau", "gamma", "threshold", "chunk", "name", "device"}


@dataclass(frozen=True)
class CatalogJob:
    """One entry × layer of a catalog, as the refit it asks for."""

    entry: int
    config: RefitConfig

    @property
    def label(self) -> str:
        return f"{self.config.backbone.name} layer {self.config.backbone.layer}"

    def row(self, status: str, ref: str | None) -> dict:
        return {"entry": self.entry, "backbone": self.config.backbone.name, "layer": self.config.backbone.layer,
                "status": status, "ref": ref}


def load_catalog(path: str) -> list[CatalogJob]:
    """Entries with defaults applied, one per (entry, layer), each checked as a ``RefitConfig``."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SoapError(f"catalog {path} does not exist")
    try:
        doc = json.loads(p.read_text()) if p.suffix == ".json" else yaml.safe_load(p.read_text())
    except (ValueError, yaml.YAMLError) as exc:
        raise SoapError(f"catalog {path} is not valid YAML/JSON: {exc}") from None
    if isinstance(doc, list):
        doc = {"entries": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list) or not doc["entries"]:
        raise SoapError(f"catalog {path} needs a non-empty list 'entries'")
    defaults = doc.get("defaults") or {}
    jobs = []
    for i, entry in enumerate(doc["entries"]):
        if not isinstance(entry, dict) or "backbone" not in entry:
            raise SoapError(f"catalog {path}: entry {i} needs at least 'backbone'")
        merged = {**defaults, **entry}
        unknown = set(merged) - ENTRY_KEYS
        if unknown:
            raise SoapError(f"catalog {path}: entry {i} has unknown keys {sorted(unknown)}; known: {sorted(ENTRY_KEYS)}")
        layers = merged.pop("layers", None)
        if layers is None:
            layers = [merged.pop("layer", -1)]
        merged.pop("layer", None)
        for layer in layers if isinstance(layers, list) else [layers]:
            jobs.append(CatalogJob(i, RefitConfig.from_flat({**merged, "layer": layer}, what=f"catalog {path}: entry {i}")))
    return jobs


def existing_version(config: RefitConfig, registry: str | None) -> str | None:
    """``name:version`` of a registry version fitted from exactly these inputs, if any."""
    from soapflow.extract import cached_source, load, source_fingerprint
    from soapflow.storage.registry import Registry

    bb = load(config.backbone)
    data = config.data
    source = cached_source(data.real, data.n_real, data.seed)
    params = {**config.fit.registry_params(), "feature": bb.feature, "image_size": bb.image_size,
              "final_norm": bb.final_norm_at()}
    found = Registry(registry).find_by_inputs(bb.weights_sha256, bb.layer, source_fingerprint(source), params,
                                              backbone=bb.name)
    if not found:
        return None
    name, version = max(found, key=lambda nv: nv[1])
    return f"{name}:{version}"


@flow(name="refit-catalog", log_prints=True)
def refit_catalog(catalog: str, registry: str | None = None, workdir: str | None = None,
                  dry_run: bool = False) -> list[dict]:
    """Refit the catalog entries that are new; report one row per entry × layer."""
    logger = get_run_logger()
    rows = []
    failures = []
    for job in load_catalog(catalog):
        try:
            have = existing_version(job.config, registry)
            if have:
                rows.append(job.row("up to date", have))
                continue
            if dry_run:
                rows.append(job.row("would refit", None))
                continue
            config = replace(job.config, run=replace(job.config.run, workdir=workdir, progress=False),
                             output=replace(job.config.output, registry=registry))
            result = refit(config)
            rows.append(job.row("refitted", result["ref"]))
        except Exception as exc:  # one bad entry must not stop the others
            logger.error("%s failed: %s", job.label, exc)
            failures.append(f"{job.label}: {exc}")
            rows.append(job.row("failed", str(exc)[:200]))
    create_table_artifact(table=rows, key="soap-refit-catalog", description=f"catalog {catalog}")
    if failures:
        raise SoapError(f"{len(failures)} catalog entries failed: " + "; ".join(failures))
    return rows
