"""A real, throwaway Prefect server (SQLite, 127.0.0.1) plus CLI and worker processes, for tests.

Every process is started in its own session (process group) and stopped like a supervisor would: SIGINT
to the process (it passes it on), wait, then SIGKILL the group if it hangs. Descendants are recorded before stopping so that the
caller can check none outlived their parent (flow-run processes start their own sessions, so a
process-group kill alone would not reach them).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil

_SCRIPT = Path(sys.executable).with_name("prefect")
PREFECT = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "prefect"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


class RetryingClient(httpx.Client):
    """An httpx client that retries what the Prefect server marks as retryable, like Prefect's own.

    The server answers 503 when SQLite reports the database busy (``SQLITE_BUSY``, or at once
    with ``SQLITE_BUSY_SNAPSHOT`` when a transaction's snapshot went stale under another writer,
    which no busy timeout waits out); on a loaded machine its services, the worker and the test
    collide more often. A rolled-back request changed nothing, so Prefect's clients send it
    again (``PREFECT_CLIENT_MAX_RETRIES``); the test's own requests do the same.
    """

    RETRY_STATUS = (429, 502, 503)

    def __init__(self, *args, attempts: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        self.attempts = attempts

    def request(self, method, url, **kwargs) -> httpx.Response:
        for attempt in range(self.attempts):
            response = super().request(method, url, **kwargs)
            if response.status_code not in self.RETRY_STATUS or attempt == self.attempts - 1:
                return response
            time.sleep(min(0.5 * 2**attempt, 8.0))  # backoff, as Prefect's client does
        return response


def _default_sigint() -> None:
    # A test run started in the background (`make test &`) has SIGINT ignored, and an ignored
    # signal stays ignored across exec: the server and worker would never see the Ctrl-C below.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Proc:
    """A background process in its own process group, output to a log file."""

    def __init__(self, name: str, args: list[str], env: dict, cwd: Path, log: Path):
        self.name, self.log = name, log
        self._fh = open(log, "wb")
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self._fh,
                                      stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint)
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_children(self, timeout: float = 60.0) -> bool:
        """Wait until the process has no child processes (a worker done with its flow runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not psutil.Process(self.pid).children(recursive=True):
                    return True
            except psutil.NoSuchProcess:
                return True
            time.sleep(0.2)
        return False

    def tail(self, n: int = 4000) -> str:
        self._fh.flush()
        return _tail(self.log, n)

    def stop(self, timeout: float = 30.0) -> dict:
        """SIGINT to the process, wait ``timeout``; SIGKILL what is left. Returns how it went."""
        report = {"name": self.name, "clean": True, "returncode": None, "leftover": []}
        try:
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if self.alive():
            try:
                # to the process, as a supervisor stops a service; it passes the signal on to its
                # children (the `prefect worker` CLI to its worker process). A SIGINT to the whole
                # group as well reached that child twice at once, which could hang its shutdown.
                os.kill(self.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                report["clean"] = False
                _killpg(self.pid)
                self.popen.wait(10)
        report["returncode"] = self.popen.returncode
        # Children get a moment to exit after their parent; anything still running is an orphan.
        _, alive = psutil.wait_procs(descendants, timeout=10)
        for p in alive:
            report["leftover"].append(_describe(p))
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        _killpg(self.pid)  # anything else still in the group (normally nothing)
        self._fh.close()
        return report


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:200]}"
    except psutil.Error:
        return str(p.pid)


class PrefectServer:
    """``prefect server start`` with its own PREFECT_HOME; ``env`` points clients at it."""

    def __init__(self, home: Path, cwd: Path, extra_env: dict | None = None):
        self.home, self.cwd = Path(home), Path(cwd)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update({
            "PREFECT_HOME": str(self.home),
            "PREFECT_PROFILES_PATH": str(self.home / "profiles.toml"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(self.port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_CLI_PROMPT": "false",
            "PREFECT_CLI_COLORS": "false",
            "PWD": str(self.cwd),
        })
        env.update(extra_env or {})
        self.env = env
        self.procs: list[Proc] = []
        self.server: Proc | None = None
        self.http = RetryingClient(base_url=self.api_url, timeout=30)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> None:
        self.server = self.spawn("server", [*PREFECT, "server", "start", "--host", "127.0.0.1",
                                            "--port", str(self.port)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.server.alive():
                raise RuntimeError(f"prefect server exited early:\n{self.server.tail()}")
            try:
                if self.http.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"prefect server not healthy after {timeout:.0f}s:\n{self.server.tail()}")

    def spawn(self, name: str, args: list[str]) -> Proc:
        proc = Proc(name, args, self.env, self.cwd, self.home / f"{name}.log")
        self.procs.append(proc)
        return proc

    def stop(self, timeout: float = 30.0) -> list[dict]:
        """Stop every spawned process, newest first (workers before the server)."""
        self.http.close()
        reports = [p.stop(timeout) for p in reversed(self.procs)]
        self.procs.clear()
        return reports

    # -- helpers ---------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 120.0) -> str:
        """Run ``prefect ARGS`` against this server; raise with its output if it fails."""
        try:
            res = subprocess.run([*PREFECT, *args], env=self.env, cwd=self.cwd, capture_output=True, text=True,
                                 timeout=timeout, start_new_session=True)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"prefect {' '.join(args)} timed out after {timeout:.0f}s:\n{e.stdout}\n{e.stderr}")
        if res.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res.stdout + res.stderr

    def wait_flow_run(self, flow_run_id: str, timeout: float, watch: list[Proc] = ()) -> dict:
        """Poll the flow run until it is final; fail early if a watched process dies."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.http.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()
            state = run.get("state") or {}
            if state.get("type") in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
                return run
            for proc in watch:
                if not proc.alive():
                    raise RuntimeError(f"{proc.name} exited while the run was {state.get('name')}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"flow run still {state.get('name')} after {timeout:.0f}s")
            time.sleep(1)

    def task_run_spans(self, flow_run_id: str, name_prefix: str, count: int, timeout: float = 20.0) -> list:
        """(start, end) of the flow run's completed task runs named ``name_prefix*``, sorted by start.

        Task run states reach the database through the server's event pipeline, so poll briefly."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.http.post("/task_runs/filter", json={"task_runs": {
                "flow_run_id": {"any_": [flow_run_id]}, "name": {"like_": name_prefix},
                "state": {"type": {"any_": ["COMPLETED"]}}}}).raise_for_status().json()
            spans = sorted((datetime.fromisoformat(r["start_time"]), datetime.fromisoformat(r["end_time"]))
                           for r in runs if r["start_time"] and r["end_time"])
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.5)

    def flow_run_logs(self, flow_run_id: str, limit: int = 200) -> str:
        logs = self.http.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                                     "sort": "TIMESTAMP_ASC", "limit": limit}).json()
        return "\n".join(f"{rec.get('level')} {rec.get('message')}" for rec in logs)
