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
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.refit import refit
from soapflow.errors import SoapError

ENTRY_KEYS = {"backbone", "weights", "layers", "layer", "feature", "final_norm", "data", "n_real", "n_synth", "generator",
              "image_size", "seed", "mu", "tau", "gamma", "threshold", "chunk", "name", "device"}


def load_catalog(path: str) -> list[dict]:
    """Entries with defaults applied, one per (entry, layer)."""
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
            jobs.append({**merged, "layer": layer, "entry": i})
    return jobs


def existing_version(job: dict, registry: str | None) -> str | None:
    """``name:version`` of a registry version fitted from exactly these inputs, if any."""
    from soapflow.extract import cached_backbone, cached_source, default_device, source_fingerprint
    from storage.registry import Registry

    bb = cached_backbone(job["backbone"], job.get("weights"), job["layer"], job.get("feature", "out"),
                         job.get("image_size"), job.get("device") or default_device(), job.get("final_norm", "auto"))
    source = cached_source(job.get("data", "photos"), job.get("n_real"), job.get("seed", 0))
    params = {"mu": job.get("mu", 2.0), "tau": job.get("tau", 0.05), "gamma": job.get("gamma", 1.0),
              "threshold": job.get("threshold", 0.75), "feature": bb.feature, "image_size": bb.image_size,
              "final_norm": bb.final_norm_at()}
    if params["mu"] != "auto":
        params["mu"] = float(params["mu"])
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
        label = f"{job['backbone']} layer {job['layer']}"
        try:
            have = existing_version(job, registry)
            if have:
                rows.append({"entry": job["entry"], "backbone": job["backbone"], "layer": job["layer"],
                             "status": "up to date", "ref": have})
                continue
            if dry_run:
                rows.append({"entry": job["entry"], "backbone": job["backbone"], "layer": job["layer"],
                             "status": "would refit", "ref": None})
                continue
            params = {k: v for k, v in job.items() if k not in ("entry",)}
            result = refit(**params, registry=registry, workdir=workdir, progress=False)
            rows.append({"entry": job["entry"], "backbone": job["backbone"], "layer": job["layer"],
                         "status": "refitted", "ref": result["ref"]})
        except Exception as exc:  # one bad entry must not stop the others
            logger.error("%s failed: %s", label, exc)
            failures.append(f"{label}: {exc}")
            rows.append({"entry": job["entry"], "backbone": job["backbone"], "layer": job["layer"],
                         "status": "failed", "ref": str(exc)[:200]})
    create_table_artifact(table=rows, key="soap-refit-catalog", description=f"catalog {catalog}")
    if failures:
        raise SoapError(f"{len(failures)} catalog entries failed: " + "; ".join(failures))
    return rows
