"""Recognising a full disk, and saying where space is short.

A full disk reaches the pipeline in several shapes: `OSError` ENOSPC / EDQUOT from a file write,
SQLite's SQLITE_FULL ("database or disk is full"), PostgreSQL's `disk_full` (SQLSTATE 53100),
and Tantivy's Rust I/O error as text. `is_out_of_space` recognises each, through SQLAlchemy's
wrapper and exception chains; `describe_free` reports the free space of the folders involved, so
the error a user reads says which volume to grow or clean.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterable
from pathlib import Path

_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
#: sqlite3's primary result code for "database or disk is full".
_SQLITE_FULL = 13
#: PostgreSQL's disk_full condition.
_PG_DISK_FULL = "53100"
_TEXTS = ("no space left on device", "database or disk is full", "disk quota exceeded")


def is_out_of_space(exc: BaseException | None) -> bool:
    """True when `exc`, or an exception it wraps or was raised from, says a disk or quota is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _ERRNOS:
            return True
        if getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL:
            return True
        if _PG_DISK_FULL in (getattr(exc, "sqlstate", None), getattr(exc, "pgcode", None)):
            return True
        if any(text in str(exc).lower() for text in _TEXTS):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False


def _existing(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return None


def describe_free(folders: Iterable[tuple[str, str | Path | None]]) -> str:
    """'object store, database (/srv/rp/objects): 1.2 MiB free of 64.0 MiB; ...': the free space of
    each filesystem the (what, folder) pairs are on, naming what is there; unset folders are left
    out, a folder that does not exist yet is measured at its nearest existing parent."""
    volumes: dict[int, tuple[list[str], Path, object]] = {}
    for what, folder in folders:
        where = None if folder is None else _existing(Path(folder))
        if where is None:
            continue
        entry = volumes.setdefault(where.stat().st_dev, ([], Path(folder), shutil.disk_usage(where)))
        entry[0].append(what)
    return "; ".join(
        f"{', '.join(whats)} ({folder}): {_mib(usage.free)} free of {_mib(usage.total)}"
        for whats, folder, usage in volumes.values()
    ) or "no local folder involved"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"
