"""Small helpers shared by every layer: URLs, UTC timestamps, names for paths, the work folder."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path


def is_url(uri) -> bool:
    """A URL (``s3://…``, ``memory://…``) rather than a local path."""
    return "://" in str(uri)


def utc_now(timespec: str = "seconds") -> str:
    """The time now in UTC, ISO 8601 (what manifests, stores and registry records carry)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec=timespec)


def utc_stamp() -> str:
    """The time now in UTC for a file name: ``20260128T203000``."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


def slug(text, limit: int = 60) -> str:
    """``text`` as one path component: letters, digits and ``._-``, at most ``limit`` characters."""
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in str(text)).strip("-")[:limit] or "x"


def default_workdir() -> Path:
    """Where stores, artifacts and evaluations go: ``$SOAPFLOW_WORKDIR``, else the user's cache."""
    base = os.environ.get("SOAPFLOW_WORKDIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "soapflow", "work")
    return Path(base)
