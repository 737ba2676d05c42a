"""The migration's error: it cannot proceed, and the message says what to do."""

from __future__ import annotations


class MigrationError(RuntimeError):
    """The migration cannot proceed; the message says what to do."""
