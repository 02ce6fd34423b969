"""Export a registry version to MLflow: one run holding the artifact directory, and a registered
model version carrying the registry version's aliases (``latest`` is MLflow's own notion and is
reserved there, so it is not copied).

MLflow is an optional extra (``pip install 'soapflow[mlflow]'``); it is imported only here.
Exporting the same content twice reuses the MLflow model version that already holds it.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from soapflow.errors import SoapError

TAG = "soapflow"


def _import_mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow import MlflowClient
    except ImportError as exc:
        raise SoapError(
            f"MLflow export needs the optional extra: pip install 'soapflow[mlflow]' "
            f"(mlflow-skinny, sqlalchemy, alembic) — {exc}"
        ) from None
    return MlflowClient


def default_model_name(name: str) -> str:
    return "soap-" + name.replace("/", ".")


def export_mlflow(
    registry,
    ref: str,
    tracking_uri: str,
    *,
    model_name: str | None = None,
    experiment: str = "soapflow",
    artifact_location: str | None = None,
) -> dict:
    """Log ``ref``'s artifact to ``tracking_uri`` and register it; return what was created."""
    MlflowClient = _import_mlflow()
    from mlflow.exceptions import MlflowException

    name, version = registry.resolve(ref)
    record = registry.record(f"{name}:{version}")
    model_name = model_name or default_model_name(name)
    if not model_name or any(c in model_name for c in "'\"\\") or any(ord(c) < 32 for c in model_name):
        raise SoapError(f"MLflow model name {model_name!r} must be non-empty, without quotes, backslashes or control characters")
    aliases = [a for a in record["aliases"] if a.lower() != "latest"]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            client.create_registered_model(
                model_name,
                tags={f"{TAG}.name": name, f"{TAG}.registry": str(registry.root)},
                description=f"SOAP projection {name} from the soapflow registry {registry.root}",
            )
        existing = None
        for mv in client.search_model_versions(f"name='{model_name}'"):
            if (mv.tags or {}).get(f"{TAG}.content_hash") == record["content_hash"]:
                existing = mv
                break
        if existing is None:
            exp = client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(
                experiment, artifact_location=artifact_location
            )
            manifest = record.get("manifest") or {}
            run = client.create_run(
                exp_id,
                run_name=f"{name}:{version}",
                tags={
                    f"{TAG}.name": name,
                    f"{TAG}.version": str(version),
                    f"{TAG}.content_hash": record["content_hash"],
                    f"{TAG}.registry": str(registry.root),
                    **{f"{TAG}.lineage.{k}": str(v)[:500] for k, v in (record.get("lineage") or {}).items()
                       if not isinstance(v, dict)},
                },
            )
            run_id = run.info.run_id
            for key in ("backbone", "weights", "layer", "feature", "image_size", "dim", "mu", "mu_mode",
                        "tau", "gamma", "threshold", "n_suppressed", "n_real_images", "n_synth_images"):
                if manifest.get(key) is not None:
                    client.log_param(run_id, key, str(manifest[key])[:500])
            client.log_param(run_id, "final_norm", str(bool(manifest.get("final_norm", False))))
            for key, value in _numeric_metrics(record.get("evaluations") or {}).items():
                client.log_metric(run_id, key, value)
            with tempfile.TemporaryDirectory(prefix="soap-mlflow-") as tmp:
                art = registry.pull(f"{name}:{version}", Path(tmp) / "soap")
                client.log_artifacts(run_id, str(art), artifact_path="soap")
                rec_path = Path(tmp) / "registry_record.json"
                rec_path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str))
                client.log_artifact(run_id, str(rec_path))
            client.set_terminated(run_id)
            mv = client.create_model_version(
                model_name,
                source=f"runs:/{run_id}/soap",
                run_id=run_id,
                tags={f"{TAG}.name": name, f"{TAG}.version": str(version),
                      f"{TAG}.content_hash": record["content_hash"]},
                description=f"{name}:{version} (sha256 {record['content_hash'][:16]}…)",
            )
            created = True
        else:
            mv, run_id, created = existing, existing.run_id, False
        for alias in aliases:
            client.set_registered_model_alias(model_name, alias, mv.version)
    except MlflowException as exc:
        raise SoapError(f"MLflow export of {name}:{version} to {tracking_uri} failed: {exc}") from None
    return {
        "ref": f"{name}:{version}",
        "model_name": model_name,
        "model_version": int(mv.version),
        "run_id": run_id,
        "aliases": aliases,
        "created": created,
    }


def _numeric_metrics(evaluations: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in evaluations.items():
        full = re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"{prefix}{key}")
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[full] = float(value)
        elif isinstance(value, dict):
            out.update(_numeric_metrics(value, f"{full}."))
    return out
