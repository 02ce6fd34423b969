"""The environment a user sets, and the README's "Run history: Prefect's UI" recipe run against a
real Prefect server: a one-off `soap refit` leaves its history in $PREFECT_HOME, `prefect server
start` shows it, and with PREFECT_API_URL exported later runs, their artifacts and prefect.yaml's
deployments are visible through the server's API (what its UI shows)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prefect_server import PrefectServer

REPO = Path(__file__).resolve().parents[1]
ENV_VARS = ("SOAPFLOW_WORKDIR", "SOAPFLOW_CACHE", "SOAPFLOW_REGISTRY", "SOAPFLOW_STORAGE_OPTIONS")
# the README's `soap refit`, on a random tiny ViT and a few photos so that the test takes seconds
TINY = ["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "32", "--data", "photos",
        "--chunk", "4", "--device", "cpu"]
# Prefect keeps link artifacts as markdown "[text](url)"
LINKS = ("soap-artifact", "soap-real-store", "soap-synthetic-store", "soap-report")
REFIT_ARTIFACTS = {"soap-top-si-scores": "table", "soap-refit-summary": "markdown", **dict.fromkeys(LINKS, "markdown")}


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"^#+ {re.escape(title)}\n(.*?)(?=^#+ )", text, re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def readme_recipe() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", readme_section("Run history: Prefect's UI"), re.S)
    assert block, "the run-history section has no bash block"
    return [ln.split("#")[0].strip() for ln in block.group(1).splitlines() if ln.split("#")[0].strip()]


def test_environment_is_documented_in_readme_and_help():
    from soapflow.cli.main import app

    section = readme_section("Environment")
    res = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert res.exit_code == 0
    for var in ENV_VARS:
        assert f"`{var}`" in section, var
        assert var in res.output, var
    assert "~/.prefect" in res.output and "prefect server start" in res.output and "PREFECT_API_URL" in res.output
    # the defaults the README states are the ones the code uses
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SOAPFLOW_", "XDG_"))}
    code = ("from flows.refit import default_workdir; from storage.registry import default_registry_root;"
            "from soapflow.consume import cache_root; print(default_workdir(), cache_root(), default_registry_root())")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    home = os.path.expanduser("~")
    workdir, cache, registry = out.stdout.split()
    for path, row_var in ((workdir, "SOAPFLOW_WORKDIR"), (cache, "SOAPFLOW_CACHE"), (registry, "SOAPFLOW_REGISTRY")):
        row = next(ln for ln in section.splitlines() if ln.startswith(f"| `{row_var}`"))
        assert f"`{path.replace(home, '~')}`" in row, (row_var, path)


def _refit(env: dict, *extra: str) -> str:
    res = subprocess.run([sys.executable, "-m", "soapflow.cli", "refit", *TINY, *extra], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res.stdout


def _refit_runs(server: PrefectServer) -> list[dict]:
    return server.http.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["refit"]}},
                                                         "sort": "START_TIME_ASC"}).raise_for_status().json()


def _check_artifacts(server: PrefectServer, run_id: str) -> dict:
    arts = server.http.post("/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run_id]}}}).raise_for_status().json()
    kinds = {a["key"]: a["type"] for a in arts}
    assert {k: kinds.get(k) for k in REFIT_ARTIFACTS} == REFIT_ARTIFACTS, kinds
    by_key = {a["key"]: a for a in arts}
    links = {k: re.fullmatch(r"\[[^]]+\]\((file://[^)]+)\)", by_key[k]["data"]) for k in LINKS}
    assert all(links.values()), {k: by_key[k]["data"] for k in LINKS}
    for key, m in links.items():
        assert Path(m.group(1)[len("file://"):]).exists(), (key, m.group(1))
    report = Path(links["soap-report"].group(1)[len("file://"):])
    assert report.is_file() and "<title>SOAP report" in report.read_text()
    assert str(report) in by_key["soap-refit-summary"]["data"]
    return by_key


@pytest.mark.timeout(600)
def test_readme_run_history_recipe_on_a_real_server(tmp_path):
    recipe = readme_recipe()
    assert recipe == ["prefect server start", "export PREFECT_API_URL=http://127.0.0.1:4200/api", "soap refit",
                      "prefect --no-prompt deploy --all"], recipe
    home = tmp_path / "prefect-home"  # stands for ~/.prefect
    soap_env = {"SOAPFLOW_WORKDIR": str(tmp_path / "work"), "SOAPFLOW_REGISTRY": str(tmp_path / "registry"),
                "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    one_off = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    one_off.update(soap_env, PREFECT_HOME=str(home))

    # a one-off run (no PREFECT_API_URL): its temporary server writes into $PREFECT_HOME
    out = _refit(one_off, "--n-real", "8")
    assert (home / "prefect.db").is_file()
    first_report = re.search(r"^report:\s+(\S+)", out, re.M).group(1)

    # `prefect server start` on the same home shows that run and its artifacts
    server = PrefectServer(home, cwd=REPO, extra_env={**soap_env,
                                                      "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
                                                      "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false"})
    try:
        server.start(timeout=120)
        [run] = _refit_runs(server)
        assert run["state"]["type"] == "COMPLETED"
        arts = _check_artifacts(server, run["id"])
        assert first_report in arts["soap-report"]["data"]

        # `export PREFECT_API_URL=…`: the next run reports to this server, under the same names
        assert server.env["PREFECT_API_URL"] == recipe[1].split("=", 1)[1].replace("4200", str(server.port))
        _refit(server.env, "--n-real", "6")
        runs = _refit_runs(server)
        assert len(runs) == 2 and runs[1]["state"]["type"] == "COMPLETED"
        _check_artifacts(server, runs[1]["id"])
        from soapflow.storage.registry import Registry

        reg = Registry(str(tmp_path / "registry"))
        [name] = reg.names()
        assert reg.versions(name) == [1, 2]
        assert reg.record(f"{name}:2")["lineage"]["flow_run_id"] == runs[1]["id"]

        # the deployments of prefect.yaml, after the one-time work-pool set-up its header gives
        for pool in ("soapflow-gpu", "soapflow-cpu"):
            server.cli("work-pool", "create", pool, "--type", "process")
        server.cli(*recipe[3].split()[1:], timeout=240)
        deps = {d["name"] for d in server.http.post("/deployments/filter", json={}).raise_for_status().json()}
        expected = {d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
        assert deps == expected
    finally:
        reports = server.stop(timeout=30)
    for rep in reports:
        assert rep["clean"] and not rep["leftover"], rep
