"""One set of option definitions across the ``soap`` commands (issue #19, item 4): every option has
help text, the shared options have the same names and defaults everywhere, the defaults agree with
the flows' and functions' own, help has no stray ``<bool>``, and ``soap --version`` works."""

from __future__ import annotations

import inspect
import subprocess

import pytest
import typer
from typer.testing import CliRunner

from soapflow import defaults
from soapflow.errors import SoapError
from soapflow.cli.main import app
from tests.faults.helpers import ENV, REPO, soap_cmd

ROOT = typer.main.get_command(app)


def _commands(group=ROOT, path=()):
    for name, cmd in sorted(group.commands.items()):
        if hasattr(cmd, "commands"):  # a group
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


COMMANDS = dict(_commands())


def _is_option(p) -> bool:
    return p.param_type_name == "option"  # (typer vendors its own click)


def _option(cmd, flag):
    for p in cmd.params:
        if _is_option(p) and flag in p.opts:
            return p
    return None


def test_the_command_set_is_what_this_test_walks():
    names = {" ".join(k) for k in COMMANDS}
    assert {"extract", "refit", "scan", "fit", "eval salient", "eval knn-seg", "eval knn-cls", "registry list",
            "registry publish", "noise preview"} <= names, names


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_every_option_has_help_text_and_help_has_no_bool_placeholder(path):
    cmd = COMMANDS[path]
    for p in cmd.params:
        if _is_option(p) and not p.hidden:
            assert p.help and p.help.strip(), f"soap {' '.join(path)} {p.opts[0]} has no help text"
        if p.param_type_name == "argument":
            assert getattr(p, "help", None), f"soap {' '.join(path)} argument {p.name} has no help text"
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output, result.output
    for p in cmd.params:
        if _is_option(p) and not p.hidden:
            assert p.opts[0] in result.output


DEVICE_COMMANDS = ["extract", "refit", "scan", "fit", "eval salient", "eval knn-seg", "eval knn-cls", "eval planted"]


@pytest.mark.parametrize("name", DEVICE_COMMANDS)
def test_device_defaults_to_cuda_if_available_everywhere_and_help_says_so(name):
    opt = _option(COMMANDS[tuple(name.split())], "--device")
    assert opt is not None and opt.default is None, name  # resolved at run time
    result = CliRunner().invoke(app, [*name.split(), "--help"], terminal_width=200)
    assert "cuda if available, else cpu" in result.output


def test_shared_options_have_one_name_and_one_default():
    refit, scan, extract = COMMANDS[("refit",)], COMMANDS[("scan",)], COMMANDS[("extract",)]
    for flag in ("--workdir", "--n-real", "--n-synth", "--generator", "--data", "--backbone", "--weights", "--final-norm",
                 "--mu", "--tau", "--gamma", "--threshold", "--feature", "--image-size", "--device"):
        a, b = _option(refit, flag), _option(scan, flag)
        assert a is not None and b is not None, flag
        if flag != "--workdir":  # scan keeps its stores only when asked
            assert a.default == b.default, (flag, a.default, b.default)
            assert a.help == b.help, flag
    assert _option(refit, "--data").default == _option(scan, "--data").default == defaults.DEFAULT_DATA
    assert _option(extract, "--backbone").default == _option(refit, "--backbone").default
    for name, cmd in COMMANDS.items():  # the old spelling is gone from every visible option
        for p in cmd.params:
            if _is_option(p) and not p.hidden:
                assert "--work-dir" not in p.opts and "--synth-n" not in p.opts, (name, p.opts)


def test_registry_and_storage_options_wherever_a_registry_or_store_uri_is_taken():
    for name, cmd in COMMANDS.items():
        if name[0] == "registry" or name == ("refit",) or _option(cmd, "--head") is not None:
            assert _option(cmd, "--registry") is not None, name
            assert _option(cmd, "--storage-option") is not None, name
    for name in (("extract",), ("fit",)):  # store URIs
        assert _option(COMMANDS[name], "--storage-option") is not None, name


def test_defaults_agree_with_the_flows_and_functions():
    from soapflow.flows.refit import refit as refit_flow
    from soapflow.backbones import DEFAULT_BACKBONE
    from soapflow.extract import DEFAULT_CHUNK, default_chunk
    from soapflow.fit import fit_to_artifact

    config = inspect.signature(refit_flow.fn).parameters["config"].default  # a RefitConfig
    refit = COMMANDS[("refit",)]
    for flag, value in (("--backbone", config.backbone.name), ("--data", config.data.real),
                        ("--generator", config.data.generator), ("--tau", config.fit.tau),
                        ("--gamma", config.fit.gamma), ("--threshold", config.fit.threshold),
                        ("--chunk", config.run.chunk), ("--layer", config.backbone.layer),
                        ("--feature", config.backbone.feature), ("--seed", config.data.seed)):
        assert _option(refit, flag).default == value, flag
    assert float(_option(refit, "--mu").default) == config.fit.mu
    fit = inspect.signature(fit_to_artifact).parameters["params"].default  # a FitParams
    for flag in ("tau", "gamma", "threshold"):
        assert _option(COMMANDS[("fit",)], f"--{flag}").default == getattr(fit, flag)
    assert float(_option(COMMANDS[("fit",)], "--mu").default) == fit.mu
    assert DEFAULT_BACKBONE == defaults.DEFAULT_BACKBONE and _option(refit, "--chunk").default is None
    # --chunk: by device (soapflow.extract.default_chunk), in the flow as in the command
    assert config.run.chunk is None
    assert default_chunk("cpu") == DEFAULT_CHUNK
    from soapflow.backbones import FINAL_NORM
    from soapflow.preflight import FINAL_NORM_CHOICES

    assert FINAL_NORM_CHOICES == FINAL_NORM and _option(refit, "--final-norm").default == config.backbone.final_norm


def test_scan_keeps_the_old_names_working_as_hidden_aliases():
    for old, new in (("--n", "--n-real"), ("--synth-n", "--n-synth")):
        result = CliRunner().invoke(app, ["scan", old, "0"])
        assert isinstance(result.exception, SoapError), result.output  # (the `soap` script: exit code 2)
        assert f"{new} must be ≥ 1, got 0" in str(result.exception), result.exception


def test_version():
    from soapflow import __version__

    result = subprocess.run(soap_cmd("--version"), capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"soapflow {__version__}", result
