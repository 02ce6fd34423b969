"""The two kinds of user-facing failure, and which of them a retry can help.

- ``SoapError`` — a problem with the user's input (a bad path, a store with the wrong shape, an
  unknown name, a permission). Running the same thing again gives the same error: never retried.
- ``TransientError`` — an I/O failure that may pass (a full disk, a dropped connection, a
  throttled request). Tasks retry it (``retry_transient``); a rerun of the command resumes.

Both carry one line naming the bad input or the path; the CLI prints it as ``error: …``.
"""

from __future__ import annotations

import errno
import os
import re


class SoapError(ValueError):
    """A user-facing error whose message names the bad input; retrying cannot help."""


class TransientError(OSError):
    """A user-facing I/O failure that may pass by itself; retrying can help."""


#: errno values of failures that can pass without the user changing the input
_TRANSIENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE, errno.ENETUNREACH,
                     errno.ENETDOWN, errno.EHOSTUNREACH, errno.ESTALE}
#: libraries whose own exceptions (no errno) may report a remote service failing ...
_SERVICE_LIBRARIES = {"botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "httpx", "httpcore", "s3fs"}
#: ... when their name or message says so (a missing credential or bucket is the input's fault)
_SERVICE_OUTAGE = re.compile(r"connect|timeout|timed out|throttl|slowdown|slow down|unavailable|reset|disconnect|"
                             r"broken pipe|internalerror|internal error|too many requests|503|500", re.IGNORECASE)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may get past ``exc`` (see the module doc)."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, SoapError):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno is None or exc.errno in _TRANSIENT_ERRNOS
    if type(exc).__module__.split(".")[0] in _SERVICE_LIBRARIES:
        return bool(_SERVICE_OUTAGE.search(f"{type(exc).__name__} {exc}"))
    return False


def io_reason(exc: BaseException) -> str:
    """One line for an I/O failure: 'No space left on device (ENOSPC)', or the type and message."""
    if isinstance(exc, OSError) and exc.errno in errno.errorcode:
        return f"{os.strerror(exc.errno)} ({errno.errorcode[exc.errno]})"
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def io_error(message: str, cause: BaseException) -> SoapError | TransientError:
    """The user-facing error for an I/O failure ``cause``: transient or not, as ``is_transient`` says."""
    return TransientError(message) if is_transient(cause) else SoapError(message)


def retry_transient(task, task_run, state) -> bool:
    """A Prefect ``retry_condition_fn``: retry a task that failed with a transient error only
    (never after Ctrl-C, ``soapflow.cancel``)."""
    from soapflow.cancel import Interrupted, requested

    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the task's own exception, to classify
        return not requested() and not isinstance(exc, Interrupted) and is_transient(exc)
    return False


def json_object(text: str, what: str) -> dict:
    """``text`` parsed as a JSON object; anything else is a ``SoapError`` naming ``what``
    (the option or variable it came from)."""
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SoapError(f"{what} is not a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise SoapError(f"{what} must be a JSON object, got {text!r}")
    return value
