"""Same inputs and seed → the same artifact, bit for bit, whatever the extraction's chunk size
and the fit's number of dask workers. (Across processes: test_killed_fit_publish refits in a
subprocess; ThreadPool vs DaskTaskRunner: test_transient.)"""

from __future__ import annotations

import numpy as np

from soapflow.extract import extract
from soapflow.config import BackboneSpec
from soapflow.fit import fit_to_artifact
from tests.faults.helpers import same_bits

TINY = dict(backbone=BackboneSpec("vit_tiny_patch16_224", weights="random", image_size=32), progress=False)


def test_artifact_hash_independent_of_chunks_and_workers(images, tmp_path, monkeypatch):
    import soapflow.fit as fit_module

    monkeypatch.setattr(fit_module, "BLOCK_BYTES", 9 * 4 * 192 * 2)  # several blocks per store
    stores = {}
    for chunk in (4, 11):
        for role, spec, n in (("real", str(images), 48), ("synth", "noise:mixture", 40)):
            store, _ = extract(source_spec=spec, out=str(tmp_path / f"{role}-{chunk}"), n=n, chunk=chunk, **TINY)
            stores[role, chunk] = store
    for role in ("real", "synth"):
        assert same_bits(np.asarray(stores[role, 4].tokens[:]), np.asarray(stores[role, 11].tokens[:]))
    hashes = {}
    for chunk, workers in ((4, 1), (11, 2), (4, 1)):
        _, _, manifest = fit_to_artifact(str(tmp_path / f"real-{chunk}"), str(tmp_path / f"synth-{chunk}"),
                                         str(tmp_path / f"art-{chunk}-{workers}-{len(hashes)}"), workers=workers,
                                         plots=False, progress=False)
        hashes[chunk, workers, len(hashes)] = manifest["content_hash"]
    assert len(set(hashes.values())) == 1, hashes
