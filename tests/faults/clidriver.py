"""Run many ``soap`` command lines, each in its own process, paying the imports once.

    python -m tests.faults.clidriver < cases.json > results.json

Input: ``[{"id": ..., "argv": [...]}, ...]``. The driver imports the CLI and its heavy
dependencies, then forks one child per case: the child points fd 1/2 at files, sets
``sys.argv`` and calls ``soapflow.cli.main.main`` — exactly what the ``soap`` script runs —
and exits with its status (an uncaught exception prints its traceback and exits 1, as the
interpreter would). Output: ``[{"id", "returncode", "stdout", "stderr"}, ...]``.

Forking is safe here because the parent has not started a thread pool, a zarr event loop or
a dask cluster: it only imported modules.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback


def _child(argv: list[str], out_fd: int, err_fd: int) -> None:
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    sys.argv = ["soap", *argv]
    code = 0
    try:
        from soapflow.cli.main import main

        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def main() -> None:
    cases = json.load(sys.stdin)
    import numpy  # noqa: F401  heavy imports once, before forking
    import PIL.Image  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401
    import zarr  # noqa: F401

    import soapflow.cli.main  # noqa: F401
    import soapflow.extract  # noqa: F401
    import soapflow.fit  # noqa: F401
    import soapflow.storage.registry  # noqa: F401

    results = []
    with tempfile.TemporaryDirectory(prefix="soap-clidriver-") as tmp:
        for case in cases:
            out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            with open(out_path, "w+b") as out, open(err_path, "w+b") as err:
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(case["argv"], out.fileno(), err.fileno())
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                out.seek(0)
                err.seek(0)
                results.append({"id": case["id"], "returncode": code,
                                "stdout": out.read().decode(errors="replace"),
                                "stderr": err.read().decode(errors="replace")})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
