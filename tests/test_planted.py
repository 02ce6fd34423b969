"""Planted-artifact benchmark (issue 15 §2): planting, recovery measures, the sweep through real
zarr stores and a real LocalCluster fit, and `soap eval planted` end to end on a tiny ViT."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from soapflow.config import EvalSettings
from soapflow.errors import SoapError
from soapflow.evaluation import planted as PL
from soapflow.storage.artifact import read_artifact
from soapflow.storage.feature_store import FeatureStore
from storehelp import write_store


def test_patterns_are_zero_mean_unit_rms_and_orthogonal():
    pats, freqs = PL.cosine_patterns((6, 7), 4)
    assert pats.shape == (4, 6, 7) and freqs == [(0, 1), (1, 0), (0, 2), (1, 1)]
    flat = pats.reshape(4, -1)
    np.testing.assert_allclose(flat.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(flat @ flat.T / flat.shape[1], np.eye(4), atol=1e-12)
    with pytest.raises(SoapError, match="2×2 grid"):
        PL.cosine_patterns((2, 2), 4)


def test_quiet_order_puts_the_backbones_own_positional_patterns_last():
    grid, d = (8, 8), 12
    pats, freqs = PL.cosine_patterns(grid, 9)
    rng = np.random.default_rng(0)
    # a per-position mean that varies strongly with (0, 1) and weakly with (1, 1), nothing else
    mean = 5.0 + 3.0 * pats[0][..., None] * rng.standard_normal(d) + 0.5 * pats[3][..., None] * rng.standard_normal(d)
    order = PL.quiet_order(mean)
    assert sorted(order) == sorted(freqs) and order[-1] == (0, 1) and order[-2] == (1, 1)
    plant = PL.make_plant(grid, d, 4, 2.0, 1.0, order=order)
    assert (0, 1) not in plant.frequencies and (1, 1) not in plant.frequencies
    np.testing.assert_allclose(PL.natural_pattern_components(mean, plant.patterns), 0, atol=1e-9)
    with pytest.raises(SoapError, match="--plant"):
        PL.Planting(plant="loud")


def test_directions_are_orthonormal_and_nested():
    u4 = PL.planted_directions(32, 4, seed=3)
    np.testing.assert_allclose(u4 @ u4.T, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(PL.planted_directions(32, 2, seed=3), u4[:2], atol=1e-12)
    assert not np.allclose(PL.planted_directions(32, 2, seed=4), u4[:2])


def test_directions_can_avoid_natural_components():
    natural = np.eye(32)[:5]
    u = PL.planted_directions(32, 3, seed=1, avoid=natural)
    np.testing.assert_allclose(u @ u.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(u @ natural.T, 0, atol=1e-12)
    with pytest.raises(SoapError, match="orthogonal to 30 natural components"):
        PL.planted_directions(32, 3, avoid=np.eye(32)[:30])


def test_plant_adds_the_requested_variance_along_each_direction():
    plant = PL.make_plant((6, 6), 16, 2, amplitude=2.0, lambda_max=3.0)
    f = plant.field().reshape(-1, 16).astype(np.float64)
    proj = f @ plant.directions.T  # every token's planted term along u_j, over all positions
    np.testing.assert_allclose(proj.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(proj.var(axis=0), 2.0 * 3.0, rtol=1e-5)
    np.testing.assert_allclose(f @ (np.eye(16) - plant.directions.T @ plant.directions), 0, atol=1e-5)


def test_recovery_measures_on_constructed_artifacts():
    d = 8
    comps = np.eye(d)
    u = comps[[2, 5]]
    scores = np.full(d, 0.7)
    weights = np.zeros(d)
    weights[[2, 5, 7]] = scores[[2, 5, 7]] = 0.95  # suppressed: the two planted axes and one natural
    rec = PL.recovery({"components": comps, "scores": scores, "weights": weights}, u)
    assert rec["suppressed_ranks"] == [2, 5, 7] and rec["n_suppressed_not_planted"] == 1
    assert rec["max_angle_deg"] == pytest.approx(0, abs=1e-6) and rec["recovered"]
    assert [x["best_rank"] for x in rec["directions"]] == [2, 5]
    # a direction 30° off its component: that angle; a direction outside: 90°
    tilted = np.array([np.cos(np.pi / 6) * comps[2] + np.sin(np.pi / 6) * comps[3], comps[4]])
    rec = PL.recovery({"components": comps, "scores": scores, "weights": weights}, tilted)
    assert rec["principal_angles_deg"] == pytest.approx([30.0, 90.0])
    assert [x["angle_to_suppressed_deg"] for x in rec["directions"]] == pytest.approx([30.0, 90.0])
    assert not rec["recovered"] and rec["n_suppressed_not_planted"] == 2  # 2 is 75 % planted
    # nothing suppressed: every planted dimension is missing
    rec = PL.recovery({"components": comps, "scores": scores, "weights": np.zeros(d)}, u)
    assert rec["principal_angles_deg"] == [90.0, 90.0] and rec["n_suppressed"] == 0


def test_settings_validate_once():
    with pytest.raises(SoapError, match="--amplitudes"):
        PL.Planting(amplitudes=(1.0, -2.0))
    with pytest.raises(SoapError, match="--k"):
        PL.Planting(ks=(0,))
    with pytest.raises(SoapError, match="--mu"):
        PL.Planting(mu=-1)
    with pytest.raises(SoapError, match="unknown evaluation"):
        EvalSettings(evaluations=("salient", "knn"))
    with pytest.raises(SoapError, match="--n-real"):
        PL.PlantedData(n_real=1)


def _content_tokens(n, grid, d, scales, seed):
    """Content-only tokens: independent per image and position, anisotropic (no positional part)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *grid, d)) * scales).astype(np.float32)


