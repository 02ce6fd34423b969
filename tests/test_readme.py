"""The README's and prefect.yaml's commands run as written (issue #19, item 8).

* The ``soap`` commands of the README's code blocks run fully, in order, in an empty folder (a
  private registry, work directory and cache), as real ``soap`` processes forked by
  ``tests.faults.clidriver`` — except the long ones (``LONG``: a whole refit, a 12-block scan),
  which are parsed (and, for refit and scan, input-checked as the command would:
  ``soapflow.preflight``). Then the
  README's Python block runs in the same folder.
* Inline ``soap`` commands are parsed; ``make`` targets run as ``make -n``; benchmark scripts with
  ``--help``; shell scripts with ``bash -n``.
* ``prefect`` commands (README and the comments of prefect.yaml) are parsed by Prefect's own CLI
  parser; ``prefect deployment run NAME -p k=v`` parameters are checked against the deployment's
  flow (its signature and its input checks), as are the parameters prefect.yaml sets.
* The README links nothing outside the repository.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.faults.helpers import ENV, REPO

README = (REPO / "README.md").read_text()
PREFECT_YAML = REPO / "prefect.yaml"
COMMAND_WORDS = ("soap", "make", "prefect", "python", "bash")
LONG = ("soap refit", "soap scan", "soap eval planted")  # parsed (refit, scan: and input-checked), not run


def _code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of fenced blocks and of 4-space indented blocks."""
    blocks, fenced = [], re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
    for m in fenced.finditer(text):
        blocks.append((m.group(1), m.group(2)))
    rest = fenced.sub("", text)
    for m in re.finditer(r"(?:^(?: {4}.*)?\n)+", rest, re.M):
        body = "\n".join(line[4:] for line in m.group(0).splitlines() if line.startswith("    "))
        if body.strip():
            blocks.append(("", body))
    return blocks


