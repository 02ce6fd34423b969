"""Zero-shot evaluations (SPEC §5): TokenCut, metrics, kNN, paired bootstrap, datasets, CLI, flow."""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from typer.testing import CliRunner

from soapflow.errors import SoapError
from soapflow.evaluation import knn as K
from soapflow.evaluation import metrics as M
from soapflow.evaluation.datasets import detect_layout, open_eval_data
from soapflow.evaluation.stats import bootstrap_counts, paired_bootstrap, paired_bootstrap_mean
from soapflow.evaluation.tokencut import _second_eigvec, ncut, refine_mask, soft_map, upsample_mask


# ------------------------------------------------------------------------------ TokenCut


def two_cluster_tokens(mask, d=32, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    fg, bg = rng.normal(size=d), rng.normal(size=d)
    bg -= bg @ fg / (fg @ fg) * fg  # orthogonal clusters: cosine ≈ 0 across, 1 within
    tok = np.where(mask[..., None], fg, bg) + noise * rng.normal(size=(*mask.shape, d))
    return tok.astype(np.float32)


@pytest.mark.parametrize("foreground", ["seed", "pca"])
def test_tokencut_recovers_two_clean_clusters_exactly(foreground):
    masks = []
    for k, (r0, r1, c0, c1) in enumerate([(3, 9, 4, 12), (6, 14, 2, 7), (1, 5, 1, 15)]):
        m = np.zeros((16, 16), bool)
        m[r0:r1, c0:c1] = True
        masks.append(m)
    tokens = np.stack([two_cluster_tokens(m, seed=i) for i, m in enumerate(masks)])
    cut = ncut(tokens, tau=0.2, foreground=foreground)
    for i, m in enumerate(masks):
        np.testing.assert_array_equal(cut.mask[i], m)  # the object (never the border-touching side)
        assert cut.mask[i].ravel()[cut.seed[i]]
        assert (cut.eigvec[i][m] > 0).all() and (cut.eigvec[i][~m] < 0).all()  # fg side positive
    assert (cut.eigenvalue < 1e-3).all()  # an almost disconnected graph: λ₂ ≈ 0


def test_tokencut_eigvec_matches_scipy_generalized_problem():
    rng = np.random.default_rng(3)
    base = rng.normal(size=(3, 24))
    tok = base[rng.integers(0, 3, size=(2, 8 * 8))] + 0.8 * rng.normal(size=(2, 64, 24))
    x, lam = _second_eigvec(tok, 0.2, 1e-5)
    for i in range(2):
        f = tok[i] / np.linalg.norm(tok[i], axis=1, keepdims=True)
        a = np.where(f @ f.T > 0.2, 1.0, 1e-5)
        d = np.diag(a.sum(1))
        vals, vecs = scipy.linalg.eigh(d - a, d, subset_by_index=[1, 1])
        assert lam[i] == pytest.approx(vals[0], rel=1e-8)
        assert abs(vecs[:, 0] @ d @ x[i]) == pytest.approx(1.0, abs=1e-8)  # same vector up to sign


def test_seed_rule_picks_side_of_largest_deviation():
    rng = np.random.default_rng(5)
    tok = rng.normal(size=(4, 8, 8, 16)) + rng.normal(size=16) * 0.5
    cut = ncut(tok, tau=0.0)
    for i in range(4):
        # the mask is the side (relative to the mean) that holds argmax |x − mean|
        x = cut.eigvec[i].ravel()
        assert cut.mask[i].ravel()[np.abs(x).argmax()]
        np.testing.assert_array_equal(cut.mask[i].ravel(), x > 0)


def test_component_keeps_only_the_seed_component():
    m = np.zeros((12, 12), bool)
    m[1:5, 1:5] = True
    m[8:11, 8:11] = True  # a second, disconnected piece of the same cluster
    cut = ncut(two_cluster_tokens(m), foreground="seed", component=True)
    kept = cut.mask[0]
    assert kept.sum() in (16, 9) and kept.ravel()[cut.seed[0]]


def test_soft_map_and_upsample():
    e = np.array([[-1.0, 1.0], [0.0, 3.0]])
    s = soft_map(e, 8)
    assert s.shape == (8, 8) and s.min() == 0 and s.max() == 1
    up = upsample_mask(np.array([[True, False], [False, True]]), 4)
    np.testing.assert_array_equal(up, np.kron(np.eye(2, dtype=int), np.ones((2, 2), int)).astype(bool))


def test_bilateral_refinement_snaps_a_blocky_mask_to_the_object_edges():
    rgb = np.full((96, 96, 3), 20, np.uint8)
    yy, xx = np.mgrid[:96, :96]
    obj = (yy - 48) ** 2 / 30**2 + (xx - 44) ** 2 / 22**2 < 1  # an ellipse
    rgb[obj] = (220, 180, 60)
    coarse = upsample_mask(obj.reshape(6, 16, 6, 16).mean((1, 3)) > 0.5, 96)  # 16-px blocks
    soft, refined = refine_mask(rgb, coarse)
    assert soft.min() >= 0 and soft.max() <= 1
    assert M.iou(refined, obj) > M.iou(coarse, obj) + 0.05
    assert M.iou(refined, obj) > 0.9


# ------------------------------------------------------------------------------ metrics


def test_fbeta_curve_against_hand_computed_values():
    soft = np.array([[0.9, 0.6], [0.3, 0.0]])
    gt = np.array([[True, False], [True, False]])
    th = M.thresholds()
    curve = M.fbeta_curve(soft, gt)
    # threshold 0 → everything predicted: P = 2/4, R = 1 → F = 1.3·0.5/(0.3·0.5 + 1)
    assert curve[0] == pytest.approx(1.3 * 0.5 / (0.15 + 1))
    # threshold just above 0.3 and ≤ 0.6 → {0.9, 0.6}: P = 1/2, R = 1/2 → F = 0.5
    i = np.flatnonzero((th > 0.3) & (th <= 0.6))[0]
    assert curve[i] == pytest.approx(0.5)
    # threshold in (0.6, 0.9] → {0.9}: P = 1, R = 1/2 → F = 1.3·0.5/(0.3 + 0.5)
    i = np.flatnonzero((th > 0.6) & (th <= 0.9))[0]
    assert curve[i] == pytest.approx(1.3 * 0.5 / 0.8)
    assert curve[-1] == 0  # nothing ≥ 1 − 1e−10: P = R = 0 → 0


def test_fbeta_curve_equals_brute_force_loop():
    rng = np.random.default_rng(0)
    soft = rng.random((20, 20))
    gt = rng.random((20, 20)) > 0.6
    brute = []
    for t in M.thresholds():
        pred = soft >= t
        tp = (pred & gt).sum()
        p, r = tp / (pred.sum() + 1e-20), tp / (gt.sum() + 1e-20)
        brute.append(1.3 * p * r / (0.3 * p + r) if p + r > 0 else 0.0)
    np.testing.assert_allclose(M.fbeta_curve(soft, gt), brute, atol=1e-12)


def test_max_fbeta_averages_curves_before_the_max():
    curves = np.array([[0.2, 0.9, 0.1], [0.8, 0.3, 0.1]])
    value, idx = M.max_fbeta(curves)
    assert (value, idx) == (pytest.approx(0.6), 1)  # mean curve [0.5, 0.6, 0.1]; not mean of maxima (0.85)


def test_iou_accuracy_confusion_miou():
    pred = np.array([[1, 1, 0], [0, 0, 0]], bool)
    gt = np.array([[1, 0, 0], [1, 0, 0]], bool)
    assert M.iou(pred, gt) == pytest.approx(1 / 3)
    assert M.pixel_accuracy(pred, gt) == pytest.approx(4 / 6)
    assert M.iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    lp = np.array([0, 1, 1, 2, 2, 2])
    lg = np.array([0, 1, 2, 2, 2, 255])
    conf = M.confusion(lp, lg, 3)
    np.testing.assert_array_equal(conf, [[1, 0, 0], [0, 1, 0], [0, 1, 2]])  # 255 ignored
    # IoU: class0 1/1, class1 1/2, class2 2/3
    assert M.miou(conf) == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert M.confusion_accuracy(conf) == pytest.approx(4 / 5)
    assert np.isnan(M.iou_per_class(np.zeros((2, 2)))).all()


# ------------------------------------------------------------------------------ kNN


def test_knn_on_separable_clusters_is_perfect():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 5
    bank_labels = np.repeat(np.arange(4), 30)
    bank = centers[bank_labels] + rng.normal(size=(120, 16)) * 0.3
    q_labels = np.repeat(np.arange(4), 10)
    queries = centers[q_labels] + rng.normal(size=(40, 16)) * 0.3
    np.testing.assert_array_equal(K.knn_predict(queries, bank, bank_labels, k=7, block=9), q_labels)


def test_knn_majority_vote_and_tie_break():
    bank = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, 0.05]])
    labels = np.array([2, 2, 1, 1])
    # k=3 nearest of (1, 0.04): indices 3 (lab 1), 0 (2), 1 (2) → majority 2
    assert K.knn_predict([[1.0, 0.04]], bank, labels, k=3)[0] == 2
    # k=2: one vote each for 1 and 2 → tie goes to the larger summed similarity (index 3 is nearest → 1)
    assert K.knn_predict([[1.0, 0.06]], bank[[0, 3]], labels[[0, 3]], k=2)[0] == 1
    assert K.knn_predict([[1.0, 0.0]], bank, labels, k=100)[0] == 2  # k capped at the bank size: 2 vs 2, tie
    with pytest.raises(ValueError, match="empty"):
        K.knn_predict([[1.0, 0.0]], np.zeros((0, 2)), np.zeros(0, int), k=1)


