"""Run the ``soap`` CLI and SIGKILL it at an exact point — no hook in the product code.

    python -m tests.faults.killer '<spec json>' extract --source ... --out ...

``spec``: ``{"target": "module:attr.path", "when": "before" | "after" | "half" | "wait" |
"enospc", "match": "substring of the arguments", "nth": 1, ...}``. The target is wrapped
before the CLI starts; on its ``nth`` matching call the process

* ``before`` / ``after``: kills itself with SIGKILL before / after the real call;
* ``half``: (zarr's ``_put(path, buffer)`` only) writes half the bytes to the temporary
  ``*.partial`` file zarr would write and renames into place, then dies — a kill in the
  middle of writing a chunk;
* ``wait``: creates ``spec["arrived"]`` and blocks until ``spec["gate"]`` exists, then
  carries on (used to hold a writer in the middle of a run);
* ``enospc``: (``_put`` only) raises ``OSError(ENOSPC)`` for every write once
  ``spec["budget"]`` bytes have been written — a disk that fills up, where no file system
  of a given size can be mounted.

SIGKILL is what ``kill -9`` sends: no cleanup handler, ``finally`` or ``atexit`` runs.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import signal
import sys
import threading
import time
import uuid


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached


def install(spec: dict) -> None:
    module_name, _, attr_path = spec["target"].partition(":")
    owner = importlib.import_module(module_name)
    parts = attr_path.split(".")
    for part in parts[:-1]:
        owner = getattr(owner, part)
    original = getattr(owner, parts[-1])
    when = spec.get("when", "before")
    match = spec.get("match")
    nth = int(spec.get("nth", 1))
    state = {"calls": 0, "written": 0}
    lock = threading.Lock()

    def wrapper(*args, **kwargs):
        hit = match is None or match in " ".join(map(str, args)) + " " + " ".join(map(str, kwargs.values()))
        if when == "enospc":
            size = len(args[1].as_buffer_like()) if len(args) > 1 else 0
            with lock:
                over = state["written"] + size > int(spec["budget"])
                if not over:
                    state["written"] += size
            if over:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[0]))
            return original(*args, **kwargs)
        if hit:
            with lock:
                state["calls"] += 1
                fire = state["calls"] == nth
        else:
            fire = False
        if not fire:
            return original(*args, **kwargs)
        if when == "before":
            _die()
        if when == "half":
            path, value = args[0], args[1]
            data = bytes(value.as_buffer_like())
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
            with open(tmp, "wb") as f:
                f.write(data[: max(1, len(data) // 2)])
                f.flush()
                os.fsync(f.fileno())
            _die()
        if when == "wait":
            open(spec["arrived"], "w").close()
            deadline = time.monotonic() + float(spec.get("max_wait", 120))
            while not os.path.exists(spec["gate"]) and time.monotonic() < deadline:
                time.sleep(0.02)
            return original(*args, **kwargs)
        result = original(*args, **kwargs)
        if when == "after":
            _die()
        return result

    setattr(owner, parts[-1], wrapper)


def main() -> None:
    spec = json.loads(sys.argv[1])
    for one in spec if isinstance(spec, list) else [spec]:
        install(one)
    sys.argv = ["soap", *sys.argv[2:]]
    from soapflow.cli.main import main as soap_main

    soap_main()


if __name__ == "__main__":
    main()
