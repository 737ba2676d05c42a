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


# --- with a published generation ---------------------------------------------------------------

#: Demo papers that answer example queries in examples/queries.tsv (small, so fast to index).
PUBLISHED_SAMPLE = (
    "joss-2018-pycm-multiclass-confusion-matrix-library-python.pdf",
    "joss-2021-niaaml-automl-framework-based-stochastic.pdf",
    "jose-2018-cfd-python-12-steps-navier-stokes.pdf",
)
JUNK_QUERIES = (
    '"unbalanced quote',
    "AND OR NOT",
    "title:* ^2 ~~ (((",
    "'); DROP TABLE documents; --",
    "     ",
    "Üñíçødé ☃ 数据",
    "-" * 500,
)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A SQLite store with PUBLISHED_SAMPLE ingested, indexed, gated and published by the pipeline's own code."""
    import shutil

    from research_pipeline.lib import gates, generations
    from research_pipeline.lib.chunking import chunk_documents
    from research_pipeline.lib.embedder import load_embedder
    from research_pipeline.lib.ingest import ingest
    from research_pipeline.lib.objectstore import LocalObjectStore
    from research_pipeline.lib.sources import sources_for
    from research_pipeline_tests.conftest import DEMO_PAPERS

    root = tmp_path_factory.mktemp("published")
    inbox = root / "inbox"
    inbox.mkdir()
    for name in PUBLISHED_SAMPLE:
        shutil.copy(DEMO_PAPERS / name, inbox / name)
    url = f"sqlite:///{root / 'rp.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    embedder = load_embedder()
    objects = LocalObjectStore(root / "objects")
    ingest(engine, sources_for(inbox), workers=1, ocr=False)
    chunk_documents(engine, embedder.count_tokens)
    gen = generations.build_generation(engine, objects, embedder)
    # The shared 2-core machine makes latency unpredictable; the latency gate has its own tests.
    relaxed = gates.GateThresholds(latency_p95_ms=600_000.0)
    gates.evaluate_generation(engine, objects, embedder, gen["gen_id"], thresholds=relaxed, max_probe_queries=3)
    generations.publish(engine, gen["gen_id"], store=objects)
    engine.dispose()
    return {"url": url, "objects": str(root / "objects"), "home": str(root), "gen_id": gen["gen_id"]}


@pytest.fixture
def published_env(monkeypatch, published):
    monkeypatch.setenv("RP_HOME", published["home"])
    monkeypatch.setenv("RP_DATABASE_URL", published["url"])
    monkeypatch.setenv("RP_OBJECT_STORE_URL", published["objects"])
    return published


def _example_query(filename: str) -> str:
    return next(q for q, files in cli.read_queries(REPO / "examples" / "queries.tsv") if filename in files)


def test_search_finds_the_paper_an_example_query_names(published_env, capsys):
    target = PUBLISHED_SAMPLE[0]
    assert cli.main(["search", _example_query(target), "--k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    files = [f for hit in out["results"] for f in hit["files"]]
    assert target in files
    assert len(out["results"]) <= 3

    assert cli.main(["index", "list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["live"] == published_env["gen_id"]


def test_search_filters_by_year(published_env, capsys):
    assert cli.main(["search", "python", "--json"]) == 0
    years = [h["year"] for h in json.loads(capsys.readouterr().out)["results"] if h["year"]]
    assert years, "the sample papers carry a year"
    newest = max(years)
    assert cli.main(["search", "python", "--year-min", str(newest), "--json"]) == 0
    filtered = json.loads(capsys.readouterr().out)["results"]
    assert filtered and all(h["year"] is not None and h["year"] >= newest for h in filtered)


@pytest.mark.parametrize("query", JUNK_QUERIES)
def test_junk_queries_never_raise(published_env, capsys, query):
    # `--` ends the options, so a query that starts with "-" is still a query.
    assert cli.main(["search", "--json", "--", query]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["results"], list)


def _get(port: int, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serve_health_readiness_search_and_metrics(published, tmp_path):
    import threading
    from urllib.parse import quote

    from research_pipeline import health
    from research_pipeline.lib.settings import Settings

    settings = Settings(
        home=tmp_path, inbox=tmp_path, database_url=published["url"], object_store_url=published["objects"]
    )
    server = health.make_server(settings, port=0)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert _get(port, "/healthz")[0] == 200
        status, body = _get(port, "/readyz")
        assert status == 200 and json.loads(body)["generation"] == published["gen_id"]

        status, body = _get(port, "/search?q=" + quote(_example_query(PUBLISHED_SAMPLE[0])) + "&k=3")
        assert status == 200
        answer = json.loads(body)
        assert answer["generation"] == published["gen_id"] and 1 <= len(answer["results"]) <= 3
        for junk in JUNK_QUERIES[:4]:
            assert _get(port, "/search?q=" + quote(junk))[0] == 200
        assert _get(port, "/search?q=x&k=0")[0] == 400
        assert _get(port, "/search?q=x&year_min=soon")[0] == 400

        status, body = _get(port, "/metrics")
        text = body.decode()
        engine = store.make_engine(published["url"])
        counts = store.counts(engine)
        engine.dispose()
        assert status == 200
        assert f"rp_documents {float(counts['documents'])}" in text
        assert f"rp_chunks {float(counts['chunks'])}" in text
        assert "rp_database_up 1.0" in text
        assert 'rp_search_requests_total{outcome="ok"} 5.0' in text
        assert 'rp_search_requests_total{outcome="bad_request"} 2.0' in text
        assert "rp_search_latency_seconds_count 5.0" in text
        age = float(next(line.split()[1] for line in text.splitlines() if line.startswith("rp_live_generation_age_seconds ")))
        assert age >= 0
    finally:
        server.shutdown()
        server.server_close()