def test_patch_labels_majority_and_ignore():
    lm = np.zeros((4, 4), int)
    lm[:2, :2] = 3
    lm[0, 2:] = 5  # half of patch (0,1)
    lm[2:, 2:] = 255
    lab = K.patch_labels(lm, (2, 2))
    np.testing.assert_array_equal(lab, [[3, 0], [0, 255]])  # 5 vs 0 tie → smaller label wins


# ------------------------------------------------------------------------------ bootstrap


def test_bootstrap_counts_are_seeded_multinomial_draws():
    c = bootstrap_counts(50, 30, seed=1)
    assert c.shape == (30, 50) and (c.sum(1) == 50).all()
    np.testing.assert_array_equal(c, bootstrap_counts(50, 30, seed=1))
    assert not np.array_equal(c, bootstrap_counts(50, 30, seed=2))


def test_paired_bootstrap_covers_true_difference_and_is_reproducible():
    true_delta = 0.05
    covered = 0
    for rep in range(40):
        rng = np.random.default_rng(100 + rep)
        raw = rng.normal(0.6, 0.15, size=300)
        soap = raw + true_delta + rng.normal(0, 0.05, size=300)  # paired: same images
        p = paired_bootstrap_mean(raw, soap, n_boot=500, seed=rep)
        covered += p.delta_ci[0] <= true_delta <= p.delta_ci[1]
        if rep == 0:
            assert p.delta == pytest.approx(soap.mean() - raw.mean())
            assert p.delta_ci[0] < p.delta < p.delta_ci[1]
            assert p.improved == int((soap > raw).sum()) and p.worsened == int((soap < raw).sum())
            assert p.improved + p.worsened + p.unchanged == 300
            again = paired_bootstrap_mean(raw, soap, n_boot=500, seed=0)
            assert (again.delta_ci, again.raw_ci) == (p.delta_ci, p.raw_ci)
            assert paired_bootstrap_mean(raw, soap, n_boot=500, seed=7).delta_ci != p.delta_ci
            # pairing makes the CI of the difference much narrower than the CIs of the means
            assert p.delta_ci[1] - p.delta_ci[0] < 0.5 * (p.raw_ci[1] - p.raw_ci[0])
    assert 34 <= covered <= 40  # nominal 95%