def test_sweep_recovers_planted_directions_through_stores_and_the_dask_fit(tmp_path):
    grid, d = (6, 6), 24
    scales = np.linspace(3.0, 0.5, d)
    real = write_store(str(tmp_path / "real"), _content_tokens(60, grid, d, scales, 0), chunk=16)
    synth = write_store(str(tmp_path / "synth"), _content_tokens(60, grid, d, np.ones(d), 1), chunk=16)
    planting = PL.Planting(ks=(2,), amplitudes=(0.02, 4.0), seed=7, plant="plain")
    out = PL.fit_sweep(real.uri, synth.uri, planting, str(tmp_path / "sweep"), keep_stores=True, progress=False)

    clean = out["clean"]
    assert clean["lambda_max"] == pytest.approx(9.0, rel=0.15)  # the largest content variance
    assert clean["n_suppressed"] == 0  # content alone is not positional: nothing to suppress
    weak, strong = out["runs"]
    # at 4× every planted direction is found, fires by position alone, and nothing else is removed
    assert strong["recovered"] and strong["max_angle_deg"] <= PL.MAX_ANGLE_DEG
    assert strong["n_suppressed"] == 2 and strong["n_suppressed_not_planted"] == 0
    for direction in strong["directions"]:
        assert direction["si"] > 0.85 and direction["best_score"] > 0.85
        # equal amplitudes: the two planted eigenvalues nearly tie, so the components may be any
        # rotation within span(u_j); each u_j still lies in the suppressed subspace
        assert direction["angle_to_suppressed_deg"] <= PL.MAX_ANGLE_DEG and direction["best_abs_cos"] > 0.7
    # far below the content variance a planted direction is neither separated nor suppressed
    assert not weak["recovered"] and weak["max_angle_deg"] > 45
    # the planted stores are real stores: clean tokens + the field, with provenance
    planted = FeatureStore.open(strong["stores"]["real"])
    assert planted.attrs["planted"]["k"] == 2 and planted.attrs["planted"]["amplitude"] == 4.0
    plant = PL.make_plant(grid, d, 2, 4.0, clean["lambda_max"], seed=7)
    np.testing.assert_allclose(np.asarray(planted.tokens[:5]), np.asarray(real.tokens[:5]) + plant.field(),
                               rtol=1e-6, atol=1e-5)
    manifest = json.loads((tmp_path / "sweep" / "artifacts" / "k2-a4" / "manifest.json").read_text())
    assert manifest["planted"]["directions_sha256"] == plant.describe()["directions_sha256"]
    assert manifest["mu_mode"] == "auto"


