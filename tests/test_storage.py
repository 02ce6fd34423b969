"""Feature stores and artifacts on disk: resume, refusal, hashes, and the SOAPHead."""

import json

import numpy as np
import pytest
import torch

from soapflow.errors import SoapError
from soapflow.head import SOAPHead
from soapflow.storage.artifact import TENSOR_NAMES, read_artifact, write_artifact
from soapflow.storage.feature_store import FeatureStore, open_store
from storehelp import positional_tokens, write_store


def test_store_layout_chunks_and_attributes(tmp_path):
    tokens = positional_tokens(23)
    write_store(tmp_path / "s", tokens, chunk=5, dtype="float16", attrs={"source": {"generator": "pink"}})
    store = open_store(str(tmp_path / "s"))
    assert store.tokens.chunks == (5, 4, 5, 12)  # chunked along N only
    assert store.tokens.dtype == np.float16
    assert store.n_chunks == 5 and store.pending_chunks() == []
    assert store.attrs["grid"] == [4, 5] and store.attrs["dim"] == 12 and store.attrs["count"] == 23
    assert "completed" in store.attrs and store.attrs["soapflow_store"] == 1
    x = store.to_dask()
    assert x.chunks[0] == (5, 5, 5, 5, 3)
    np.testing.assert_array_equal(x.compute(), tokens.astype(np.float16))


def test_tokens_uncompressed_by_default_zstd_on_request(tmp_path):
    tokens = positional_tokens(9)
    raw = write_store(tmp_path / "raw", tokens, chunk=4, dtype="float16")
    packed = write_store(tmp_path / "zstd", tokens, chunk=4, dtype="float16", compress=True)
    assert raw.tokens.compressors == ()
    assert [type(c).__name__ for c in packed.tokens.compressors] == ["ZstdCodec"]
    for uri in ("raw", "zstd"):  # readers take either
        np.testing.assert_array_equal(open_store(str(tmp_path / uri)).tokens[:], tokens.astype(np.float16))


def test_interrupted_store_resumes_only_pending_chunks(tmp_path):
    tokens = positional_tokens(20)
    kwargs = dict(count=20, grid=(4, 5), dim=12, chunk=6, attrs={"backbone": "b", "layer": 1})
    store = FeatureStore.create(str(tmp_path / "s"), **kwargs)
    store.write_chunk(0, tokens[0:6])
    store.write_chunk(2, tokens[12:18])
    again = FeatureStore.create(str(tmp_path / "s"), **kwargs)
    assert again.pending_chunks() == [1, 3]
    with pytest.raises(SoapError, match="2 chunks still pending, first 1"):
        again.finalize()
    for i in again.pending_chunks():
        rows = again.chunk_range(i)
        again.write_chunk(i, tokens[rows.start:rows.stop])
    again.finalize()
    np.testing.assert_array_equal(open_store(str(tmp_path / "s")).tokens[:], tokens.astype(np.float16))


