"""Where a process's wall time went: named marks, printed as one line at exit when
``SOAPFLOW_TIMELINE`` is set (``benchmarks/refit.py`` reads it to break down a refit's fixed part).

Each mark closes a phase that began at the previous mark (the first at the process's start)."""

from __future__ import annotations

import os
import sys
import threading
import time

_marks: list[tuple[str, float]] = []
_lock = threading.Lock()


def enabled() -> bool:
    return bool(os.environ.get("SOAPFLOW_TIMELINE"))


def mark(phase: str) -> None:
    """Close ``phase`` now."""
    if enabled():
        with _lock:
            _marks.append((phase, time.time()))


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 — no start time: the first phase is then left out
        return _marks[0][1] if _marks else time.time()


def line() -> str:
    """``timeline: imports 4.9 s · server and model 2.1 s · … (total 31.0 s)``."""
    with _lock:
        marks = list(_marks)
    if not marks:
        return "timeline: no marks"
    start = prev = _process_start()
    parts = []
    for phase, t in marks:
        parts.append(f"{phase} {t - prev:.1f} s")
        prev = t
    return f"timeline: {' · '.join(parts)} (total {prev - start:.1f} s)"


def report() -> None:
    """Print the timeline on stderr, when enabled."""
    if enabled():
        mark("exit")
        print(line(), file=sys.stderr, flush=True)
