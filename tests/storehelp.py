"""Small helpers for tests that need feature stores on disk."""

import numpy as np

from storage.feature_store import FeatureStore


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
