"""``soap registry report NAME:V --out report.html``: one self-contained page per version,
rendered in a real headless Chromium (every image loads, every table is there)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from browser import inspect_page, screenshot
from storehelp import positional_tokens, write_store

NAME = "tiny-vit/3"


def _evaluation_report(name: str, version: int, seed: int) -> dict:
    """A real schema-1 report from the paired bootstrap: one metric that clearly improves, one that does not move."""
    from soapflow.evaluation.report import make_report
    from soapflow.evaluation.stats import paired_bootstrap_mean

    rng = np.random.default_rng(seed)
    raw = rng.uniform(0.3, 0.7, 60)
    metrics = {"miou": paired_bootstrap_mean(raw, raw + 0.05 + rng.normal(0, 0.01, 60), n_boot=200, seed=0),
               "accuracy": paired_bootstrap_mean(raw, raw + rng.normal(0, 0.05, 60), n_boot=200, seed=0)}
    return make_report("knn-seg", metrics, head={"ref": f"{name}@latest", "name": name, "version": version,
                                                  "backbone": "test-vit", "layer": 3},
                       dataset={"spec": "fashion-mnist:test"}, n_images=60, config={"k": 10})


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Two published versions of one name, fitted from real stores; v2 has a recorded evaluation."""
    from soapflow.config import FitParams
    from soapflow.fit import fit_to_artifact
    from soapflow.storage.registry import Registry

    root = tmp_path_factory.mktemp("report")
    write_store(str(root / "synth"), positional_tokens(24, seed=9, position_strength=1.5), chunk=8)
    reg = Registry(str(root / "registry"))
    for i, mu in enumerate((2.0, "auto")):
        write_store(str(root / f"real{i}"), positional_tokens(24 + 8 * i, seed=i), chunk=8)
        path, _, _ = fit_to_artifact(str(root / f"real{i}"), str(root / "synth"), str(root / f"art{i}"),
                                     FitParams.parse(mu), progress=False)
        reg.publish(path, name=NAME, lineage={"flow_run_name": f"run-{i}"})
    reg.record_evaluation(f"{NAME}:2", {"knn-seg.fashion-mnist-test": _evaluation_report(NAME, 2, 0)})
    return root, reg


def test_registry_report_renders_in_chromium(registry, tmp_path):
    root, reg = registry
    out = tmp_path / "report.html"
    res = subprocess.run([sys.executable, "-m", "soapflow.cli", "registry", "report", f"{NAME}@latest", "--out",
                          str(out), "--registry", str(root / "registry")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{NAME}:2" in res.stdout and str(out) in res.stdout

    page = out.read_text()
    seen = inspect_page(out, tmp_path)
    assert seen["external"] == [], "the page must not load anything from outside itself"
    assert [i["alt"] for i in seen["images"]] == ["SI scores", "response maps"]
    for img in seen["images"]:
        assert img["complete"] and img["naturalWidth"] > 300 and img["naturalHeight"] > 100, img
    tables = {t["id"]: t["rows"] for t in seen["tables"]}
    for tid in ("summary-table", "components-table", "evaluations-table", "diff-table", "manifest-table",
                "lineage-table"):
        assert tables.get(tid, 0) > 1, (tid, tables)
    assert seen["title"] == f"SOAP report — {NAME}:2"

    # the content: evaluations with CIs and the significance marker, the diff against v1, the lineage
    rep = reg.record(f"{NAME}:2")["evaluations"]["knn-seg.fashion-mnist-test"]
    miou = rep["metrics"]["miou"]["delta"]
    assert miou["significant"]
    lo, hi = (f"{100 * x:+.2f}" for x in miou["ci95"])
    assert f"[{lo}, {hi}]*" in page
    acc = rep["metrics"]["accuracy"]["delta"]
    assert not acc["significant"] and f"{100 * acc['ci95'][1]:+.2f}]</td>" in page.replace("\n", "")
    assert f"{NAME}:1 → {NAME}:2" in page
    diff = reg.diff(f"{NAME}:1", f"{NAME}:2")
    assert f"{diff['projector_frobenius']:.6g}" in page
    assert "run-1" in page and reg.content_hash(f"{NAME}:2") in page
    assert reg.record(f"{NAME}:2")["lineage"]["stores"]["real"]["uri"] in page

    png = screenshot(out, tmp_path / "report.png")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size == (1280, 3000)
        # not a blank page: the plots put many distinct colours on it
        assert len(im.convert("RGB").getcolors(1 << 20) or []) > 50
    print(f"screenshot: {png}")


def test_first_version_has_no_diff_and_errors_are_one_line(registry, tmp_path):
    from soapflow.storage.html_report import version_report

    root, reg = registry
    page = version_report(reg, f"{NAME}:1")
    assert 'id="no-diff"' in page and 'id="no-evaluations"' in page
    # every image is inline PNG
    srcs = re.findall(r'<img[^>]* src="([^"]+)"', page)
    assert len(srcs) == 2 and all(s.startswith("data:image/png;base64,") for s in srcs)

    res = subprocess.run([sys.executable, "-m", "soapflow.cli", "registry", "report", f"{NAME}:9", "--out",
                          str(tmp_path / "r.html"), "--registry", str(root / "registry")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and f"{NAME}:9 does not exist" in res.stderr
    assert not (tmp_path / "r.html").exists()
