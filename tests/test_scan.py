"""Per-layer scan: one extraction pass for several blocks, SOAP per block via soapflow.method."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from soapflow import method
from soapflow.config import Auto, BackboneSpec, DataSpec, EvalSettings, FitParams, RunSettings
from soapflow.errors import SoapError
from soapflow.cluster import dask_client
from soapflow.evaluation.scan import parse_layers, scan
from soapflow.fit import fit_stores
from soapflow.head import SOAPHead
from soapflow.storage.artifact import read_artifact
from soapflow.storage.feature_store import FeatureStore
from storehelp import positional_tokens, write_store


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("last", 12) == [11]
    assert parse_layers("8,-1,8", 12) == [8, 11]
    with pytest.raises(SoapError, match="out of range"):
        parse_layers("12", 12)
    with pytest.raises(SoapError, match="--layers"):
        parse_layers("six", 12)


def test_the_fit_of_a_scan_equals_the_method_on_all_tokens_at_once(tmp_path):
    real = positional_tokens(70, seed=0)
    synth = positional_tokens(30, seed=1, scale=0.3)
    write_store(str(tmp_path / "r"), real, chunk=9)
    write_store(str(tmp_path / "s"), synth, chunk=7)
    with dask_client() as client:  # as scan fits each block
        fit, _ = fit_stores(str(tmp_path / "r"), str(tmp_path / "s"), FitParams(mu=Auto()), client=client, progress=False)
    m = method.moments(real)
    lam, comps = method.principal_components(m)
    ref = method.soap_from_statistics(m, comps, lam, method.activation_counts(real, m.mean, comps), 70,
                                      method.activation_counts(synth, m.mean, comps), 30, FitParams(mu=Auto()))
    np.testing.assert_allclose(fit.mean, ref.mean, atol=1e-9)
    np.testing.assert_allclose(fit.scores, ref.scores, atol=1e-9)
    np.testing.assert_allclose(fit.projector, ref.projector, atol=1e-9)
    assert fit.mu == ref.mu and fit.mu >= 1  # the positional pattern is found


def test_scan_extracts_all_layers_in_one_pass_and_fits_each(tmp_path, monkeypatch):
    from soapflow.backbones import Backbone

    calls = []
    original = Backbone.tokens_multi

    def counting(self, images, layers):
        calls.append((len(images), tuple(layers)))
        return original(self, images, layers)

    monkeypatch.setattr(Backbone, "tokens_multi", counting)
    result = scan(BackboneSpec("vit_tiny_patch16_224", weights="random", image_size=32, device="cpu"), "1,-1",
                  DataSpec(real="fashion-mnist:train", n_real=10, n_synth=8),
                  run=RunSettings(chunk=4, workdir=str(tmp_path / "work"), progress=False), keep_work=True,
                  artifacts_dir=str(tmp_path / "arts"),
                  evaluation=EvalSettings(evaluations=("knn-cls", "salient"), dataset="fashion-mnist:test", n=6,
                                          bank_n=8, n_boot=100, batch_size=4),
                  out_dir=str(tmp_path / "out"))
    # 10 real + 8 synthetic images in batches of 4: 3 + 2 forward passes, each for both blocks
    assert [c[0] for c in calls] == [4, 4, 2, 4, 4] and all(c[1] == (1, 11) for c in calls)
    assert [s["layer"] for s in result["layers"]] == [1, 11]
    for s in result["layers"]:
        assert 0 < s["max_si"] <= 1 and s["max_si"] == s["top_si"][0]
        store = FeatureStore.open(s["stores"]["real"])
        assert store.attrs["layer"] == s["layer"] and store.count == 10
        art = read_artifact(s["artifact"])
        assert s["n_above_threshold"] == int(np.count_nonzero(art.tensors["scores"] > 0.75))
        assert art.manifest["layer"] == s["layer"] and art.manifest["n_real_images"] == 10
        assert art.manifest["n_synth_images"] == 8
        assert SOAPHead.from_artifact(s["artifact"]).in_features == 192
        np.testing.assert_allclose(np.sort(art.tensors["scores"])[::-1][:8], s["top_si"], atol=1e-12)
    # each artifact is bit-identical to `soap fit` on the same stores
    from soapflow.cli.main import app

    for s in result["layers"]:
        again = tmp_path / f"fit-L{s['layer']}"
        res = CliRunner().invoke(app, ["fit", s["stores"]["real"], s["stores"]["synthetic"], "--out", str(again)])
        assert res.exit_code == 0, res.output + repr(res.exception)
        scanned = read_artifact(s["artifact"])
        assert read_artifact(str(again)).manifest["content_hash"] == scanned.manifest["content_hash"]
        assert (again / "soap.safetensors").read_bytes() == (tmp_path / "arts" / f"L{s['layer']}" / "soap.safetensors").read_bytes()
    ev = result["evaluations"]
    assert set(ev) == {"1", "11"} and set(ev["11"]) == {"knn-cls", "salient"}
    assert ev["1"]["salient"]["head"]["layer"] == 1 and ev["11"]["knn-cls"]["n_images"] == 6
    saved = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert saved["layers"][1]["layer"] == 11
    for name in ("si_vs_depth.png", "metrics_vs_depth.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000


def test_cli_scan(tmp_path):
    from soapflow.cli.main import app

    res = CliRunner().invoke(app, ["scan", "--backbone", "vit_tiny_patch16_224", "--weights", "random",
                                   "--image-size", "32", "--layers", "0,2", "--n-real", "6", "--batch-size", "3",
                                   "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "max SI" in res.output and (tmp_path / "o" / "si_vs_depth.png").is_file()
    data = json.loads((tmp_path / "o" / "scan.json").read_text())
    assert [s["layer"] for s in data["layers"]] == [0, 2] and data["work_dir"] is None
    res = CliRunner().invoke(app, ["scan", "--backbone", "vit_tiny_patch16_224", "--weights", "random",
                                   "--layers", "40", "--n-real", "4"])
    assert isinstance(res.exception, SoapError) and "40" in str(res.exception)
    res = CliRunner().invoke(app, ["scan", "--backbone", "vit_tiny_patch16_224", "--weights", "random",
                                   "--eval", "segment", "--n-real", "4"])
    assert isinstance(res.exception, SoapError) and "segment" in str(res.exception)


def test_scan_applies_the_final_norm_at_the_last_block_only(tmp_path):
    import torch

    from soapflow.backbones import load_backbone

    result = scan(BackboneSpec("vit_tiny_patch16_224", weights="random", image_size=32, device="cpu"), "1,-1",
                  DataSpec(real="fashion-mnist:train", n_real=4, n_synth=4),
                  run=RunSettings(chunk=4, workdir=str(tmp_path / "work"), progress=False), keep_work=True)
    bb = load_backbone("vit_tiny_patch16_224", weights="random", image_size=32)
    from soapflow.sources import open_source

    x = open_source("fashion-mnist:train", n=4, seed=0).batch(range(4), 32, bb.mean, bb.std)
    with torch.inference_mode():
        after = bb.model.forward_features(x)[:, 1:].reshape(4, 2, 2, 192).numpy()
    for s in result["layers"]:
        store = FeatureStore.open(s["stores"]["real"])
        assert store.attrs["final_norm"] is (s["layer"] == 11) is s["final_norm"]
        assert FeatureStore.open(s["stores"]["synthetic"]).attrs["final_norm"] is s["final_norm"]
    np.testing.assert_allclose(FeatureStore.open(result["layers"][1]["stores"]["real"]).tokens[:].astype(np.float32),
                               after, rtol=1e-3, atol=1e-3 * np.abs(after).max())
