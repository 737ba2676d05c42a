"""The search service over HTTP on both backends: answers, validation, backpressure, probes, logs."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading

import pytest
import sqlalchemy as sa

from research_pipeline.api.app import ServiceOptions
from research_pipeline.lib.core import store
from research_pipeline_tests.shared import API_GROUP, running_service

pytestmark = [API_GROUP, pytest.mark.slow]

QUERY = "multi-class confusion matrix statistics"
#: Queries a search box receives: operators, quotes, NUL, SQL, markup, scripts, huge, empty.
HOSTILE_QUERIES = (
    '"unbalanced quote', "AND OR NOT", "title:* ^2 ~~ (((", "'); DROP TABLE documents; --",
    "     ", "", "Üñíçødé ☃ 数据", "深度学习 神经网络", "🙂🔥💥 emoji only", "nul\x00byte\x00",
    "\x00", "-" * 500, "a" * 10_240, ("confusion matrix " * 700)[:10_240], '<script>alert(1)</script>',
    "%00%27%22", "\\", "NEAR(a b)", "a* OR b*", "col:val", '"" "" ""', "\u202e\u200b\ufeff",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
)
#: Parameters that must answer 400 with a message, never 500.
BAD_PARAMS = (
    {"k": "0"}, {"k": "101"}, {"k": "ten"}, {"k": "1e3"}, {"k": "99999999999999999999"},
    {"year_min": "99999999999999999999"}, {"year_min": "-99999999999999999999"}, {"year_max": "soon"},
    {"year_min": "2020", "year_max": "2010"}, {"year_min": "1.5"}, {"mode": "fuzzy"}, {"mode": "\x00"},
    {"author": "x" * 201},
)


def test_search_answers_caches_and_counts(deployment):
    settings, facts = deployment
    with running_service(settings, ServiceOptions(concurrency=2)) as svc:
        assert svc.get("/healthz")[0] == 200
        status, ready = svc.json("/readyz")
        assert status == 200 and ready["generation"] == facts["gen_id"]

        status, answer = svc.json("/search", {"q": QUERY, "k": 3})
        assert status == 200 and answer["generation"] == facts["gen_id"]
        assert answer["results"][0]["doc_id"] == facts["pycm"] and len(answer["results"]) <= 3
        assert answer["cache_hit"] is False
        status, repeat = svc.json("/search", {"q": QUERY.upper(), "k": 3})
        assert repeat["cache_hit"] is True and repeat["results"] == answer["results"]
        status, filtered = svc.json("/search", {"q": QUERY, "year_min": 2100})
        assert status == 200 and filtered["results"] == []
        assert svc.get("/search", {"q": "x", "k": 0})[0] == 400
        # Searches run in parallel, each on one intra-op torch thread (set in every search
        # thread; no query flips the count back).
        import torch

        counts = {svc.service.pool.submit(torch.get_num_threads).result() for _ in range(8)}
        assert counts == {1}

        status, _, body = svc.get("/metrics")
        text = body.decode()
        assert status == 200 and "rp_database_up 1.0" in text
        assert 'rp_search_requests_total{outcome="ok"} 3.0' in text
        assert 'rp_search_requests_total{outcome="bad_request"} 1.0' in text
        assert "rp_search_latency_seconds_count 3.0" in text
        assert 'rp_search_latency_seconds_bucket{le="2.0"}' in text
        assert "rp_search_cache_hits_total 1.0" in text
        assert 'rp_http_errors_total{route="/search",status="400"} 1.0' in text
        assert 'rp_http_requests_total{route="/search",status="200"} 3.0' in text
        assert 'rp_http_requests_total{route="/search",status="400"} 1.0' in text
        assert "rp_live_generation_age_seconds " in text
        # The memory alert's two series: this process's RSS and its limit.
        rss = float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.M).group(1))
        limit = float(re.search(r"^rp_memory_limit_bytes (\S+)$", text, re.M).group(1))
        assert 0 < rss < limit
        with store.make_engine(settings.database_url).connect() as conn:
            n_docs = conn.execute(sa.select(sa.func.count()).select_from(store.documents)).scalar()
        assert f"rp_documents {float(n_docs)}" in text

        status, schema = svc.json("/openapi.json")
        assert status == 200 and schema["openapi"].startswith("3.")
        params = {p["name"] for p in schema["paths"]["/search"]["get"]["parameters"]}
        assert {"q", "k", "mode", "year_min", "year_max", "author"} <= params
    engine = store.make_engine(settings.database_url)
    with engine.connect() as conn:
        logged = set(conn.execute(sa.select(store.query_log.c.query)).scalars())
    engine.dispose()
    assert QUERY in logged, "stopping the service flushes the query log"


def test_hostile_queries_and_bad_parameters_never_answer_500(deployment):
    settings, _ = deployment
    with running_service(settings, ServiceOptions(concurrency=2)) as svc:
        for q in HOSTILE_QUERIES:
            for extra in ({}, {"author": q[:200]}, {"mode": "bm25"}):
                status, body = svc.json("/search", {"q": q, **extra})
                assert status == 200, (q, extra, body)
                assert isinstance(body["results"], list)
            status, _, _ = svc.get("/", {"q": q, "author": q[:200]})
            assert status == 200, q
        for bad in BAD_PARAMS:
            status, body = svc.json("/search", {"q": QUERY, **bad})
            assert status == 400, (bad, body)
            name = next(iter(bad))
            assert name in body["error"], body
        # Raw bytes that are not UTF-8, and a path that is not a route.
        assert svc.get("/search?q=%ff%fe%00&k=%ff")[0] == 400
        assert svc.get("/search?q=%ff%fe%00")[0] == 200
        assert svc.get("/search?q=%ED%A0%BD+lone+surrogate")[0] == 200
        assert svc.get("/nope")[0] == 404


def test_full_queue_answers_503_and_probes_do_not_wait(deployment):
    settings, _ = deployment
    with running_service(settings, ServiceOptions(concurrency=1, queue=0)) as svc:
        release = threading.Event()
        blocker = svc.service.submit(release.wait, 60)
        try:
            status, headers, body = svc.get("/search", {"q": QUERY})
            assert status == 503 and headers["retry-after"] == "1", body
            assert "busy" in json.loads(body)["error"]
            # The only search thread is taken: probes and metrics still answer.
            assert svc.get("/readyz", timeout=5)[0] == 200
            assert svc.get("/healthz", timeout=5)[0] == 200
            status, _, raw = svc.get("/metrics", timeout=5)
            assert status == 200 and "rp_search_admitted 1.0" in raw.decode(), "the blocked search is counted"
        finally:
            release.set()
            blocker.result(10)
        assert svc.get("/search", {"q": QUERY})[0] == 200
        text = svc.get("/metrics")[2].decode()
        assert "rp_search_rejected_total 1.0" in text
        assert "rp_search_admitted 0.0" in text, "finished searches are released"
        assert 'rp_search_requests_total{outcome="busy"} 1.0' in text


def test_a_search_past_the_timeout_answers_504(deployment):
    settings, _ = deployment
    with running_service(settings, ServiceOptions(concurrency=1, queue=1, timeout_s=0.5)) as svc:
        release = threading.Event()
        blocker = svc.service.submit(release.wait, 60)
        try:
            status, body = svc.json("/search", {"q": QUERY})
            assert status == 504 and "longer than 0.5 s" in body["error"]
        finally:
            release.set()
            blocker.result(10)
        assert svc.json("/search", {"q": QUERY})[0] == 200


def _silent_listener() -> socket.socket:
    """A TCP port that accepts connections and never answers (a hung Redis)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def test_redis_down_or_hung_degrades_to_uncached_answers_then_the_fallback_copy(deployment):
    import dataclasses

    settings, facts = deployment
    if facts["backend"] != "sqlite":
        pytest.skip("the cache path does not depend on the database backend")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    down_port = closed.getsockname()[1]
    closed.close()
    hung = _silent_listener()
    try:
        for url in (f"redis://127.0.0.1:{down_port}/0", f"redis://127.0.0.1:{hung.getsockname()[1]}/0"):
            with running_service(dataclasses.replace(settings, redis_url=url)) as svc:
                hits = []
                for _ in range(2):
                    status, body = svc.json("/search", {"q": QUERY})
                    assert status == 200 and body["results"], body
                    hits.append(body["cache_hit"])
                # The first is searched; the repeat comes from the process's own copy.
                assert hits == [False, True], hits
                assert svc.service.cache.errors >= 2
    finally:
        hung.close()


