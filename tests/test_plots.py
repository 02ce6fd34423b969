"""Plots and tables a person reads at a glance (issue 19, item 9), checked through matplotlib's
and rich's objects rather than pixels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from storehelp import positional_tokens, tiny_vit_artifact, write_store

MANIFEST = {"backbone": "dinov2_vits14", "layer": 11, "feature": "out", "n_real_images": 50,
            "n_synth_images": 40, "threshold": 0.75}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A real fit (stores on disk, the dask fit) of tokens with a positional pattern."""
    from soapflow.fit import fit_to_artifact
    from soapflow.storage.artifact import read_artifact

    root = tmp_path_factory.mktemp("plots")
    write_store(str(root / "real"), positional_tokens(40, h=6, w=7, d=48, seed=0), chunk=16)
    write_store(str(root / "synth"), positional_tokens(32, h=6, w=7, d=48, seed=5, position_strength=1.5), chunk=16)
    path, _, _ = fit_to_artifact(str(root / "real"), str(root / "synth"), str(root / "art"), progress=False)
    return read_artifact(path)


def _threshold_line(ax, threshold):
    lines = [ln for ln in ax.get_lines() if len(set(np.asarray(ln.get_ydata(), float))) == 1
             and np.asarray(ln.get_ydata(), float)[0] == threshold]
    assert lines, "no horizontal threshold line"
    return lines[0]


def _assert_si_figure(fig, scores, weights, threshold, manifest):
    from soapflow.plots import suppressed_mask

    axes = [ax for ax in fig.axes if ax.get_lines()]
    assert axes
    lo_all, hi_all = float(scores.min()), float(scores.max())
    for ax in axes:
        assert ax.get_xscale() == "linear"
        line = _threshold_line(ax, threshold)
        lo, hi = ax.get_ylim()
        margin = 0.02 * (hi - lo)
        assert lo + margin < threshold < hi - margin, (threshold, ax.get_ylim())  # inside, not on an edge
        assert line.get_visible() and line.get_linewidth() >= 1
    # the first axes show every score
    lo, hi = axes[0].get_ylim()
    assert lo < lo_all and hi > hi_all
    n_supp = int(suppressed_mask(scores, weights).sum())
    marked = [c for c in axes[0].collections if "suppressed" in str(c.get_label())]
    assert len(marked) == 1 and len(marked[0].get_offsets()) == n_supp
    np.testing.assert_allclose(np.sort(marked[0].get_offsets()[:, 1])[::-1],
                               np.sort(scores[suppressed_mask(scores, weights)])[::-1])
    title = fig._suptitle.get_text()
    assert manifest["backbone"] in title and f"layer {manifest['layer']}" in title
    assert f"n = {manifest['n_real_images']} real" in title


def test_si_plot_of_a_real_fit_reads_at_a_glance(fitted):
    from soapflow.plots import si_scores_figure

    t = fitted.tensors
    m = {**fitted.manifest, **{k: v for k, v in MANIFEST.items() if k in ("backbone", "layer")}}
    assert m["n_suppressed"] >= 1
    fig = si_scores_figure(t["scores"], t["weights"], m["threshold"], m)
    _assert_si_figure(fig, t["scores"], t["weights"], m["threshold"], m)


@pytest.mark.parametrize("top_score", [0.738, 0.75, 0.99])
def test_si_plot_threshold_is_visible_whatever_the_scores(top_score):
    """Block 11 of DINOv2-S has max SI 0.738 < 0.75: the threshold used to sit on the top edge."""
    from soapflow.method import suppression_weights
    from soapflow.plots import si_scores_figure

    rng = np.random.default_rng(0)
    scores = np.concatenate([[top_score], rng.uniform(0.3, top_score - 0.01, 383)])
    weights = suppression_weights(scores, 2.0, 0.05)
    fig = si_scores_figure(scores, weights, 0.75, MANIFEST)
    _assert_si_figure(fig, scores, weights, 0.75, MANIFEST)
    assert len(fig.axes) == 2  # 384 components: a zoom on the most invariant ones beside the full axis


def test_response_maps_show_p_q_difference_with_colorbars(fitted):
    from soapflow.plots import response_maps_figure, shown_components, suppressed_mask

    t, m = fitted.tensors, {**fitted.manifest, "backbone": "dinov2_vits14"}
    fig = response_maps_figure(t["p"], t["q"], t["scores"], t["weights"], m)
    comps = shown_components(t["scores"], t["weights"])
    supp = suppressed_mask(t["scores"], t["weights"])
    panels = [ax for ax in fig.axes if ax.get_images() and ax.get_label() != "<colorbar>"]
    assert len(panels) == 3 * len(comps)
    assert [ax.get_title() for ax in panels[:3]] == ["P: real images", "Q: synthetic images", "|P − Q|"]
    grid = np.array(panels).reshape(len(comps), 3)
    for row, d in enumerate(comps):
        p_img, q_img, d_img = (ax.get_images()[0].get_array() for ax in grid[row])
        np.testing.assert_allclose(p_img, t["p"][:, :, d])
        np.testing.assert_allclose(q_img, t["q"][:, :, d])
        np.testing.assert_allclose(d_img, np.abs(t["p"][:, :, d].astype(np.float64) - t["q"][:, :, d]), atol=1e-6)
        label = grid[row, 0].get_ylabel()
        assert label.startswith(f"rank {d}\n") and ("SUPPRESSED" in label) == bool(supp[d])
        red = grid[row, 1].spines["top"].get_edgecolor()
        assert (red[0] > 0.7 and red[1] < 0.3) == bool(supp[d])
    assert all(supp[d] for d in comps[: int(supp.sum())])  # every suppressed component is shown, first
    # colorbars: one for P and Q (0 to 1, the scale of every P and Q panel), one for |P − Q|
    images = [[ax.get_images()[0] for ax in row] for row in grid]
    bars = [im.colorbar for row in images for im in row if im.colorbar is not None]
    assert len(bars) == 2
    pq_bar = next(b for b in bars if b.mappable.get_cmap().name == "viridis")
    d_bar = next(b for b in bars if b is not pq_bar)
    assert pq_bar.mappable.get_clim() == (0, 1) and "fraction of images" in pq_bar.ax.get_ylabel()
    assert "|P − Q|" in d_bar.ax.get_ylabel()
    for row in images:
        assert all(im.get_clim() == (0, 1) and im.get_cmap().name == "viridis" for im in row[:2])
        assert row[2].get_clim() == d_bar.mappable.get_clim() and row[2].get_cmap().name == d_bar.mappable.get_cmap().name == "magma"
    title = fig._suptitle.get_text()
    assert "eigenvalue order" in title and "suppressed" in title and "dinov2_vits14" in title


