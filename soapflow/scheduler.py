"""One scheduler per device: a single thread runs every forward pass on the device, taking ready
chunks from all the extractions of this process in turn.

An extraction is a ``Job``: an iterator of ``(position, images)`` chunks, a ``forward`` run on the
device thread, and ``done`` called there with its result (which hands it to the job's writers, so
it must not block). A job whose chunks are made ahead (``prefetch``, the GPU default) has a thread
of its own filling a short queue; a job without prefetch has its next chunk made on the device
thread, when its turn comes (on a CPU that keeps decoding and noise from fighting a forward for the
cores). Turns go round robin over the jobs that have a chunk ready and room to write it, so one
store's slow input never holds the other's chunks back, and neither store starves the other.

Each job's seconds are split as ``ExtractStats`` reports them: its forwards, waiting for its own
input, waiting for its disk, and waiting while the device served another job.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_END = object()


@dataclass
class JobTimes:
    forward: float = 0.0
    input: float = 0.0
    disk: float = 0.0
    device_busy: float = 0.0


class Job:
    """One extraction's chunks on a ``DeviceScheduler``; ``result()`` waits for the last one."""

    def __init__(self, chunks: Iterable, forward: Callable, done: Callable, *, prefetch: bool = False,
                 depth: int = 2, room: Callable[[], bool] | None = None, name: str = "job",
                 check: Callable[[], None] | None = None):
        self.name = name
        self.check = check  # before each of its chunks (a cancel flag's check); what it raises fails the job
        self.forward, self.done = forward, done
        self.room = room or (lambda: True)  # False while the job's writers are full
        self.prefetch = prefetch
        self.times = JobTimes()
        self._it = iter(chunks)
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = queue.Queue(maxsize=max(1, depth)) if prefetch else None
        self._stop = threading.Event()
        self._producer: threading.Thread | None = None
        self._since = 0.0

    # -- the producer (prefetch): makes chunks ahead in a plain thread of its own -----------------

    def _start(self, wake: Callable[[], None]) -> None:
        if not self.prefetch:
            return

        def produce():
            it = self._it
            try:
                while not self._stop.is_set():
                    try:
                        item = next(it)
                    except StopIteration:
                        item = _END
                    if not self._put(item, wake):
                        return
                    if item is _END:
                        return
            except BaseException as e:  # noqa: BLE001 — handed to the device thread, raised by result()
                self._put(_Failure(e), wake)
            finally:
                _close(it)

        self._producer = threading.Thread(target=produce, name=f"read-ahead-{self.name}", daemon=True)
        self._producer.start()

    def _put(self, item, wake) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
            except queue.Full:
                continue
            wake()
            return True
        return False

    # -- seen from the device thread -----------------------------------------------------------

    def _ready(self) -> bool:
        """A chunk (or the end, or an error) is there to take, and there is room to write it."""
        if self.prefetch:
            if self._queue.empty():
                return False
            head = self._queue.queue[0]
            return head is _END or isinstance(head, _Failure) or self.room()
        return self.room()

    def _waiting_on(self) -> str:
        """What the job waits for when not ready: its input or its disk."""
        if self.prefetch and self._queue.empty():
            return "input"
        return "disk"

    def _take(self):
        if self.prefetch:
            item = self._queue.get_nowait()
            if isinstance(item, _Failure):
                raise item.error
            return item
        try:
            return next(self._it)
        except StopIteration:
            return _END

    def failed(self) -> bool:
        return self._error is not None

    def fail(self, error: BaseException) -> None:
        """Stop the job with ``error`` (from any thread: a writer's, say); ``result()`` raises it."""
        if self._error is None:
            self._error = error
        self._stop.set()

    def _finish(self) -> None:
        """On the device thread, once the job stopped: close its chunks there (where a job without
        prefetch iterates them), then let ``result()`` return."""
        self._stop.set()
        try:
            if not self.prefetch:
                _close(self._it)
        except BaseException as e:  # noqa: BLE001 — result() raises it; the job must still finish
            self.fail(e)
        finally:
            self._finished.set()

    def wait_finished(self, timeout: float | None = 30) -> None:
        """Wait until the device thread has let go of the job and its producer has stopped."""
        if self._finished.wait(timeout) and self._producer is not None:
            self._producer.join(timeout)

    def result(self, timeout: float | None = None) -> JobTimes:
        if not self._finished.wait(timeout):
            raise TimeoutError(f"job {self.name} still running")
        if self._producer is not None:
            self._producer.join()  # its chunk loader closed: decode workers stopped
        if self._error is not None:
            raise self._error
        return self.times


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _close(it) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


