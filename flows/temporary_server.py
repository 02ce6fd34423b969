"""The temporary Prefect API server of a one-off run, started without importing Prefect's server.

With no ``PREFECT_API_URL``, Prefect starts a server process of its own on the first API call
(``SubprocessASGIServer``). Its launcher lives in ``prefect.server.api.server``, whose import
pulls in the whole server (FastAPI, SQLAlchemy, docket …): ~1.3 s on the caller's thread,
for a process that then imports all of it again. ``TemporaryServer`` runs the same command
with the same environment, so the server process boots on another core while this one loads
the model, and stops it at exit like Prefect does (after Prefect's log and event workers
have drained into it).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from soapflow.errors import SoapError

_PORT_IN_USE = 3  # uvicorn's exit code when it cannot bind


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """One Prefect server process for this process's one-off runs, on a free local port."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._announced = False

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.address}/api"

    def start(self) -> None:
        """Launch the server process and return at once (``wait_ready`` waits for it)."""
        if self.process is not None:
            return
        import prefect
        from prefect.settings import get_current_settings

        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                 "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)},
            # its own process group: a Ctrl-C in the terminal reaches only the run, which then stops
            # its extraction cleanly while still talking to this server (stopped at exit, below)
            process_group=0,
        )
        atexit.register(self.stop)

    def wait_ready(self) -> str:
        """Block until the API answers; return its URL."""
        import httpx
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        if not self._announced:  # said only once the server is used: a run that fails its input checks is one line
            from prefect.logging import get_logger

            get_logger().info(f"Starting temporary server on {self.address}")
            self._announced = True
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code == _PORT_IN_USE:  # another process took the port in between: try a new one
                    self.stop()
                    self.start()
                    continue
                if code is not None:
                    raise SoapError(f"the temporary Prefect server exited with code {code} before it answered; "
                                    "set PREFECT_API_URL to use a running server")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return self.api_url
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise SoapError(f"the temporary Prefect server did not answer within {timeout} s; "
                        "set PREFECT_API_URL to use a running server")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            from prefect.logging import get_logger

            if self._announced:
                get_logger().info(f"Stopping temporary server on {self.address}")
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


_SERVER = TemporaryServer()


def temporary_server() -> TemporaryServer:
    """The process-wide instance: later one-off runs in this process reuse its server."""
    return _SERVER