def test_fit_writes_the_new_plots(fitted):
    """The artifact's PNGs are the figures above (the fit passes its manifest for the titles)."""
    from soapflow.plots import artifact_plots

    for rel, data in artifact_plots(fitted.tensors, fitted.manifest).items():
        on_disk = (fitted.path / rel).read_bytes()
        assert on_disk[:8] == b"\x89PNG\r\n\x1a\n"
        from PIL import Image

        with Image.open(io.BytesIO(on_disk)) as a, Image.open(io.BytesIO(data)) as b:
            assert a.size == b.size  # same layout (timestamps aside the bytes are equal too)


# ---------------------------------------------------------------------------------- eval tables


def _report(name="tiny/5", version=3, ref="tiny/5@latest"):
    from soapflow.evaluation.report import make_report
    from soapflow.evaluation.stats import paired_bootstrap_mean

    rng = np.random.default_rng(1)
    raw = (rng.uniform(size=80) < 0.5).astype(float)
    better = raw.copy()
    better[np.flatnonzero(raw == 0)[:20]] = 1  # 20 images improve, none worsen: CI excludes 0
    noisy = raw.copy()
    flip = rng.choice(80, 6, replace=False)
    noisy[flip] = 1 - noisy[flip]
    metrics = {"top1_mean": paired_bootstrap_mean(raw, better, n_boot=500, seed=0),
               "top1_cls": paired_bootstrap_mean(raw, noisy, n_boot=500, seed=0)}
    head = {"ref": ref, "name": name, "version": version, "backbone": "vit_tiny", "layer": 5}
    return make_report("knn-cls", metrics, head=head, dataset={"spec": "fashion-mnist:test"}, n_images=80,
                       config={"k": 20})


def test_eval_tables_mark_significance_unchanged_and_the_resolved_version():
    from rich.console import Console

    from soapflow.evaluation.report import markdown_table, print_report

    rep = _report()
    sig, not_sig = rep["metrics"]["top1_mean"]["delta"], rep["metrics"]["top1_cls"]["delta"]
    assert sig["significant"] and not not_sig["significant"]

    buf = io.StringIO()
    print_report(rep, Console(file=buf, width=250))
    text = buf.getvalue()
    assert "tiny/5@latest → tiny/5:3" in text
    assert "unchanged" in text and "* = the CI excludes 0" in text
    rows = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if ln.count("│") > 5}
    lo, hi = (f"{100 * x:+.2f}" for x in sig["ci95"])
    assert f"[{lo}, {hi}]*" in rows["top1_mean"]
    assert "]*" not in rows["top1_cls"]
    assert rows["top1_mean"].rstrip(" │").endswith(str(sig["unchanged"]))
    assert sig["unchanged"] == 60 and sig["improved"] == 20 and sig["worsened"] == 0

    md = markdown_table([rep])
    line = next(ln for ln in md.splitlines() if "top1_mean" in ln)
    assert line.startswith("| tiny/5:3 |") and f"[{lo}, {hi}]*" in line and "| 20 / 0 / 60 |" in line
    assert "]*" not in next(ln for ln in md.splitlines() if "top1_cls" in ln)
    assert "improved / worsened / unchanged" in md

    # an artifact directory (no registry version): the head is named by its path
    direct = _report(name=None, version=None, ref="/tmp/artifact")
    assert "| /tmp/artifact |" in markdown_table([direct])


def test_soap_eval_prints_the_version_the_alias_resolved_to(tmp_path):
    """Through the CLI: --head NAME@latest on a registry says which version was evaluated."""
    from soapflow.cli.main import app
    from soapflow.storage.registry import Registry

    path = tiny_vit_artifact(str(tmp_path), layer=2, image_size=32, n=16, chunk=8)
    reg = Registry(str(tmp_path / "registry"))
    pub = reg.publish(path, name="tiny/2")
    out = tmp_path / "cls.json"
    res = CliRunner().invoke(app, ["eval", "knn-cls", "--head", "tiny/2@latest", "--registry",
                                   str(tmp_path / "registry"), "--n", "10", "--bank-n", "12", "--n-boot", "100",
                                   "--json", str(out), "--quiet"], terminal_width=250)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert f"tiny/2@latest → tiny/2:{pub.version}" in res.output
    assert "unchanged" in res.output
    rep = json.loads(out.read_text())
    for metric, m in rep["metrics"].items():
        line = next(ln for ln in res.output.splitlines() if ln.startswith(f"│ {metric} "))
        assert line.rstrip(" │").endswith(str(m["delta"]["unchanged"]))
        assert ("]*" in line) == m["delta"]["significant"]
