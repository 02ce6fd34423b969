"""Prefect task for the fit: a thin wrapper over ``soapflow.fit.fit_to_artifact``."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="fit-soap", cache_policy=NO_CACHE)
def fit_artifact(real_uri: str, synth_uri: str, out_dir: str, *, mu, tau: float, gamma: float,
                 threshold: float, dask_address: str | None = None, extra_manifest: dict | None = None,
                 device: str | None = None) -> dict:
    """Fit and write the artifact; returns its path, manifest and the top SI components."""
    import numpy as np

    from soapflow.fit import fit_to_artifact, fit_warnings

    path, fit, manifest = fit_to_artifact(real_uri, synth_uri, out_dir, dask_address=dask_address, mu=mu, tau=tau,
                                          gamma=gamma, threshold=threshold, overwrite=True,
                                          extra_manifest=extra_manifest, device=device)
    order = np.argsort(-fit.scores, kind="stable")[:8]
    explained = fit.explained_variance
    top = [{"rank": int(d), "si_score": round(float(fit.scores[d]), 4), "weight": round(float(fit.weights[d]), 4),
            "explained_variance": round(float(explained[d]), 4)} for d in order]
    return {"path": str(path), "manifest": manifest, "top": top, "warnings": fit_warnings(fit, manifest)}
