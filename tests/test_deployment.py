"""prefect.yaml end to end, with real components: a Prefect server (SQLite on 127.0.0.1), the work
pools, ``prefect --no-prompt deploy --all``, a process worker, and the ``refit`` deployment run with
tiny parameters (random tiny ViT, a dozen photos). The worker and server are stopped like Ctrl-C
(SIGINT, wait, then kill) and no process may outlive them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from prefect_server import PREFECT, PrefectServer
from soapflow.storage.artifact import read_artifact

REPO = Path(__file__).resolve().parents[1]
POOL = "soapflow-gpu"  # the pool of the `refit` deployment, as users deploy it

TINY = {  # a RefitConfig as JSON (soapflow/config.py)
    "backbone": {"name": "vit_tiny_patch16_224", "weights": "random", "image_size": 64,
                 "device": "cpu"},  # deterministic in CI even where a GPU is visible
    "data": {"real": "photos", "n_real": 12},
    "run": {"chunk": 4, "progress": False},
}


def _prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_prefect_yaml_deployments():
    """The deployments users get: refit on demand on the GPU pool, a nightly cron refit, pinned devices."""
    spec = _prefect_yaml()
    deps = {d["name"]: d for d in spec["deployments"]}
    assert {"refit", "refit-nightly"} <= set(deps)
    for dep in deps.values():
        path, func = dep["entrypoint"].split(":")
        assert (REPO / path).is_file(), f"{dep['name']}: entrypoint {path} does not exist"
        pool = dep["work_pool"]
        assert pool["name"] in {"soapflow-gpu", "soapflow-cpu"}
        assert "CUDA_VISIBLE_DEVICES" in pool["job_variables"]["env"]
    assert deps["refit"]["work_pool"]["name"] == POOL
    assert deps["refit"]["work_pool"]["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
    [nightly] = deps["refit-nightly"]["schedules"]
    assert nightly["cron"] and nightly["timezone"]
    assert deps["refit-nightly"]["entrypoint"] == "flows/refit_catalog.py:refit_catalog"
    assert deps["refit-nightly"]["parameters"]["catalog"] == "catalog.yaml"
    from soapflow.flows.refit_catalog import load_catalog

    assert load_catalog(str(REPO / "catalog.yaml"))  # the shipped catalog parses
    [pull] = spec["pull"]
    assert "prefect.deployments.steps.set_working_directory" in pull


@pytest.mark.timeout(420)
def test_refit_deployment_on_a_real_server(tmp_path):
    t0 = time.monotonic()
    work = tmp_path / "work"
    out = tmp_path / "artifact"
    server = PrefectServer(tmp_path / "prefect-home", cwd=REPO, extra_env={
        "SOAPFLOW_WORKDIR": str(work),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "5",
        # Nothing scheduled may reach the worker during the test (refit-nightly has a cron schedule).
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    })
    timings: dict[str, float] = {}
    try:
        server.start(timeout=120)
        timings["server"] = time.monotonic() - t0
        server.cli("work-pool", "create", POOL, "--type", "process")
        worker = server.spawn("worker", [*PREFECT, "worker", "start", "--pool", POOL, "--type", "process",
                                         "--name", "ci-worker", "--limit", "1"])
        server.cli("work-pool", "create", "soapflow-cpu", "--type", "process")
        server.cli("concurrency-limit", "create", "gpu", "1")  # one extraction task per GPU
        deploy_out = server.cli("--no-prompt", "deploy", "--all", timeout=180)
        timings["deployed"] = time.monotonic() - t0

        deps = {d["name"]: d for d in server.http.post("/deployments/filter", json={}).raise_for_status().json()}
        assert set(deps) == {d["name"] for d in _prefect_yaml()["deployments"]}, deploy_out
        refit = server.http.get("/deployments/name/refit/refit").raise_for_status().json()
        assert refit["work_pool_name"] == POOL
        assert refit["job_variables"]["env"]["CUDA_VISIBLE_DEVICES"] == "0"
        [pull] = refit["pull_steps"]
        assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == str(REPO)
        nightly = server.http.get("/deployments/name/refit-catalog/refit-nightly").raise_for_status().json()
        [schedule] = nightly["schedules"]
        assert schedule["schedule"]["cron"] and schedule["schedule"]["timezone"]

        params = {"config": {**TINY, "run": {**TINY["run"], "workdir": str(work)}, "output": {"out": str(out)}}}
        run = server.http.post(f"/deployments/{refit['id']}/create_flow_run",
                               json={"parameters": params}).raise_for_status().json()
        final = server.wait_flow_run(run["id"], timeout=240, watch=[worker, server.server])
        timings["run"] = time.monotonic() - t0
        assert final["state"]["type"] == "COMPLETED", (
            f"{final['state']}\n--- flow run logs ---\n{server.flow_run_logs(run['id'])}\n"
            f"--- worker ---\n{worker.tail()}")

        art = read_artifact(out)  # verifies the content hash
        assert art.manifest["lineage"]["flow_run_id"] == run["id"]
        assert art.projector.shape[0] == art.projector.shape[1] == 192  # ViT-Ti width
        assert any((work / "stores").rglob("zarr.json"))
        keys = {a["key"] for a in server.http.post("/artifacts/filter", json={
            "artifacts": {"flow_run_id": {"any_": [run["id"]]}}}).raise_for_status().json()}
        assert {"soap-top-si-scores", "soap-refit-summary", "soap-artifact"} <= keys

        # The `gpu` tag limit of 1 let one extraction run at a time, and gave its slot back.
        spans = server.task_run_spans(run["id"], "extract-chunks", count=2)
        assert len(spans) == 2, spans  # one shard each of real and synthetic images
        assert spans[0][1] <= spans[1][0], f"extraction tasks overlapped under a gpu limit of 1: {spans}"
        gpu = server.http.get("/concurrency_limits/tag/gpu").raise_for_status().json()
        assert gpu["active_slots"] == []
        # The run's state is COMPLETED before its process has exited; the SIGINT below is for an
        # idle worker, so let the worker reap the run first (a SIGINT during that teardown held
        # the worker past 30 s in full-suite runs).
        assert worker.wait_children(timeout=60), f"the flow run's process outlived it by 60 s:\n{worker.tail()}"
        timings["reaped"] = time.monotonic() - t0
    finally:
        reports = server.stop(timeout=30)
        timings["stopped"] = time.monotonic() - t0
        print("timings (s since start):", {k: round(v, 1) for k, v in timings.items()})
    for report in reports:
        assert report["clean"], f"{report['name']} did not stop on SIGINT within 30 s"
        assert not report["leftover"], f"{report['name']} left processes behind: {report['leftover']}"



def test_test_client_retries_what_the_server_marks_retryable():
    """The server answers 503 while SQLite is busy (a loaded machine): the test's requests are
    sent again, as Prefect's own client does; other errors are returned at once."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prefect_server import RetryingClient

    answers = {"/busy": [503, 503, 200], "/broken": [500, 200]}
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            seen.append(self.path)
            code = answers[self.path].pop(0)
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with RetryingClient(base_url=f"http://127.0.0.1:{server.server_port}", timeout=10) as client:
            assert client.post("/busy").status_code == 200 and seen.count("/busy") == 3
            assert client.post("/broken").status_code == 500 and seen.count("/broken") == 1
    finally:
        server.shutdown()
