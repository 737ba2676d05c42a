"""The `research-pipeline` console script: status, search before any index, argument errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from research_pipeline import cli
from research_pipeline.lib.core import store, util

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
         "quarantined_at": util.utcnow()}
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
    # A well-formed URL of a server that does not answer: named, with what to check, no traceback.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    monkeypatch.setenv("RP_DATABASE_URL", f"postgresql+psycopg://rp:hunter2@127.0.0.1:{dead_port}/rp")
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert "RP_DATABASE_URL" in err and "cannot open the database" in err and "hunter2" not in err
    assert "Traceback" not in err
    monkeypatch.delenv("RP_DATABASE_URL")
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "corpus.jsonl" in capsys.readouterr().err
    assert cli.main(["search", "x", "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err


def test_demo_prepares_dagster_home_without_overwriting(monkeypatch, tmp_path):
    monkeypatch.setenv("RP_HOME", str(tmp_path / "rp"))
    # Empty counts as unset; setenv (unlike delenv of an absent variable) restores it afterwards.
    monkeypatch.setenv("DAGSTER_HOME", "")
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
#: The tests on the demo-built store: one xdist worker where loadgroup scheduling honours it
#: (the `published` fixture shares one build across workers either way).
PUBLISHED_GROUP = pytest.mark.xdist_group("cli_published_store")
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
def published(tmp_path_factory, worker_id):
    """A store built by `research-pipeline demo` (the console script, so reindex_job through Dagster)
    on PUBLISHED_SAMPLE, with the example queries that those papers answer.

    Built once per test run: xdist workers share it through this run's temp root, the first
    one building it under a file lock while the others wait (the build takes a minute).
    """
    import fcntl

    base = tmp_path_factory.getbasetemp()
    shared = (base if worker_id == "master" else base.parent) / "cli_published"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = shared / "published.json"
        if not done.exists():
            done.write_text(json.dumps(_build_published(shared)))
    return json.loads(done.read_text())


def _build_published(root: Path) -> dict:
    import csv
    import re
    import shutil

    from research_pipeline_tests.shared import DEMO_PAPERS

    inbox = root / "inbox"
    inbox.mkdir()
    for name in PUBLISHED_SAMPLE:
        shutil.copy(DEMO_PAPERS / name, inbox / name)
    queries = [
        (q, [f for f in files if f in PUBLISHED_SAMPLE])
        for q, files in cli.read_queries(REPO / "examples" / "queries.tsv")
        if set(files) & set(PUBLISHED_SAMPLE)
    ]
    with (root / "queries.tsv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(["query", "files"])
        writer.writerows((q, ";".join(files)) for q, files in queries)
    env = dict(os.environ, RP_HOME=str(root / "rp"), RP_INBOX=str(inbox),
               # The shared 2-core machine makes latency unpredictable; the latency gate has its own tests.
               RP_GATE_LATENCY_P95_MS="600000")
    for name in ("DAGSTER_HOME", "RP_DATABASE_URL", "RP_OBJECT_STORE_URL", "RP_REDIS_URL"):
        env.pop(name, None)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("research-pipeline")), "demo", "--queries", str(root / "queries.tsv")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = re.search(r"demo: (\d+)/(\d+) expected papers in the top 5 over (\d+) queries", proc.stdout)
    assert summary, proc.stdout[-3000:]
    assert int(summary.group(2)) == sum(len(f) for _, f in queries)
    assert int(summary.group(3)) == len(queries)
    url = f"sqlite:///{root / 'rp' / 'rp.db'}"
    engine = store.make_engine(url)
    live = store.counts(engine)["live_generation"]
    engine.dispose()
    assert live, "the demo published a generation"
    return {
        "url": url, "objects": str(root / "rp" / "objects"), "home": str(root / "rp"), "gen_id": live,
        "dagster_home": str(root / "rp" / "dagster"), "found": int(summary.group(1)), "stdout": proc.stdout,
    }


@PUBLISHED_GROUP
def test_demo_runs_reindex_job_on_the_dagster_instance(published):
    import dagster as dg
    from dagster._core.instance.ref import InstanceRef

    assert (Path(published["dagster_home"]) / "dagster.yaml").is_file()
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(published["dagster_home"])) as instance:
        runs = instance.get_runs()
    assert [(r.job_name, r.status) for r in runs] == [("reindex_job", dg.DagsterRunStatus.SUCCESS)]
    assert "live generation: " + published["gen_id"] in published["stdout"]
    assert published["found"] >= 1, "at least one example query finds its paper in the top 5"


@pytest.fixture
def published_env(monkeypatch, published):
    monkeypatch.setenv("RP_HOME", published["home"])
    monkeypatch.setenv("RP_DATABASE_URL", published["url"])
    monkeypatch.setenv("RP_OBJECT_STORE_URL", published["objects"])
    return published


def _example_query(filename: str) -> str:
    return next(q for q, files in cli.read_queries(REPO / "examples" / "queries.tsv") if filename in files)


@PUBLISHED_GROUP
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
    assert _example_query(target) in _logged_queries(published_env["url"]), "CLI searches feed the query log"


def _logged_queries(url: str) -> set[str]:
    import sqlalchemy as sa

    engine = store.make_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.select(store.query_log.c.query)).scalars())
    finally:
        engine.dispose()


@PUBLISHED_GROUP
def test_search_filters_by_year(published_env, capsys):
    assert cli.main(["search", "python", "--json"]) == 0
    years = [h["year"] for h in json.loads(capsys.readouterr().out)["results"] if h["year"]]
    assert years, "the sample papers carry a year"
    newest = max(years)
    assert cli.main(["search", "python", "--year-min", str(newest), "--json"]) == 0
    filtered = json.loads(capsys.readouterr().out)["results"]
    assert filtered and all(h["year"] is not None and h["year"] >= newest for h in filtered)


@PUBLISHED_GROUP
@pytest.mark.parametrize("query", JUNK_QUERIES[:4:2] + JUNK_QUERIES[-1:])
def test_junk_queries_never_raise(published_env, capsys, query):
    # `--` ends the options, so a query that starts with "-" is still a query.
    assert cli.main(["search", "--json", "--", query]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["results"], list)


def _tiny_beir(src: Path, dst: Path, n_queries: int = 2, n_other: int = 8) -> tuple[int, int]:
    """A BEIR folder with the first n test queries of `src`, their relevant documents and n_other
    more documents; returns (queries, documents)."""
    with (src / "qrels" / "test.tsv").open() as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh][1:]
    queries: list[str] = []
    for qid, _, _ in rows:
        if qid not in queries:
            queries.append(qid)
        if len(queries) == n_queries:
            break
    qrels = [r for r in rows if r[0] in queries]
    relevant = {r[1] for r in qrels}
    docs, others = [], 0
    with (src / "corpus.jsonl").open() as fh:
        for line in fh:
            doc_id = json.loads(line)["_id"]
            if doc_id in relevant or others < n_other:
                others += doc_id not in relevant
                docs.append(line)
    (dst / "qrels").mkdir(parents=True)
    (dst / "corpus.jsonl").write_text("".join(docs))
    with (src / "queries.jsonl").open() as fh:
        (dst / "queries.jsonl").write_text("".join(line for line in fh if json.loads(line)["_id"] in queries))
    (dst / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in qrels))
    return len(queries), len(docs)


@PUBLISHED_GROUP  # in-process: shares the loaded model with the search tests when on the same worker
def test_eval_json_prints_exactly_one_object(tmp_path, monkeypatch, capsys):
    from research_pipeline_tests.shared import IR, require_shared

    n_queries, _ = _tiny_beir(require_shared(IR / "scifact"), tmp_path / "tiny")
    monkeypatch.setenv("RP_HOME", str(tmp_path / "rp"))
    assert cli.main(["eval", str(tmp_path / "tiny"), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert set(out) == {"ndcg@10", "recall@100", "mrr@10", "queries", "latency_ms_p50", "latency_ms_p95"}
    assert out["queries"] == n_queries
    for key in ("ndcg@10", "recall@100", "mrr@10"):
        assert 0.0 <= out[key] <= 1.0
    # Every relevant document is in a 10-document corpus, so all of them are in the top 100.
    assert out["recall@100"] == 1.0
    assert 0 < out["latency_ms_p50"] <= out["latency_ms_p95"]
    assert (tmp_path / "rp" / "eval" / "tiny").is_dir(), "the ingested corpus is cached under RP_HOME"