def test_access_log_has_one_line_per_request_with_its_fields(deployment, caplog):
    settings, facts = deployment
    if facts["backend"] != "sqlite":
        pytest.skip("the access log does not depend on the database backend")
    caplog.set_level(logging.INFO, logger="research_pipeline.api.access")
    with running_service(settings) as svc:
        status, headers, _ = svc.get("/search?q=confusion", headers={"X-Request-ID": "trace-42"})
        assert status == 200 and headers["x-request-id"] == "trace-42"
        status, headers, _ = svc.get("/search?k=0", headers={"X-Request-ID": "bad id with spaces"})
        assert status == 400 and len(headers["x-request-id"]) == 32
        svc.get("/readyz")
    lines = [r for r in caplog.records if r.name == "research_pipeline.api.access"]
    assert [(r.route, r.status) for r in lines] == [("/search", 200), ("/search", 400), ("/readyz", 200)]
    first = lines[0]
    assert first.request_id == "trace-42" and first.generation == facts["gen_id"]
    assert first.cache_hit is False and first.ms > 0
    assert lines[1].request_id == headers["x-request-id"] and lines[1].generation is None


def test_access_log_lines_are_json_with_structlog(deployment):
    import io

    from research_pipeline import logs

    settings, facts = deployment
    if facts["backend"] != "sqlite":
        pytest.skip("the access log does not depend on the database backend")
    stream = io.StringIO()
    handler = logs.configure("json", "INFO", stream=stream)
    try:
        with running_service(settings) as svc:
            svc.get("/search?q=confusion+matrix")
    finally:
        logging.getLogger().removeHandler(handler)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [r for r in records if r.get("logger") == "research_pipeline.api.access"]
    assert len(access) == 1
    assert {"route", "status", "ms", "cache_hit", "generation", "request_id"} <= set(access[0])
    assert access[0]["generation"] == facts["gen_id"] and access[0]["status"] == 200


