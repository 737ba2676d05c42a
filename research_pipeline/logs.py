"""Log handlers of the processes this package starts: the CLI and the search service.

Library code only calls `logging.getLogger(__name__)`; Dagster captures those loggers in runs
(`python_logs: managed_python_loggers` in every shipped dagster.yaml). A process that is not a
Dagster run attaches one handler to the root logger here: plain lines for people, or one JSON
object per line (structlog's formatter over the standard library) for log collectors.
"""

from __future__ import annotations

import logging
import sys
from typing import IO

import structlog

#: The package's own loggers; Dagster's python_logs setting names the same.
PACKAGE_LOGGER = "research_pipeline"


def _dagster_fields(logger, method_name, event_dict):  # noqa: ARG001 - structlog's processor signature
    """A record Dagster's managed loggers passed on (a library line inside a run) carries
    `dagster_meta`: the line keeps its own message and gains run_id, job_name and step_key
    instead of Dagster's prefixed message and the whole metadata object."""
    meta = event_dict.pop("dagster_meta", None)
    if isinstance(meta, dict):
        if meta.get("orig_message") is not None:
            event_dict["event"] = meta["orig_message"]
        for key in ("run_id", "job_name", "step_key"):
            if meta.get(key):
                event_dict[key] = meta[key]
    return event_dict


def json_formatter() -> logging.Formatter:
    """One JSON object per record: timestamp, level, logger, event and any `extra=` fields
    (inside a Dagster run also run_id, job_name and step_key)."""
    return structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.stdlib.ExtraAdder(),
            _dagster_fields,
            structlog.processors.format_exc_info,
        ],
    )


def configure(fmt: str = "text", level: str = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Send the package's log records (and warnings of libraries) to `stream` (default stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(json_formatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_research_pipeline", False)]:
        root.removeHandler(old)
    handler._research_pipeline = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(PACKAGE_LOGGER).setLevel(level)
    return handler
