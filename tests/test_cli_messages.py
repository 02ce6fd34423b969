"""Quiet surprises of ``soap refit`` become messages (issue #19, item 6): fewer images than
``--n-real`` asks for, a fit on very few images, a fixed μ that suppresses components below the SI
threshold, and an artifact directory replaced by a later refit."""

from __future__ import annotations

import re

import pytest

from soapflow.storage.artifact import read_manifest
from tests.faults.helpers import make_images, soap

TINY = ["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "32", "--chunk", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("messages")
    folder = make_images(root / "images", 10)
    # threshold 0.99: no component of a random ViT reaches it, so what μ suppresses is below it
    common = [*TINY, "--data", folder, "--workdir", root / "work", "--registry", root / "registry",
              "--threshold", "0.99"]
    first = soap("refit", *common, "--n-real", 12, timeout=600)
    second = soap("refit", *common, "--mu", 1, timeout=600)
    third = soap("refit", *common, "--mu", "auto", timeout=600)  # μ = 0: suppresses nothing
    return folder, first, second, third, root


def _artifact(result) -> str:
    return re.search(r"^artifact: (\S+)", result.stdout, re.M).group(1)


def test_fewer_images_than_asked_for_is_said(runs):
    folder, first, _, _, _ = runs
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"note: --n-real 12: {folder} has only 10 usable images; using 10" in first.stdout, first.stdout


def test_a_fit_on_very_few_images_warns(runs):
    _, first, second, _, _ = runs
    for result in (first, second):
        assert "warning: fit on only 10 real and 10 synthetic images" in result.stdout, result.stdout


def test_fixed_mu_below_the_threshold_points_to_mu_auto(runs):
    _, first, second, third, root = runs
    from soapflow.storage.registry import Registry

    manifest = Registry(root / "registry").record("vit_tiny_patch16_224/11:1")["manifest"]  # the first refit's
    assert manifest["mu_mode"] == "fixed" and manifest["n_suppressed"] == 2
    line = next(line for line in first.stdout.splitlines() if line.startswith("warning: μ = 2"))
    assert "suppresses 2 component(s) with SI below the threshold 0.99" in line and "--mu auto" in line, line
    assert "warning: μ = 1 suppresses 1 component(s)" in second.stdout, second.stdout
    assert "warning: μ" not in third.stdout and "components suppressed: 0" in third.stdout  # auto: none above


def test_a_replaced_artifact_is_said_and_stays_in_the_registry(runs):
    _, first, second, third, _ = runs
    assert _artifact(first) == _artifact(second) == _artifact(third)  # one directory per backbone/layer
    assert "replaced" not in first.stdout  # nothing was there
    for result in (second, third):
        assert "replaced the previous artifact there, sha256 " in result.stdout, result.stdout
    assert read_manifest(_artifact(third))["mu_mode"] == "auto"
    # every version stays in the registry
    for k, result in enumerate((first, second, third), 1):
        assert f"registry: vit_tiny_patch16_224/11:{k}" in result.stdout, result.stdout