def test_live_but_not_ready_without_a_database(tmp_path, pg_server):
    from research_pipeline.config import Settings

    # A PostgreSQL database that does not exist: the process is up, but it cannot answer searches.
    missing = sa.engine.make_url(pg_server).set(database="rp_test_no_such_database").render_as_string(hide_password=False)
    settings = Settings(home=tmp_path, inbox=tmp_path, database_url=missing, object_store_url=str(tmp_path / "objects"))
    with running_service(settings) as svc:
        assert svc.get("/healthz")[0] == 200
        status, body = svc.json("/readyz")
        assert status == 503 and "database unreachable" in body["reason"] and "RP_DATABASE_URL" in body["reason"]
        status, _, raw = svc.get("/search", {"q": "anything"})
        assert status == 503 and "database unreachable" in json.loads(raw)["error"]
        status, _, raw = svc.get("/metrics")
        assert status == 200 and "rp_database_up 0.0" in raw.decode()


def test_a_replica_on_a_read_only_database_logs_searches_to_the_query_log_database(deployment):
    """A replica reading a read-only standby logs its searches to RP_QUERY_LOG_DATABASE_URL
    (the primary); without it the standby refuses the rows and they are lost."""
    import dataclasses
    import uuid

    from research_pipeline_tests.shared import pg_admin

    settings, facts = deployment
    if facts["backend"] != "postgresql":
        pytest.skip("read-only standbys are PostgreSQL's")
    primary = sa.engine.make_url(settings.database_url)
    role = f"rp_reader_{uuid.uuid4().hex[:8]}"
    with pg_admin().connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
        conn.execute(sa.text(f'ALTER ROLE "{role}" SET default_transaction_read_only = on'))
    owner = store.make_engine(settings.database_url)
    with owner.begin() as conn:
        conn.execute(sa.text(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{role}"'))
    reader = primary.set(username=role).render_as_string(hide_password=False)

    def logged(query: str) -> int:
        with owner.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(store.query_log)
                                .where(store.query_log.c.query == query)).scalar_one()

    try:
        cases = {"standby only": None, "query log on the primary": settings.database_url}
        for i, (case, log_url) in enumerate(cases.items()):
            query = f"{QUERY} {role} {i}"
            replica = dataclasses.replace(settings, database_url=reader, query_log_database_url=log_url)
            with running_service(replica) as svc:
                status, body = svc.json("/search", {"q": query})
                assert status == 200 and body["results"], (case, body)
            assert logged(query) == (0 if log_url is None else 1), case
    finally:
        with owner.begin() as conn:
            conn.execute(sa.text(f'DROP OWNED BY "{role}"'))
        owner.dispose()
        with pg_admin().connect() as conn:
            conn.execute(sa.text(f'DROP ROLE "{role}"'))


def test_a_live_generation_that_does_not_load_leaves_the_replica_serving_the_previous_one(
    tmp_path, tmp_path_factory, embedder
):
    """The pointer moves to a generation whose vector file is gone (an object-store outage, a bad
    delete): the replica keeps answering from the generation it has loaded and says why in
    /readyz; once a generation that loads goes live, it serves that one."""
    import time

    from research_pipeline.config import Settings
    from research_pipeline.lib.core.objectstore import LocalObjectStore
    from research_pipeline.lib.release import publish, searchers
    from research_pipeline_tests.shared import gated, load_corpus_rows, sample_corpus

    url = f"sqlite:///{tmp_path / 'rp.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    load_corpus_rows(engine, sample_corpus(tmp_path_factory))
    objects = LocalObjectStore(tmp_path / "objects")
    first = gated(engine, objects, embedder, probes=1)["gen_id"]
    publish.publish(engine, first, store=objects)
    settings = Settings(home=tmp_path, inbox=tmp_path, database_url=url, object_store_url=str(objects.root))

    def wait_readyz(predicate, what: str) -> dict:
        deadline, body = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            status, body = svc.json("/readyz")
            if predicate(status, body):
                return body
            time.sleep(0.1)  # polling the probe the replica answers; bounded
        raise AssertionError(f"{what}: last /readyz {body}")

    with running_service(settings, ServiceOptions(readiness_interval_s=0.2)) as svc:
        wait_readyz(lambda st, b: st == 200 and b["generation"] == first, "the first generation never served")
        broken = gated(engine, objects, embedder, probes=1)
        objects.delete(f"{broken['vector_key'].rsplit('/', 1)[0]}/index.faiss")
        searchers.forget_vectors(broken["vector_key"])  # its gates loaded it into this process
        publish.publish(engine, broken["gen_id"], store=objects)
        body = wait_readyz(lambda st, b: broken["gen_id"] in b.get("reason", ""), "the broken generation was not tried")
        assert body["status"] == "ready" and body["generation"] == first, body
        assert "does not load" in body["reason"], body
        status, answer = svc.json("/search", {"q": "confusion matrix"})
        assert status == 200 and answer["generation"] == first and answer["results"], answer
        fixed = gated(engine, objects, embedder, probes=1)["gen_id"]
        publish.publish(engine, fixed, store=objects)
        body = wait_readyz(lambda st, b: b.get("generation") == fixed, "the next good generation never served")
        assert body["reason"] == "ready"
    engine.dispose()
