"""Small helpers for tests that need feature stores on disk."""

import os

import numpy as np

from soapflow.storage.feature_store import FeatureStore


def write_store(uri, tokens, chunk, dtype="float32", attrs=None, compress=False):
    tokens = np.asarray(tokens)
    n, h, w, d = tokens.shape
    store = FeatureStore.create(uri, count=n, grid=(h, w), dim=d, chunk=chunk, dtype=dtype,
                                attrs={"backbone": "test-vit", "layer": 3, **(attrs or {})}, compress=compress)
    for i in store.pending_chunks():
        rows = store.chunk_range(i)
        store.write_chunk(i, tokens[rows.start:rows.stop])
    store.finalize()
    return store


def positional_tokens(n, h=4, w=5, d=12, seed=0, scale=1.0, position_strength=2.0):
    """Tokens = content noise + a fixed positional pattern (what SOAP should find)."""
    rng = np.random.default_rng(seed)
    pattern = np.random.default_rng(1234).normal(size=(h, w, d)) * position_strength
    return (rng.normal(size=(n, h, w, d)) * scale + pattern).astype(np.float32)


def tiny_vit_artifact(root, layer: int, image_size: int, n: int, chunk: int) -> str:
    """An artifact of a random tiny ViT's block ``layer``, fitted on ``n`` Fashion-MNIST train
    images and ``n`` mixture-noise images (stores written directly, ``<root>/{real,synth}``)."""
    from soapflow.backbones import load_backbone
    from soapflow.fit import fit_to_artifact
    from soapflow.sources import open_source

    bb = load_backbone("vit_tiny_patch16_224", weights="random", layer=layer, image_size=image_size)
    attrs = dict(backbone=bb.name, weights=bb.weights_sha256, layer=bb.layer, feature="out", image_size=image_size)
    for name, spec in (("real", "fashion-mnist:train"), ("synth", "noise:mixture")):
        src = open_source(spec, n=n)
        write_store(os.path.join(root, name), bb.tokens(src.batch(range(n), image_size, bb.mean, bb.std)).numpy(),
                    chunk=chunk, attrs=attrs)
    path, _, _ = fit_to_artifact(os.path.join(root, "real"), os.path.join(root, "synth"),
                                 os.path.join(root, "artifact"), plots=False, progress=False)
    return str(path)
