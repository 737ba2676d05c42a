"""The `research-pipeline` console script: status, search before any index, argument errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from research_pipeline import cli
from research_pipeline.lib import store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def rp_env(monkeypatch, tmp_path, db_url):
    """RP_* variables pointing at a fresh store on db_url (SQLite or PostgreSQL)."""
    monkeypatch.setenv("RP_HOME", str(tmp_path / "rp"))
    monkeypatch.setenv("RP_DATABASE_URL", db_url)
    monkeypatch.setenv("RP_OBJECT_STORE_URL", str(tmp_path / "objects"))
    return db_url


def _quarantine(engine, reasons):
    rows = [
        {"uri": f"file:///inbox/{i}.pdf", "content_hash": None, "reason": r, "message": "x", "size": 1,
         "quarantined_at": store.utcnow()}
        for i, r in enumerate(reasons)
    ]
    with engine.begin() as conn:
        store.upsert(conn, store.quarantine, rows, ["uri"])


def test_status_json_reports_the_configured_store(rp_env, capsys):
    assert cli.main(["status", "--json"]) == 0
    empty = json.loads(capsys.readouterr().out)
    assert empty["documents"] == 0 and empty["live_generation"] is None

    engine = store.make_engine(rp_env)
    try:
        _quarantine(engine, ["corrupt", "corrupt", "encrypted"])
    finally:
        engine.dispose()
    assert cli.main(["status", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quarantine"] == {"corrupt": 2, "encrypted": 1}
    assert out["quarantined"] == 3


def test_console_script_status_json(tmp_path):
    env = dict(os.environ, RP_HOME=str(tmp_path / "rp"))
    env.pop("RP_DATABASE_URL", None)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("research-pipeline")), "status", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["documents"] == 0
    assert (tmp_path / "rp" / "rp.db").exists(), "the default store lives under RP_HOME"


def test_search_before_any_publish_says_what_to_run(rp_env, capsys):
    assert cli.main(["search", "neural networks"]) == 2
    err = capsys.readouterr().err
    assert "make demo" in err and "reindex_job" in err
    assert "Traceback" not in err


def test_index_list_before_any_publish(rp_env, capsys):
    assert cli.main(["index", "list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"live": None, "generations": []}


def test_bad_inputs_fail_with_a_message(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("RP_HOME", str(tmp_path / "rp"))
    monkeypatch.setenv("RP_DATABASE_URL", "mysql://nobody@localhost/db")
    assert cli.main(["status"]) == 2
    assert "RP_DATABASE_URL" in capsys.readouterr().err
    monkeypatch.delenv("RP_DATABASE_URL")
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "corpus.jsonl" in capsys.readouterr().err
    assert cli.main(["search", "x", "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err


def test_demo_prepares_dagster_home_without_overwriting(monkeypatch, tmp_path):
    monkeypatch.setenv("RP_HOME", str(tmp_path / "rp"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home = cli.prepare_dagster_home(cli.Settings.from_env())
    assert home == tmp_path / "rp" / "dagster"
    assert os.environ["DAGSTER_HOME"] == str(home)
    assert (home / "dagster.yaml").read_text() == (REPO / "dagster.yaml").read_text()

    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    cli.prepare_dagster_home(cli.Settings.from_env())
    assert (home / "dagster.yaml").read_text() == "telemetry:\n  enabled: false\n", "an operator's file is kept"