def test_paired_bootstrap_of_a_dataset_level_statistic():
    rng = np.random.default_rng(0)
    raw = rng.random((25, 5))
    soap = rng.random((25, 5))
    p = paired_bootstrap(raw, soap, lambda m: m.max(1), per_image_raw=raw[:, 0], per_image_soap=soap[:, 0],
                         n_boot=200, seed=3)
    assert p.raw == pytest.approx(raw.mean(0).max()) and p.soap == pytest.approx(soap.mean(0).max())
    # resample 0 equals an explicit resample of images
    counts = bootstrap_counts(25, 200, 3)[0]
    idx = np.repeat(np.arange(25), counts.astype(int))
    assert (soap[idx].mean(0).max() - raw[idx].mean(0).max()) == pytest.approx(
        (counts @ soap / 25).max() - (counts @ raw / 25).max())
    with pytest.raises(ValueError, match="per_image"):
        paired_bootstrap(raw, soap, lambda m: m.max(1))
    d = p.to_dict()
    assert set(d) >= {"raw", "soap", "delta"} and len(d["delta"]["ci95"]) == 2


# ------------------------------------------------------------------------------ datasets


def _img(path, size=(20, 16), color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _mask(path, size=(20, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.zeros(size[::-1], np.uint8)
    a[4:12, 5:15] = 255
    a[0, 0] = 100  # below 128: background
    Image.fromarray(a).save(path)


@pytest.mark.parametrize("layout,img_dir,mask_dir", [
    ("ECSSD", "images", "ground_truth_mask"),
    ("DUTS-TE", "DUTS-TE-Image", "DUTS-TE-Mask"),
    ("DUT-OMRON", "DUT-OMRON-image", "pixelwiseGT-new-PNG"),
    ("images+masks", "images", "masks"),
])
def test_salient_layouts_are_recognised_and_matched_by_stem(tmp_path, layout, img_dir, mask_dir):
    root = tmp_path / "ds"
    for stem in ("b", "a", "c"):
        _img(str(root / img_dir / f"{stem}.jpg"))
    for stem in ("a", "b"):  # c has no mask; d has no image
        _mask(str(root / mask_dir / f"{stem}.png"))
    _mask(str(root / mask_dir / "d.png"))
    assert detect_layout(str(root))[0] == layout
    data = open_eval_data(str(root))
    assert data.layout == layout and len(data) == 2 and data.unmatched == 1
    assert [os.path.basename(p) for p in data.image_paths] == ["a.jpg", "b.jpg"]
    assert [os.path.basename(p) for p in data.target_paths] == ["a.png", "b.png"]
    m = data.mask(0, 32)
    assert m.shape == (32, 32) and m.dtype == bool and 0 < m.mean() < 1
    x = data.batch([0, 1], 32, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (2, 3, 32, 32)
    # nested one level (ECSSD/ECSSD/images …)
    nested = tmp_path / "outer"
    nested.mkdir()
    os.rename(root, nested / "inner")
    assert open_eval_data(str(nested)).layout == layout


def test_label_map_layout_class_folders_and_errors(tmp_path):
    root = tmp_path / "seg"
    _img(str(root / "images" / "x" / "1.png"))
    lm = np.zeros((16, 20), np.uint8)
    lm[:8] = 2
    lm[8:, :4] = 255
    os.makedirs(root / "labels" / "x")
    Image.fromarray(lm).save(root / "labels" / "x" / "1.png")
    data = open_eval_data(str(root))
    assert data.layout == "images+labels" and data.has_label_maps and data.has_masks
    lab = data.label_map(0, 32)
    assert set(np.unique(lab)) == {0, 2, 255} and data.n_seg_classes(32) == 3

    cls = tmp_path / "cls"
    for c in ("cat", "dog"):
        for i in range(3):
            _img(str(cls / c / f"{i}.png"))
    data = open_eval_data(str(cls), n=4)
    assert data.layout == "class-folders" and data.class_names == ["cat", "dog"]
    assert sorted(data.labels.tolist()) == [0, 0, 1, 1]  # a balanced prefix

    empty = tmp_path / "nothing"
    (empty / "stuff").mkdir(parents=True)
    with pytest.raises(SoapError, match="no known layout"):
        open_eval_data(str(empty))
    with pytest.raises(SoapError, match="does not exist"):
        open_eval_data(str(tmp_path / "missing"))
    bad = tmp_path / "unmatched"
    _img(str(bad / "images" / "a.jpg"))
    _mask(str(bad / "masks" / "zzz.png"))
    with pytest.raises(SoapError, match="no image .* has a mask"):
        open_eval_data(str(bad))


def test_fashion_mnist_eval_data():
    data = open_eval_data("fashion-mnist", n=5)
    assert data.spec == "fashion-mnist:test" and len(data) == 5 and data.n_classes == 10
    m, lm = data.mask(0, 56), data.label_map(0, 56)
    assert m.any() and not m.all()
    np.testing.assert_array_equal(lm != 0, m)
    assert set(np.unique(lm)) == {0, int(data.labels[0]) + 1}


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory):
    """A SOAP artifact for a random tiny ViT at 64 px (4×4 grid), fitted on 40 Fashion-MNIST
    train images and 40 mixture-noise images."""
    from storehelp import tiny_vit_artifact

    return tiny_vit_artifact(str(tmp_path_factory.mktemp("art")), layer=5, image_size=64, n=40, chunk=16)


def _check_report(rep, evaluation, metrics, n):
    assert rep["schema"] == 1 and rep["evaluation"] == evaluation and rep["n_images"] == n
    assert set(rep["metrics"]) == set(metrics)
    for m in rep["metrics"].values():
        for side in ("raw", "soap"):
            assert 0 <= m[side]["value"] <= 1 and m[side]["ci95"][0] <= m[side]["value"] <= m[side]["ci95"][1]
        d = m["delta"]
        assert d["value"] == pytest.approx(m["soap"]["value"] - m["raw"]["value"])
        assert d["improved"] + d["worsened"] + d["unchanged"] == n
    assert rep["head"]["layer"] == 5 and rep["head"]["backbone"] == "vit_tiny_patch16_224"


def test_cli_salient_knn_seg_knn_cls_on_fashion_mnist(tiny_artifact, tmp_path):
    from soapflow.cli.main import app

    runner = CliRunner()
    cache = str(tmp_path / "cache")
    out = tmp_path / "sal.json"
    res = runner.invoke(app, ["eval", "salient", "--head", tiny_artifact, "--dataset", "fashion-mnist", "--n", "12",
                              "--refine", "--json", str(out), "--grid", str(tmp_path / "grid.png"), "--n-grid", "3",
                              "--cache-dir", cache, "--n-boot", "200", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(out.read_text())
    _check_report(rep, "salient", ["max_fbeta", "iou", "accuracy", "max_fbeta_refined", "iou_refined",
                                   "accuracy_refined"], 12)
    assert rep["config"]["tau"] == 0.2 and rep["config"]["refine"] == "fast bilateral solver"
    assert os.path.getsize(rep["grid_png"]) > 1000 and Image.open(rep["grid_png"]).size[0] > 300
    assert "max_fbeta" in res.output

    out = tmp_path / "seg.json"
    res = runner.invoke(app, ["eval", "knn-seg", "--head", tiny_artifact, "--n", "12", "--bank-n", "20",
                              "--json", str(out), "--cache-dir", cache, "--n-boot", "200", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    rep = json.loads(out.read_text())
    _check_report(rep, "knn-seg", ["miou", "accuracy"], 12)
    assert rep["config"]["n_classes"] == 11 and rep["config"]["bank"]["spec"] == "fashion-mnist:train"

    out = tmp_path / "cls.json"
    res = runner.invoke(app, ["eval", "knn-cls", "--head", tiny_artifact, "--n", "12", "--bank-n", "20",
                              "--json", str(out), "--cache-dir", cache, "--n-boot", "200", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    _check_report(json.loads(out.read_text()), "knn-cls", ["top1_mean", "top1_cls"], 12)

    # user errors name the bad input
    res = runner.invoke(app, ["eval", "salient", "--head", str(tmp_path / "nope"), "--n", "2"])
    assert isinstance(res.exception, SoapError) and "nope" in str(res.exception)
    res = runner.invoke(app, ["eval", "salient", "--head", tiny_artifact, "--foreground", "biggest"])
    assert isinstance(res.exception, SoapError) and "biggest" in str(res.exception)
    res = runner.invoke(app, ["eval", "knn-seg", "--head", tiny_artifact, "--dataset", str(tmp_path)])
    assert isinstance(res.exception, SoapError)
    res = runner.invoke(app, ["eval", "salient", "--head", tiny_artifact, "--n", "2", "--record"])
    assert isinstance(res.exception, SoapError) and "--record" in str(res.exception)


def test_soap_equals_raw_for_an_identity_projector(tiny_artifact):
    """With Pφ = I the two sides are the same computation: Δ = 0 exactly, nobody improves."""
    from soapflow.config import EvalSettings
    from soapflow.evaluation.run import load_context, run_knn_cls, run_salient

    ctx = load_context(tiny_artifact)
    ctx.head.weight.data = torch.eye(ctx.head.in_features)
    rep = run_salient(ctx, EvalSettings(dataset="fashion-mnist", n=8, n_boot=100), progress=False)
    for m in rep["metrics"].values():
        assert m["delta"]["value"] == 0 and m["delta"]["ci95"] == [0, 0] and m["delta"]["unchanged"] == 8
    rep = run_knn_cls(ctx, EvalSettings(dataset="fashion-mnist", n=8, bank_n=10, n_boot=100), progress=False)
    assert all(m["delta"]["value"] == 0 for m in rep["metrics"].values())


def test_head_backbone_mismatch_is_a_clear_error(tiny_artifact):
    from soapflow.evaluation.run import backbone_for_manifest

    with pytest.raises(SoapError, match="weights sha256"):
        backbone_for_manifest({"backbone": "vit_tiny_patch16_224", "layer": 1, "weights": "ab" * 32,
                               "image_size": 64}, weights="random")
    with pytest.raises(SoapError, match="no backbone"):
        backbone_for_manifest({"layer": 1})


def test_token_cache_and_class_tokens(tmp_path, monkeypatch):
    from soapflow.backbones import load_backbone
    from soapflow.evaluation import tokens as T

    bb = load_backbone("vit_tiny_patch16_224", weights="random", image_size=32)
    data = open_eval_data("fashion-mnist", n=6)
    mem = T.extract_tokens(bb, data, [2, 5], batch_size=4, with_cls=True, progress=False)
    ref = bb.tokens_multi(data.batch(range(6), 32, bb.mean, bb.std), [2, 5])
    for l in (2, 5):
        np.testing.assert_allclose(mem.tokens[l], ref[l].numpy(), atol=1e-6)
        assert mem.cls[l].shape == (6, bb.dim)
    first = T.extract_tokens(bb, data, [2, 5], batch_size=4, cache_dir=str(tmp_path), progress=False)
    calls = []
    monkeypatch.setattr(T, "forward_tokens", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    again = T.extract_tokens(bb, data, [5], batch_size=4, cache_dir=str(tmp_path), progress=False)
    assert calls == [] and again.key == first.key
    np.testing.assert_allclose(again.tokens[5], ref[5].numpy(), rtol=2e-3, atol=2e-3)  # float16 cache


def test_evaluate_flow_records_into_the_registry(tiny_artifact, tmp_path):
    from soapflow.flows.evaluate import evaluate
    from soapflow.config import EvalSettings
    from soapflow.storage.registry import Registry

    reg = Registry(str(tmp_path / "registry"))
    pub = reg.publish(tiny_artifact)
    result = evaluate(f"{pub.name}@latest", EvalSettings(evaluations=("salient", "knn-cls"), n=8, bank_n=12,
                                                         taus=(0.2, 0.3), n_boot=100),
                      registry=str(tmp_path / "registry"), out_dir=str(tmp_path / "out"))
    keys = set(result["reports"])
    assert keys == {"salient.fashion-mnist-test.tau0.2", "salient.fashion-mnist-test.tau0.3",
                    "knn-cls.fashion-mnist-test"}
    assert result["head"]["pinned"] == f"{pub.name}:{pub.version}"
    record = reg.record(f"{pub.name}:{pub.version}")
    assert keys <= set(record["evaluations"])
    stored = record["evaluations"]["salient.fashion-mnist-test.tau0.3"]
    assert stored["config"]["tau"] == 0.3 and set(stored["metrics"]["max_fbeta"]) >= {"raw", "soap", "delta"}
    assert (tmp_path / "out" / "salient-tau0.2.png").is_file()
    assert (tmp_path / "out" / "knn-cls.fashion-mnist-test.json").is_file()

    # an artifact directory is immutable: results come back (and as JSON) but are not recorded
    direct = evaluate(tiny_artifact, EvalSettings(evaluations=("knn-cls",), n=6, bank_n=8, n_boot=100),
                      out_dir=str(tmp_path / "out2"))
    assert direct["recorded"] is None and direct["head"]["from_registry"] is False
    assert (tmp_path / "out2" / "knn-cls.fashion-mnist-test.json").is_file()

    # the CLI records into the registry with --record
    from soapflow.cli.main import app

    res = CliRunner().invoke(app, ["eval", "knn-seg", "--head", f"{pub.name}:{pub.version}", "--registry",
                                   str(tmp_path / "registry"), "--n", "6", "--bank-n", "8", "--n-boot", "100",
                                   "--record", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "knn-seg.fashion-mnist-test" in reg.record(f"{pub.name}:{pub.version}")["evaluations"]
