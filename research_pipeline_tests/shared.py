"""Helpers shared by test modules (instead of test modules importing one another)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator


class _Callback(logging.Handler):
    def __init__(self, fn: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.fn = fn

    def emit(self, record: logging.LogRecord) -> None:
        self.fn(record.getMessage())


@contextlib.contextmanager
def on_log(logger_name: str, fn: Callable[[str], None]) -> Iterator[None]:
    """Call `fn(message)` for every INFO+ record of `logger_name` while the block runs."""
    logger = logging.getLogger(logger_name)
    handler = _Callback(fn)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