class DeviceScheduler:
    """The device thread and its jobs (see the module doc). ``check`` runs before every chunk (a
    cancel flag's check, say); what it raises fails every job."""

    def __init__(self, device: str, check: Callable[[], None] | None = None):
        self.device = str(device)
        self.check = check
        self._jobs: list[Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self.order: list[tuple[str, int]] | None = None  # (job, position) forwarded, when a test asks

    def submit(self, job: Job) -> Job:
        with self._cond:
            job._since = time.perf_counter()
            self._jobs.append(job)
            job._start(self.wake)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=f"device-{self.device}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return job

    def wake(self) -> None:
        """Something changed (a chunk is ready, a write finished): look again."""
        with self._cond:
            self._cond.notify_all()

    def _pick(self) -> Job | None:
        """The first job in line with a chunk ready; it goes to the back of the line."""
        for k, job in enumerate(self._jobs):
            if job._ready():
                self._jobs.append(self._jobs.pop(k))
                return job
        return None

    def _charge(self, seconds: float, served: Job | None, phase: str) -> None:
        """Split ``seconds`` of the device thread over the jobs by what each was doing."""
        now = time.perf_counter()
        for job in self._jobs:
            seconds_here = min(seconds, now - job._since)  # a job submitted meanwhile: since then
            if seconds_here <= 0:
                continue
            if job is served:
                setattr(job.times, phase, getattr(job.times, phase) + seconds_here)
            elif job._ready():
                job.times.device_busy += seconds_here
            else:
                waiting = job._waiting_on()
                setattr(job.times, waiting, getattr(job.times, waiting) + seconds_here)

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 — a dead device thread must not leave a job waiting forever
            with self._cond:
                for j in self._jobs:
                    j.fail(RuntimeError(f"device scheduler for {self.device} stopped: {e!r}"))
                    j._finished.set()
                self._jobs = []
                self._thread = None
            raise

    def _serve(self) -> None:
        mark = time.perf_counter()
        while True:
            with self._cond:
                while True:
                    for j in self._jobs:
                        if j._stop.is_set():
                            j._finish()
                    self._jobs = [j for j in self._jobs if not j._finished.is_set()]
                    if not self._jobs:
                        self._thread = None
                        return
                    job = self._pick()
                    if job is not None:
                        break
                    self._cond.wait(0.05)
                    t = time.perf_counter()
                    self._charge(t - mark, None, "input")
                    mark = t
            try:
                if self.check is not None:
                    self.check()
            except BaseException as e:  # noqa: BLE001 — every job stops with it
                with self._cond:
                    for j in self._jobs:
                        j.fail(e)
                continue
            try:
                if job.check is not None:
                    job.check()
                item = job._take()
                t = time.perf_counter()
                self._charge(t - mark, job, "input")
                mark = t
                if item is _END:
                    job._stop.set()
                    continue
                position, images = item
                if self.order is not None:
                    self.order.append((job.name, position))
                out = job.forward(images)
                t = time.perf_counter()
                self._charge(t - mark, job, "forward")
                mark = t
                job.done(position, out)
            except BaseException as e:  # noqa: BLE001 — raised by the job's result()
                job.fail(e)


_SCHEDULERS: dict[str, DeviceScheduler] = {}
_SCHEDULERS_LOCK = threading.Lock()


def device_scheduler(device) -> DeviceScheduler:
    """This process's scheduler for ``device``."""
    key = str(device)
    with _SCHEDULERS_LOCK:
        if key not in _SCHEDULERS:
            _SCHEDULERS[key] = DeviceScheduler(key)
        return _SCHEDULERS[key]
