"""Progress messages from long library work, to whatever the caller passed as `log`."""

from __future__ import annotations

from typing import Any


def emit(log: Any, message: str) -> None:
    """Send `message` to `log`: a logger with `.info` (Dagster's context.log, logging), a callable, or None."""
    if log is None:
        return
    info = getattr(log, "info", None)
    (info or log)(message)
