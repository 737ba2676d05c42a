"""JSON log lines (RP_LOG_FORMAT=json) of library code, outside and inside a Dagster run."""

from __future__ import annotations

import io
import json
import logging

import dagster as dg
import pytest

from research_pipeline import logs


@pytest.fixture
def json_lines():
    """The package's records as parsed JSON lines; the handler and levels are restored after."""
    buf = io.StringIO()
    root, package = logging.getLogger(), logging.getLogger(logs.PACKAGE_LOGGER)
    levels = root.level, package.level
    handler = logs.configure("json", "INFO", buf)
    try:
        yield lambda: [json.loads(line) for line in buf.getvalue().splitlines()]
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        package.setLevel(levels[1])


def test_a_library_line_in_a_dagster_run_keeps_its_message_and_names_the_run(json_lines, tmp_path):
    lib = logging.getLogger("research_pipeline.lib.example")

    @dg.asset
    def example_asset():
        lib.info("embedded %d chunks", 3, extra={"shard": "a"})
        return 1

    lib.warning("outside a run")
    overrides = {"python_logs": {"managed_python_loggers": [logs.PACKAGE_LOGGER], "python_log_level": "INFO"}}
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=overrides) as instance:
        result = dg.materialize([example_asset], instance=instance)
    assert result.success
    lines = {line["event"]: line for line in json_lines() if line["logger"] == lib.name}
    assert set(lines) == {"outside a run", "embedded 3 chunks"}, lines
    inside = lines["embedded 3 chunks"]
    assert (inside["run_id"], inside["step_key"], inside["shard"], inside["level"]) == (
        result.run_id, "example_asset", "a", "info")
    assert "dagster_meta" not in inside
    assert "run_id" not in lines["outside a run"]
