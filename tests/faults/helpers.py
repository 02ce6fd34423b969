"""Shared helpers of the fault-injection suite: subprocess runs of the CLI, image folders,
store inspection, and an S3 endpoint whose connections can be dropped."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

# One OpenMP thread: on a shared 2-core machine torch's default thread pool makes a tiny
# extraction 15x slower, and the same setting everywhere keeps tokens bit-identical.
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    "PYTHONUNBUFFERED": "1",
}

BACKBONE = ["--backbone", "vit_tiny_patch16_224", "--weights", "random", "--image-size", "32"]


def env(**extra) -> dict:
    return {**ENV, **{k: str(v) for k, v in extra.items()}}


def soap_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "soapflow.cli", *map(str, args)]


def killer_cmd(spec: dict, *args) -> list[str]:
    """The CLI run under ``tests.faults.killer``: SIGKILLs itself at an exact point."""
    return [sys.executable, "-m", "tests.faults.killer", json.dumps(spec), *map(str, args)]


def run(cmd, *, timeout=180, extra_env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**ENV, **(extra_env or {})},
                          cwd=cwd or REPO)


def soap(*args, **kw) -> subprocess.CompletedProcess:
    return run(soap_cmd(*args), **kw)


def stderr_lines(text: str) -> list[str]:
    """Lines of stderr without progress bars (tqdm redraws with carriage returns)."""
    lines = []
    for raw in text.split("\n"):
        last = raw.split("\r")[-1].strip()
        if not last or ("|" in last and ("it/s" in last or "img/s" in last or "block/s" in last or "%|" in last)):
            continue
        lines.append(last)
    return lines


def assert_clean_error(result, *fragments, code=2) -> str:
    """Exit code 2, no traceback, exactly one line on stderr (progress bars aside) that
    starts with 'error:' and contains every fragment; returns that line."""
    err = result.stderr
    assert "Traceback" not in err, err[-4000:]
    assert result.returncode == code, (result.returncode, err[-4000:])
    lines = stderr_lines(err)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# ----------------------------------------------------------------------------- images


def make_images(folder: Path, n: int, *, size=(40, 48), seed: int = 0) -> Path:
    """``n`` small noise images, PNG and JPEG alternating."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((*size, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / (f"img{i:04d}.png" if i % 2 else f"img{i:04d}.jpg"), quality=90)
    return folder


def png_bytes(mode="RGB", size=(8, 8), **save) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG", **save)
    return buf.getvalue()


def bomb_png(width=20000, height=20000) -> bytes:
    """A tiny PNG whose header claims ``width``×``height`` pixels (Pillow's bomb guard fires on open)."""
    import struct
    import zlib

    data = bytearray(png_bytes("L", (1, 1)))
    # IHDR starts at byte 8: length(4) 'IHDR'(4) width(4) height(4) ... crc(4)
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


# ----------------------------------------------------------------------------- stores


def tokens_of(uri) -> np.ndarray:
    from soapflow.storage.feature_store import FeatureStore

    return np.asarray(FeatureStore.open(str(uri)).tokens[:])


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def chunk_state(uri) -> dict:
    """What a store holds on disk, per chunk: flags set, token files, leftover partial writes."""
    root = Path(uri)
    flagged = set()
    cdir = root / "complete" / "c"
    if cdir.is_dir():
        for f in cdir.iterdir():
            if f.name.isdigit() and f.stat().st_size > 0:
                flagged.add(int(f.name))
    tokens, partial = {}, []
    tdir = root / "tokens" / "c"
    if tdir.is_dir():
        for d in tdir.iterdir():
            for f in d.rglob("*"):
                if f.is_file() and f.name.endswith(".partial"):
                    partial.append(int(d.name))
                elif f.is_file():
                    st = f.stat()
                    tokens[int(d.name)] = (st.st_ino, st.st_mtime_ns)
    # a flag file holds the zarr-encoded byte 1; read the array to be sure
    if flagged:
        import zarr

        done = zarr.open_array(str(root / "complete"), mode="r")[:]
        flagged = {int(i) for i in np.flatnonzero(done)}
    return {"flagged": flagged, "tokens": tokens, "partial": sorted(set(partial)),
            "group": (root / "zarr.json").is_file(),
            "arrays": {a for a in ("tokens", "complete") if (root / a / "zarr.json").is_file()}}


# ----------------------------------------------------------------------------- S3 outage


class DroppableEndpoint:
    """A TCP proxy in front of the moto S3 server. ``drop()`` closes every open connection
    and stops listening (clients get 'connection refused'), as if the server went away;
    ``restore()`` listens again on the same port. The moto server keeps its objects."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.drops = 0
        self.restore()

    def restore(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(64)
            self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def drop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
            self.drops += 1
        if listener is not None:
            listener.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    @property
    def down(self) -> bool:
        return self._listener is None

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 1.0)
                for src in ready:
                    data = src.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (b if src is a else a).sendall(data)
        except (OSError, ValueError):
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.drop()


def wait_for(predicate, timeout=60.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not reached in time")
