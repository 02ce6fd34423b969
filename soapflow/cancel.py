"""Cooperative cancellation: Ctrl-C asks long work to stop at its next safe point.

The ``soap`` command installs :func:`sigint_handler` for its lifetime. Inside :func:`deferred` (the
extraction of ``soap extract`` and ``soap refit``) the first Ctrl-C only sets a process-wide flag;
the extraction loop calls :func:`check` before every chunk (and the forward between
micro-batches), which raises :class:`Interrupted` there. Elsewhere Ctrl-C also sets the flag but
raises ``KeyboardInterrupt`` at once, as usual. Chunks already handed to the
writer are finished and flagged, so the store holds only complete chunks and a rerun of the same
command resumes. Work in Prefect's task threads cannot be stopped by a ``KeyboardInterrupt`` in the
main thread, which is why the flag exists at all. A second Ctrl-C interrupts at once, as Python
would.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

__all__ = ["Interrupted", "check", "deferred", "request", "requested", "reset", "sigint_handler", "RESUME_HINT"]

RESUME_HINT = "interrupted: rerun the same command to resume"

_EVENT = threading.Event()
_DEFERRED = [0]  # how many deferred() blocks are active


class Interrupted(Exception):
    """Work stopped because cancellation was requested (Ctrl-C).

    An ``Exception`` rather than a ``BaseException``: Prefect then records a failed task and flow
    (and retries nothing, see ``tasks.extract``) instead of a crash of the whole engine."""

    def __init__(self, message: str = "interrupted") -> None:
        super().__init__(message)


def request() -> None:
    """Ask every running extraction in this process to stop at its next chunk."""
    _EVENT.set()


def requested() -> bool:
    return _EVENT.is_set()


def reset() -> None:
    _EVENT.clear()


def check() -> None:
    """Raise :class:`Interrupted` if cancellation was requested."""
    if _EVENT.is_set():
        raise Interrupted()


@contextlib.contextmanager
def deferred():
    """Within this block the first Ctrl-C asks the work to stop at its next check instead of
    raising ``KeyboardInterrupt`` wherever the main thread is (which cannot stop worker threads)."""
    _DEFERRED[0] += 1
    try:
        yield
    finally:
        _DEFERRED[0] -= 1


@contextlib.contextmanager
def sigint_handler():
    """While active (main thread only), the first SIGINT calls :func:`request` and the next one
    raises ``KeyboardInterrupt`` as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if _EVENT.is_set() or not _DEFERRED[0]:
            request()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        request()
        sys.stderr.write("\nstopping at the next chunk (Ctrl-C again to stop at once)\n")
        sys.stderr.flush()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