def test_unwritten_chunk_reads_as_nan(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s"), count=4, grid=(1, 1), dim=2, chunk=2)
    store.write_chunk(1, np.ones((2, 1, 1, 2)))
    assert np.isnan(store.tokens[0:2]).all() and (store.tokens[2:4] == 1).all()


def test_reopening_with_other_dataset_is_refused(tmp_path):
    kwargs = dict(count=10, grid=(4, 5), dim=12, chunk=5)
    FeatureStore.create(str(tmp_path / "s"), **kwargs, attrs={"backbone": "a", "layer": 1})
    with pytest.raises(SoapError, match=r"exists with backbone='a', not 'b'"):
        FeatureStore.create(str(tmp_path / "s"), **kwargs, attrs={"backbone": "b", "layer": 1})
    with pytest.raises(SoapError, match=r"exists with shape"):
        FeatureStore.create(str(tmp_path / "s"), count=11, grid=(4, 5), dim=12, chunk=5, attrs={"backbone": "a"})
    with pytest.raises(SoapError, match="bfloat16"):
        FeatureStore.create(str(tmp_path / "t"), **kwargs, dtype="bfloat16")


def test_writer_refuses_wrong_shapes_and_float16_overflow(tmp_path):
    store = FeatureStore.create(str(tmp_path / "s"), count=4, grid=(1, 1), dim=2, chunk=2)
    with pytest.raises(SoapError, match=r"chunk 0 must be \(2, 1, 1, 2\)"):
        store.write_chunk(0, np.zeros((3, 1, 1, 2)))
    with pytest.raises(SoapError, match="float16 overflow"):
        store.write_chunk(0, np.full((2, 1, 1, 2), 1e6))
    # tokens the caller already cast (extraction casts where the forward ran): it says how they were
    cast = np.full((2, 1, 1, 2), np.inf, np.float16)
    with pytest.raises(SoapError, match=r"after casting to float16 \(float16 overflow"):
        store.write_chunk(0, cast, finite_before_cast=True)
    for flag in (False, None):  # the model's own inf/NaN: no overflow hint
        with pytest.raises(SoapError, match=r"after casting to float16$"):
            store.write_chunk(0, cast, finite_before_cast=flag)
    for bad in (np.nan, -np.inf):
        tokens = np.zeros((2, 1, 1, 2), np.float16)
        tokens[1, 0, 0, 1] = bad
        with pytest.raises(SoapError, match="non-finite"):
            store.write_chunk(1, tokens)
    assert store.pending_chunks() == [0, 1]
    edge = np.array([65504, -65504, 6e-8, -0.0], np.float16).reshape(2, 1, 1, 2)  # largest, subnormal
    store.write_chunk(0, edge)
    np.testing.assert_array_equal(store.tokens[:2], edge)


def _tensors(d=6, h=2, w=3):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    weights = np.array([0.9, 0.8] + [0.0] * (d - 2))
    return {
        "projector": (np.eye(d) - q.T[:2].T @ np.diag(weights[:2]) @ q.T[:2]).astype(np.float32),
        "mean": rng.normal(size=d), "components": q.T, "eigenvalues": np.linspace(2, 1, d),
        "scores": rng.uniform(size=d), "weights": weights,
        "p": rng.uniform(size=(h, w, d)).astype(np.float32), "q": rng.uniform(size=(h, w, d)).astype(np.float32),
    }


def test_artifact_round_trip_and_manifest(tmp_path):
    tensors = _tensors()
    path = write_artifact(tmp_path / "a", tensors, {"backbone": "b", "layer": 1, "dim": 6},
                          extra_files={"plots/x.png": b"png"})
    art = read_artifact(path)
    for name in TENSOR_NAMES:
        np.testing.assert_array_equal(art.tensors[name], tensors[name])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema"] == 1 and len(manifest["content_hash"]) == 64
    assert (path / "plots" / "x.png").read_bytes() == b"png"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    with pytest.raises(SoapError, match="already exists"):
        write_artifact(tmp_path / "a", tensors, {})
    write_artifact(tmp_path / "a", tensors, {"note": "again"}, overwrite=True)
    assert read_artifact(path).manifest["note"] == "again"


def test_tampered_artifact_is_refused(tmp_path):
    path = write_artifact(tmp_path / "a", _tensors(), {})
    raw = bytearray((path / "soap.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (path / "soap.safetensors").write_bytes(bytes(raw))
    with pytest.raises(SoapError, match="does not match the manifest"):
        read_artifact(path)
    with pytest.raises(SoapError, match="does not match the manifest"):
        SOAPHead.from_artifact(path)


def test_artifact_missing_tensor_is_refused(tmp_path):
    tensors = _tensors()
    del tensors["q"]
    with pytest.raises(SoapError, match=r"missing tensors \['q'\]"):
        write_artifact(tmp_path / "a", tensors, {})
    assert not (tmp_path / "a").exists()


def test_soap_head_applies_projector_to_raw_tokens(tmp_path):
    tensors = _tensors()
    head = SOAPHead.from_artifact(write_artifact(tmp_path / "a", tensors, {"layer": 1}))
    assert head.bias is None and head.manifest["layer"] == 1
    tokens = torch.randn(2, 2, 3, 6)
    expected = np.einsum("ij,...j->...i", tensors["projector"].astype(np.float64), tokens.double().numpy())
    np.testing.assert_allclose(head(tokens).numpy(), expected, atol=1e-5)
    # the suppressed direction is (almost) gone, an untouched one is kept
    comps = torch.from_numpy(tensors["components"]).float()
    np.testing.assert_allclose((head(comps[0]) @ comps[0]).item(), 0.1, atol=1e-5)
    np.testing.assert_allclose((head(comps[4]) @ comps[4]).item(), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="D=6"):
        head(torch.randn(3, 5))


def test_final_norm_is_part_of_a_stores_identity(tmp_path):
    """Tokens before and after the final norm never mix: not on resume, not in a fit; a store
    without the attribute (written before soapflow recorded it) holds pre-norm tokens."""
    from soapflow.storage.feature_store import check_compatible

    tokens = positional_tokens(6)
    old = write_store(tmp_path / "old", tokens, chunk=3)  # no final_norm attribute
    off = write_store(tmp_path / "off", tokens, chunk=3, attrs={"final_norm": False})
    on = write_store(tmp_path / "on", tokens, chunk=3, attrs={"final_norm": True})
    assert "final_norm" not in old.attrs
    assert old.describe()["final_norm"] is False and on.describe()["final_norm"] is True
    check_compatible(old, off)  # absent reads as off
    for a, b in ((on, off), (old, on)):
        with pytest.raises(SoapError, match=rf"stores differ in final_norm: .*{a.uri.split('/')[-1]} has "
                                            rf"{a.attrs.get('final_norm', False)}, .* has {b.attrs['final_norm']}"):
            check_compatible(a, b)
    kwargs = dict(count=6, grid=(4, 5), dim=12, chunk=3, dtype="float32")
    with pytest.raises(SoapError, match=r"exists with final_norm=False, not True"):
        FeatureStore.create(str(tmp_path / "old"), **kwargs, attrs={"backbone": "test-vit", "layer": 3,
                                                                    "final_norm": True})
    again = FeatureStore.create(str(tmp_path / "old"), **kwargs, attrs={"backbone": "test-vit", "layer": 3,
                                                                        "final_norm": False})
    assert again.pending_chunks() == []  # the old store resumes as the off store it is