def _words(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _is_template(line: str) -> bool:
    return any(c in line for c in "…<|[") or any(w.isupper() and w.isalpha() for w in line.split())


def readme_block_commands() -> list[str]:
    out = []
    for lang, body in _code_blocks(README):
        if lang in ("", "bash", "sh", "console"):
            for line in body.splitlines():
                words = line.split()
                if words and words[0] in COMMAND_WORDS:
                    out.append(line)
    return out


def readme_inline_commands() -> list[str]:
    spans = {m.group(1) for m in re.finditer(r"`([^`\n]+)`", README)}
    return sorted(s for s in spans if s.split()[0] in COMMAND_WORDS and not _is_template(s))


def prefect_yaml_commands() -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^\s*#\s+(prefect .*)$", PREFECT_YAML.read_text(), re.M)]


# ----------------------------------------------------------------------------- parsing


def _soap_command(words: list[str]):
    """(click command, its path, the rest of the words) for ``soap ...`` words."""
    import typer

    from soapflow.cli.main import app

    cmd, path, rest = typer.main.get_command(app), [], list(words[1:])
    while hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    return cmd, path, rest


def parse_soap(words: list[str], *, partial: bool = False) -> tuple[list[str], dict]:
    """Parse like the ``soap`` script (no command runs); returns (command path, parameters).
    ``partial``: a fragment that names only some options (required ones may be missing)."""
    cmd, path, rest = _soap_command(words)
    if not path and rest in (["--version"], ["--help"]):
        return path, {}
    assert not hasattr(cmd, "commands"), f"{' '.join(words)}: no such command"
    try:
        ctx = cmd.make_context(" ".join(["soap", *path]), rest)
    except Exception as exc:
        if partial and type(exc).__name__ == "MissingParameter":
            return path, {}
        raise AssertionError(f"{' '.join(words)}: {type(exc).__name__}: {exc}") from exc
    return path, ctx.params


def check_soap_inputs(path: list[str], params: dict) -> None:
    """What ``soap refit`` / ``soap scan`` check before they start any work (soapflow.preflight)."""
    from soapflow import preflight
    from soapflow.cli.options import parse_mu

    mu = parse_mu(params["mu"])
    preflight.check_cheap(data=params["data"], weights=params["weights"], image_size=params["image_size"],
                          fit=(mu, params["tau"], params["gamma"], params["threshold"]),
                          counts={"--n-real": params["n_real"], "--n-synth": params["n_synth"]})
    preflight.check_bundled_weights(params["backbone"], params["weights"])


def _flow_for_deployment(name: str):
    """The flow function a ``FLOW/DEPLOYMENT`` name of prefect.yaml runs."""
    import importlib

    flow_name, _, dep_name = name.partition("/")
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    dep = next((d for d in deployments if d["name"] == dep_name), None)
    assert dep is not None, f"prefect.yaml has no deployment {dep_name!r}"
    module, func = dep["entrypoint"].split(":")
    flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
    assert flow.name == flow_name, (name, flow.name)
    return flow, dep


def check_flow_parameters(flow, params: dict) -> None:
    """Parameters exist in the flow's signature and pass its input checks."""
    import inspect

    signature = inspect.signature(flow.fn)
    unknown = set(params) - set(signature.parameters)
    assert not unknown, f"{flow.name}: no parameter(s) {sorted(unknown)}"
    bound = {k: v.default for k, v in signature.parameters.items()}
    bound.update(params)
    if flow.name == "refit":
        import pydantic

        from soapflow.flows.refit import check_parameters
        from soapflow import preflight
        from soapflow.config import RefitConfig

        config = pydantic.TypeAdapter(RefitConfig).validate_python(bound["config"])  # as Prefect validates it
        check_parameters(config)
        preflight.check_bundled_weights(config.backbone.name, config.backbone.weights)


def _prefect_value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_prefect(line: str) -> None:
    from prefect.cli._app import _app

    words = _words(line)[1:]
    while words and words[0] in ("--no-prompt", "--prompt"):
        words.pop(0)
    command, bound, _ = _app.parse_args(words)
    args = dict(bound.arguments)
    if words[:2] == ["deployment", "run"]:
        flow, _ = _flow_for_deployment(args["name"])
        params = {k: _prefect_value(v) for k, v in (p.split("=", 1) for p in args.get("params") or ())}
        params.update(json.loads(args["multiparams"]) if args.get("multiparams") else {})  # --params '{...}'
        check_flow_parameters(flow, params)


# ----------------------------------------------------------------------------- tests


def test_the_readme_links_nothing_outside_the_repository():
    assert "../" not in README and "shared/SPEC" not in README
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if "://" not in target:
            assert (REPO / target).exists(), target


def test_there_are_commands_to_check():
    block = readme_block_commands()
    assert any(c.startswith("soap extract") for c in block) and any(c.startswith("soap fit") for c in block)
    assert any(c.startswith("prefect deployment run refit/refit") for c in prefect_yaml_commands())
    for line in block:  # commands in code blocks are literal: nothing to fill in
        assert not _is_template(line.split("#")[0]), line


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory):
    """Every README code-block ``soap`` command, in order, in one empty folder."""
    root = tmp_path_factory.mktemp("readme")
    env = {**ENV, "SOAPFLOW_REGISTRY": str(root / "_registry"), "SOAPFLOW_WORKDIR": str(root / "_work"),
           "SOAPFLOW_CACHE": str(root / "_cache")}
    runnable = [c for c in readme_block_commands() if c.startswith("soap ") and not c.startswith(LONG)]
    cases = [{"id": c, "argv": _words(c)[1:]} for c in runnable]
    done = subprocess.run([sys.executable, "-m", "tests.faults.clidriver"], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, cwd=root, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    return root, env, json.loads(done.stdout)


def test_readme_soap_commands_run_as_written(walkthrough):
    _, _, results = walkthrough
    assert len(results) >= 10
    for r in results:
        assert r["returncode"] == 0, (r["id"], r["stdout"][-2000:], r["stderr"][-3000:])
        assert "Traceback" not in r["stderr"], (r["id"], r["stderr"][-3000:])


def test_readme_python_block_runs(walkthrough):
    root, env, _ = walkthrough
    (python,) = [body for lang, body in _code_blocks(README) if lang == "python"]
    result = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, env=env, cwd=root,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_long_readme_soap_commands_parse_and_pass_their_input_checks():
    long = [c for c in readme_block_commands() if c.startswith(LONG)]
    assert long
    for line in long:
        path, params = parse_soap(_words(line))
        if path in (["refit"], ["scan"]):
            check_soap_inputs(path, params)


def test_inline_readme_commands_parse():
    for line in readme_inline_commands():
        words = _words(line)
        if words[0] == "soap":
            parse_soap(words, partial=True)


def test_readme_make_targets_exist():
    targets = {tuple(_words(c)[1:]) for c in readme_block_commands() + readme_inline_commands() if c.startswith("make ")}
    assert targets
    for target in targets:
        result = subprocess.run(["make", "-n", *target], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert result.returncode == 0, (target, result.stderr)


def test_readme_scripts_start():
    lines = [c for c in readme_block_commands() + readme_inline_commands() if c.split()[0] in ("python", "bash")]
    assert lines
    procs = []
    for line in sorted(set(lines)):
        words = _words(line)
        cmd = [sys.executable, words[1], "--help"] if words[0] == "python" else ["bash", "-n", words[1]]
        assert (REPO / words[1]).is_file(), line
        procs.append((line, subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)))
    for line, proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (line, err[-2000:])


def test_prefect_commands_parse_and_their_parameters_fit_the_flows():
    lines = prefect_yaml_commands() + [c for c in readme_block_commands() + readme_inline_commands()
                                       if c.startswith("prefect ")]
    assert len(lines) >= 5
    for line in lines:
        parse_prefect(line)


def test_prefect_yaml_deployment_parameters_fit_their_flows():
    for dep in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]:
        module, func = dep["entrypoint"].split(":")
        import importlib

        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
        check_flow_parameters(flow, {k: v for k, v in (dep.get("parameters") or {}).items()})
        if dep["name"] == "refit-nightly":
            assert (REPO / dep["parameters"]["catalog"]).is_file()


def test_the_check_catches_the_old_prefect_yaml_example():
    """The example prefect.yaml used to give: a timm name without bundled weights."""
    from soapflow.errors import SoapError

    with pytest.raises(SoapError, match="--weights PATH"):
        parse_prefect("prefect deployment run refit/refit --params "
                      "'{\"config\": {\"backbone\": {\"name\": \"vit_small_patch14_dinov2\"}, \"data\": {\"real\": \"photos\"}}}'")
    with pytest.raises(SoapError, match="--data /data/photos"):
        parse_prefect("prefect deployment run refit/refit --params '{\"config\": {\"data\": {\"real\": \"/data/photos\"}}}'")
