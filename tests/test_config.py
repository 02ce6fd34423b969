"""Settings objects: validated once, defaults in one place, and valid Prefect flow parameters."""

import math

import pydantic
import pytest

from soapflow.config import (
    DEFAULT_MU, DEFAULT_TAU, DEFAULT_THRESHOLD, Auto, BackboneSpec, EvalSettings, FitParams, RefitConfig,
)
from soapflow.errors import SoapError


@pytest.mark.parametrize("kwargs, message", [
    (dict(mu=-1), "--mu must be ≥ 0 or 'auto', got -1"),
    (dict(mu=math.nan), "--mu must be ≥ 0"),
    (dict(mu=math.inf), "--mu must be ≥ 0"),
    (dict(mu=True), "--mu must be ≥ 0"),
    (dict(tau=0), "--tau must be > 0, got 0"),
    (dict(tau=math.nan), "--tau must be > 0"),
    (dict(gamma=-1), "--gamma must be > 0, got -1"),
    (dict(mu=Auto(0.5), threshold=0.6), "two thresholds"),
    (dict(suppress=[0.5]), "--suppress takes eigenvalue ranks"),
])
def test_fit_params_refuse_bad_values_with_one_line(kwargs, message):
    with pytest.raises(SoapError, match=message.replace("(", r"\(")):
        FitParams(**kwargs)


def test_fit_params_defaults_and_auto_threshold():
    p = FitParams()
    assert (p.mu, p.tau, p.threshold, p.auto, p.mu_label) == (DEFAULT_MU, DEFAULT_TAU, DEFAULT_THRESHOLD, False, 2.0)
    assert FitParams(mu=Auto()).mu == Auto(DEFAULT_THRESHOLD) and FitParams(mu=Auto()).mu_label == "auto"
    assert FitParams(mu=Auto(0.6)).threshold == 0.6 and FitParams(mu=Auto(), threshold=0.6).mu == Auto(0.6)
    assert FitParams.parse("auto") == FitParams(mu=Auto()) and FitParams.parse("3").mu == 3.0
    with pytest.raises(SoapError, match="--mu must be a number ≥ 0 or 'auto', got 'lots'"):
        FitParams.parse("lots")
    assert FitParams(suppress=[0, 3]).suppress == (0, 3)


def test_settings_travel_as_json_like_prefect_parameters():
    config = RefitConfig.from_flat({"backbone": "vit_tiny_patch16_224", "weights": "random", "layer": 5,
                                    "mu": "auto", "tau": 0.1, "chunk": 4, "registry": "/r", "evaluate_after": ["knn-cls"]})
    adapter = pydantic.TypeAdapter(RefitConfig)
    assert adapter.validate_python(adapter.dump_python(config, mode="json")) == config
    partial = adapter.validate_python({"backbone": {"device": "cpu"}, "fit": {"mu": {"threshold": 0.7}}})
    assert partial.backbone == BackboneSpec(device="cpu") and partial.fit == FitParams(mu=Auto(0.7))
    with pytest.raises(pydantic.ValidationError, match="--tau must be > 0"):
        adapter.validate_python({"fit": {"tau": -1}})
    with pytest.raises(SoapError, match=r"unknown settings \['colour'\]"):
        RefitConfig.from_flat({"colour": "red"})
    with pytest.raises(SoapError, match=r"unknown evaluation\(s\) \['segment'\]"):
        EvalSettings(evaluations=("segment",))


def test_flows_show_their_settings_as_parameters():
    from soapflow.flows.evaluate import evaluate
    from soapflow.flows.refit import refit

    schema = refit.parameters.model_dump()
    assert list(schema["properties"]) == ["config"]
    assert {"BackboneSpec", "FitParams", "DataSpec", "RunSettings", "OutputSettings"} <= set(schema["definitions"])
    assert "settings" in evaluate.parameters.model_dump()["properties"]