def test_natural_pattern_components_and_the_artifact_actually_present(tmp_path):
    """Clean tokens that already carry one planted pattern along w: PCA finds c·u + g, not u."""
    grid, d = (6, 6), 24
    pats, _ = PL.cosine_patterns(grid, 1)
    w = np.zeros(d)
    w[0] = 1.0  # the natural positional direction, b·a_0(h, w)·w, b = 2
    position = 2.0 * pats[0][..., None] * w
    np.testing.assert_allclose(PL.natural_pattern_components(position + 5.0, pats), [2.0 * w], atol=1e-12)

    scales = np.linspace(3.0, 0.5, d)
    real = write_store(str(tmp_path / "real"), _content_tokens(60, grid, d, scales, 0) + position, chunk=16)
    synth = write_store(str(tmp_path / "synth"), _content_tokens(60, grid, d, np.ones(d), 1) + position, chunk=16)
    out = PL.fit_sweep(real.uri, synth.uri, PL.Planting(ks=(1,), amplitudes=(4.0,), seed=7, plant="plain"),
                       str(tmp_path / "sweep"), progress=False)
    (run,) = out["runs"]
    (direction,) = run["directions"]
    c = np.sqrt(4.0 * out["clean"]["lambda_max"])
    u = PL.planted_directions(d, 1, seed=7)[0]
    g = PL.natural_pattern_components(np.asarray(real.tokens[:], dtype=np.float64).mean(axis=0), pats)[0]
    expected = np.degrees(np.arccos(abs(u @ (c * u + g)) / np.linalg.norm(c * u + g)))
    assert direction["natural_ratio"] == pytest.approx(np.linalg.norm(g) / c, rel=1e-6)
    assert direction["natural_ratio"] == pytest.approx(2.0 / c, rel=0.1)  # g ≈ 2·w, up to the content's noise
    assert direction["angle_u_to_effective_deg"] == pytest.approx(expected, rel=1e-6) and expected > 12
    # the suppressed component is the artifact present, c·u + g; against u alone it is off by that tilt
    assert run["effective_max_angle_deg"] < 4 and run["max_angle_deg"] > 10 and not run["recovered"]
    assert run["n_suppressed"] == 1 and out["clean"]["n_avoided"] is None  # plain: no direction avoided

    # planted where the clean tokens are quiet (another pattern, a direction ⟂ their top
    # components) the artifact present is c·u itself, and the fit suppresses it
    out = PL.fit_sweep(real.uri, synth.uri, PL.Planting(ks=(1,), amplitudes=(4.0,), seed=7),
                       str(tmp_path / "quiet"), progress=False)
    (run,) = out["runs"]
    assert run["plant"]["frequencies"] != [[0, 1]] and run["directions"][0]["natural_ratio"] < 0.05
    assert run["recovered"] and run["max_angle_deg"] < 4
    assert run["n_suppressed"] == 2 and run["n_suppressed_not_planted"] == 1  # and the natural b·a_0·w, apart
    # the report counts the clean components the planted direction was kept orthogonal to
    clean = read_artifact(out["clean"]["artifact"]).tensors
    big = np.asarray(clean["eigenvalues"]) >= PL.QUIET_EIGENVALUE * float(clean["eigenvalues"][0])
    assert out["clean"]["n_avoided"] == int(big.sum()) and 0 < out["clean"]["n_avoided"] < d
    avoided = np.asarray(clean["components"], np.float64)[big]
    u_quiet = PL.planted_directions(d, 1, seed=7, avoid=avoided)
    digest = hashlib.sha256(np.ascontiguousarray(u_quiet, dtype=np.float64).tobytes()).hexdigest()
    assert run["plant"]["directions_sha256"] == digest  # the direction planted is this one, ⟂ those
    np.testing.assert_allclose(avoided @ u_quiet[0], 0, atol=1e-9)


def test_token_view_plants_then_applies_the_head():
    import torch

    from soapflow.head import SOAPHead

    base = np.random.default_rng(0).standard_normal((5, 2, 3, 4)).astype(np.float16)
    add = np.ones((2, 3, 4), np.float32)
    p = np.diag([1.0, 0.0, 1.0, 0.5]).astype(np.float32)
    view = PL.TokenView(base, add, SOAPHead(torch.from_numpy(p)))
    assert len(view) == 5 and view.shape == (5, 2, 3, 4)
    np.testing.assert_allclose(view[1:3], (base[1:3].astype(np.float32) + add) @ p.T, rtol=1e-6)


def test_cli_eval_planted_on_a_tiny_vit(tmp_path):
    from soapflow.cli.main import app

    out, png = tmp_path / "planted.json", tmp_path / "planted.png"
    res = CliRunner().invoke(app, [
        "eval", "planted", "--backbone", "vit_tiny_patch16_224", "--weights", "random", "--layer", "5",
        "--image-size", "64", "--n-real", "24", "--n-synth", "24", "--n", "10", "--k", "1", "--amplitudes", "4",
        "--workdir", str(tmp_path / "work"), "--json", str(out), "--plot", str(png), "--n-boot", "200",
        "--chunk", "8", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(out.read_text())
    assert rep["evaluation"] == "planted" and rep["backbone"]["backbone"] == "vit_tiny_patch16_224"
    (run,) = rep["runs"]
    assert run["k"] == 1 and run["amplitude"] == 4.0 and len(run["principal_angles_deg"]) == 1
    assert set(run["metrics"]) == {"tokencut_max_fbeta", "knn_seg_miou", "knn_top1"}
    for m in run["metrics"].values():
        for key in ("clean", "clean_soap", "planted", "planted_soap"):
            assert 0 <= m[key] <= 1
        assert m["loss"]["value"] == pytest.approx(m["planted"] - m["clean"])
        assert m["residual"]["value"] == pytest.approx(m["planted_soap"] - m["clean_soap"])
        assert m["loss"]["n"] == 10
    assert set(rep["clean"]["metrics"]) == set(run["metrics"])
    assert Image.open(png).size[0] > 500 and "every planted direction recovered at amplitudes" in res.output
    table = PL.markdown_table(rep)
    assert table.startswith("| k | amplitude |") and "**TokenCut max Fβ**" in table
    # the planted stores are removed unless kept; the clean stores stay for the next run
    assert not os.path.exists(tmp_path / "work" / "sweep" / "stores" / "k1-a4")
    assert FeatureStore.open(str(tmp_path / "work" / "clean" / "eval")).count == 10

    res = CliRunner().invoke(app, ["eval", "planted", "--amplitudes", "1,x", "--workdir", str(tmp_path / "w2")])
    assert isinstance(res.exception, SoapError) and "--amplitudes" in str(res.exception)
