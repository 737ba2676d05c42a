"""Small helpers every domain shares: content hashes, UTC time, URLs safe to print."""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path


def sha256_hex(data: bytes | str) -> str:
    """The hex sha256 of bytes, or of a string's UTF-8 encoding."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# NUL and the UTF-16 surrogate code points: PostgreSQL text cannot hold NUL, and neither
# backend's driver can encode a lone surrogate as UTF-8.
_NOT_STORABLE = re.compile("[\x00\ud800-\udfff]")


def pg_safe_text(s: str) -> str:
    """`s` with every character a database cannot store (NUL, lone surrogates) as U+FFFD.

    One character for one, so offsets into the text stay valid; text without them is returned
    as it is.
    """
    if s.isascii() and "\x00" not in s:
        return s
    return _NOT_STORABLE.sub("\ufffd", s)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime) -> datetime:
    """An aware datetime; a naive one is taken as UTC (how the store writes every timestamp)."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def redact_url(url: str) -> str:
    """A database or service URL with its password masked, for logs, errors and the UI."""
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL: mask a user:password@ part by hand
        scheme, sep, rest = url.partition("://")
        creds, at, host = rest.rpartition("@")
        if sep and at and ":" in creds:
            return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
        return url
