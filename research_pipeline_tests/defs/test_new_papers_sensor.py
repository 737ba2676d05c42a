"""new_papers_sensor: a RunRequest per new inbox state, a SkipReason otherwise, and a cursor that advances."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import dagster as dg
import pytest

from research_pipeline.defs.ingest.sensors import new_papers_sensor
from research_pipeline.defs.resources import DatabaseResource, InboxResource
from research_pipeline.lib.core import store
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import sources_for
from research_pipeline_tests.shared import DEMO_PAPERS

PDFS = sorted(DEMO_PAPERS.glob("*.pdf"))


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def tick(instance, inbox, cursor, database_url=None):
    """One sensor evaluation; returns (result, cursor after the tick)."""
    database_url = database_url or f"sqlite:///{inbox.parent / 'sensor.db'}"
    with dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"inbox": InboxResource(path=str(inbox)), "database": DatabaseResource(url=database_url)},
    ) as context:
        result = new_papers_sensor(context)
        return result, context.cursor


def test_new_files_request_a_run_and_an_unchanged_inbox_skips(instance, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    result, cursor = tick(instance, inbox, None)
    assert isinstance(result, dg.SkipReason), "an empty inbox requests nothing"

    for pdf in PDFS[:2]:
        shutil.copy2(pdf, inbox / pdf.name)
    first, cursor1 = tick(instance, inbox, cursor)
    assert isinstance(first, dg.RunRequest)
    assert json.loads(cursor1)["files"] == 2

    again, cursor_again = tick(instance, inbox, cursor1)
    assert isinstance(again, dg.SkipReason)
    assert cursor_again == cursor1

    # A file that the ingest ignores, and anything in a hidden folder, is not "new papers".
    (inbox / "notes.txt").write_text("not a paper")
    (inbox / ".trash").mkdir()
    shutil.copy2(PDFS[2], inbox / ".trash" / PDFS[2].name)
    ignored, _ = tick(instance, inbox, cursor1)
    assert isinstance(ignored, dg.SkipReason)

    nested = inbox / "2026"
    nested.mkdir()
    shutil.copy2(PDFS[3], nested / PDFS[3].name)
    second, cursor2 = tick(instance, inbox, cursor1)
    assert isinstance(second, dg.RunRequest)
    assert second.run_key != first.run_key
    state = json.loads(cursor2)
    assert state["files"] == 3
    assert state["newest_mtime_ns"] >= json.loads(cursor1)["newest_mtime_ns"]


def test_a_changed_file_requests_a_run(instance, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    target = inbox / PDFS[0].name
    shutil.copy2(PDFS[0], target)
    first, cursor = tick(instance, inbox, None)
    assert isinstance(first, dg.RunRequest)

    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    changed, cursor2 = tick(instance, inbox, cursor)
    assert isinstance(changed, dg.RunRequest)
    assert changed.run_key != first.run_key
    assert cursor2 != cursor


def test_missing_inbox_skips_with_the_fix(instance, tmp_path):
    result, cursor = tick(instance, tmp_path / "nowhere", None)
    assert isinstance(result, dg.SkipReason)
    assert "RP_INBOX" in result.skip_message
    assert cursor is None


def test_no_second_run_while_a_reindex_is_active(instance, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    shutil.copy2(PDFS[0], inbox / PDFS[0].name)
    first, cursor = tick(instance, inbox, None)
    assert isinstance(first, dg.RunRequest)

    run = instance.add_run(dg.DagsterRun(job_name="reindex_job", run_id=str(uuid.uuid4()), status=dg.DagsterRunStatus.STARTED))
    shutil.copy2(PDFS[1], inbox / PDFS[1].name)
    busy, cursor_busy = tick(instance, inbox, cursor)
    assert isinstance(busy, dg.SkipReason) and "still queued or running" in busy.skip_message
    assert cursor_busy == cursor, "the change is kept for the next tick"

    instance.report_run_failed(run)
    after, cursor_after = tick(instance, inbox, cursor)
    assert isinstance(after, dg.RunRequest)
    assert json.loads(cursor_after)["files"] == 2


def test_first_tick_starts_from_the_store(instance, tmp_path):
    """Turned on over an inbox that is already ingested, the sensor only sets its cursor; a new file then runs."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for pdf in PDFS[:2]:
        shutil.copy2(pdf, inbox / pdf.name)
    url = f"sqlite:///{tmp_path / 'rp.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    try:
        ingest(engine, sources_for(inbox), workers=1, ocr=False)
    finally:
        engine.dispose()

    first, cursor = tick(instance, inbox, None, url)
    assert isinstance(first, dg.SkipReason) and "already ingested" in first.skip_message
    assert json.loads(cursor)["files"] == 2

    shutil.copy2(PDFS[2], inbox / PDFS[2].name)
    new, _ = tick(instance, inbox, cursor, url)
    assert isinstance(new, dg.RunRequest)

    fresh, _ = tick(instance, inbox, None, url)
    assert isinstance(fresh, dg.RunRequest), "a first tick with an unseen file requests a run"


def test_sensor_interval_is_each_sensors_default_unless_set(monkeypatch):
    from research_pipeline.config import ConfigError
    from research_pipeline.defs.resources import sensor_interval

    monkeypatch.delenv("RP_SENSOR_INTERVAL_S", raising=False)
    assert sensor_interval(60) == 60
    monkeypatch.setenv("RP_SENSOR_INTERVAL_S", "5")
    assert sensor_interval(60) == sensor_interval(30) == 5
    monkeypatch.setenv("RP_SENSOR_INTERVAL_S", "0")
    with pytest.raises(ConfigError, match="RP_SENSOR_INTERVAL_S"):
        sensor_interval(60)
