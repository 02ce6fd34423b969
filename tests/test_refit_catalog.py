"""refit publishes to the registry; refit-catalog refits only what the registry lacks."""

import pytest

from soapflow.flows.refit_catalog import load_catalog, refit_catalog
from soapflow.config import RefitConfig
from soapflow.errors import SoapError
from soapflow.storage.registry import Registry

CATALOG = """
defaults:
  weights: random
  image_size: 32
  data: photos
  n_real: 8
  chunk: 4
entries:
  - backbone: vit_tiny_patch16_224
    layers: [-1, 5]
"""


def test_catalog_refits_only_new_entries(tmp_path):
    cat = tmp_path / "catalog.yaml"
    cat.write_text(CATALOG)
    reg, work = str(tmp_path / "reg"), str(tmp_path / "work")
    first = refit_catalog(str(cat), registry=reg, workdir=work)
    assert [r["status"] for r in first] == ["refitted", "refitted"]
    assert {r["ref"] for r in first} == {"vit_tiny_patch16_224/11:1", "vit_tiny_patch16_224/5:1"}
    record = Registry(reg).record("vit_tiny_patch16_224/11")
    assert record["manifest"]["lineage"]["flow_run_id"]

    second = refit_catalog(str(cat), registry=reg, workdir=work)
    assert [r["status"] for r in second] == ["up to date", "up to date"]
    assert [r["ref"] for r in second] == [r["ref"] for r in first]

    cat.write_text(CATALOG.replace("chunk: 4", "chunk: 4\n  mu: 3"))  # new parameters → new fit
    third = refit_catalog(str(cat), registry=reg, workdir=work, dry_run=True)
    assert [r["status"] for r in third] == ["would refit", "would refit"]
    assert Registry(reg).versions("vit_tiny_patch16_224/11") == [1]


def test_bad_catalogs_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    with pytest.raises(SoapError, match="does not exist"):
        load_catalog(str(bad))
    bad.write_text("entries: []")
    with pytest.raises(SoapError, match="non-empty list 'entries'"):
        load_catalog(str(bad))
    bad.write_text("entries:\n  - backbone: x\n    colour: red\n")
    with pytest.raises(SoapError, match=r"unknown keys \['colour'\]"):
        load_catalog(str(bad))
    bad.write_text("entries:\n  - layers: [1]\n")
    with pytest.raises(SoapError, match="entry 0 needs at least 'backbone'"):
        load_catalog(str(bad))


def test_refit_publishes_then_evaluates_into_the_record(tmp_path):
    from soapflow.flows.refit import refit

    reg = str(tmp_path / "reg")
    result = refit(RefitConfig.from_flat(dict(
        backbone="vit_tiny_patch16_224", weights="random", image_size=32, data="fashion-mnist:train", n_real=12,
        chunk=4, workdir=str(tmp_path / "work"), registry=reg, progress=False, evaluate_after=["knn-cls"],
        eval_n=20)))
    assert result["ref"] == "vit_tiny_patch16_224/11:1"
    evaluations = Registry(reg).record(result["ref"])["evaluations"]
    assert evaluations, "the evaluate flow should have written its results into the version's record"
    only = next(iter(evaluations.values()))
    assert {"raw", "soap", "delta"} <= set(json_keys(only))


def json_keys(doc):
    """Keys at any depth of a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield k
            yield from json_keys(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from json_keys(v)
