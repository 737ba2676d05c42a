"""QueryCache (in-process LRU and the real Redis on 127.0.0.1:6379) and the buffered query log."""

import threading
import uuid

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline.lib.search.cache import (
    QueryCache,
    cache_key,
    filters_dict,
    normalise_query,
)
from research_pipeline.lib.search.querylog import QueryLog, latency_summary, top_queries

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["lru", "redis"])
def cache(request):
    """A fresh cache on each backend; the Redis one uses a unique key prefix and removes its keys."""
    if request.param == "lru":
        c = QueryCache(max_entries=100)
        yield c
        return
    c = QueryCache(redis_url=REDIS_URL, prefix=f"rp:test:{uuid.uuid4().hex}:", ttl_s=60)
    c._redis.ping()  # the test fails (not skips) when Redis is down
    yield c
    c.clear()
    c.close()


HITS = [{"doc_id": "a" * 64, "title": "PyCM", "score": 0.5, "authors": ["A. B."], "year": 2018}]


def test_miss_then_hit_and_ratio(cache):
    key = cache_key("confusion matrix", None, 10, "hybrid", "gen-1")
    assert cache.get(key) is None
    cache.put(key, HITS)
    assert cache.get(key) == HITS
    assert cache.get(key) == HITS
    stats = cache.stats()
    assert (stats["hits"], stats["misses"]) == (2, 1)
    assert stats["hit_ratio"] == pytest.approx(2 / 3, abs=1e-3)
    assert stats["backend"] == ("redis" if cache._redis is not None else "lru")
    assert len(cache) == 1


def test_new_generation_is_a_miss(cache):
    cache.put(cache_key("confusion matrix", None, 10, "hybrid", "gen-1"), HITS)
    assert cache.get(cache_key("confusion matrix", None, 10, "hybrid", "gen-2")) is None
    assert cache.get(cache_key("confusion matrix", None, 10, "hybrid", "gen-1")) == HITS


def test_key_normalises_query_but_keeps_everything_that_changes_results():
    base = cache_key("Confusion  Matrix", {"year_min": 2018, "author": None}, 10, "hybrid", "g")
    assert base == cache_key(" confusion matrix ", {"year_min": 2018}, 10, "hybrid", "g")
    assert base != cache_key("confusion matrix", {"year_min": 2019}, 10, "hybrid", "g")
    assert base != cache_key("confusion matrix", {"year_min": 2018}, 5, "hybrid", "g")
    assert base != cache_key("confusion matrix", {"year_min": 2018}, 10, "bm25", "g")
    # Junk input is still a key, never an exception.
    assert len(cache_key('"\x00 AND OR NEAR( *', None, 10, "hybrid", None)) == 64
    assert normalise_query("ＡＢＣ\tdef") == "abc def"
    assert filters_dict(None) == {}


def test_lru_evicts_least_recently_used():
    c = QueryCache(max_entries=2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert c.get("b") is None
    assert (c.get("a"), c.get("c")) == (1, 3)


def test_redis_outage_degrades_to_misses_and_the_fallback_copy():
    c = QueryCache(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    assert c.get("never put") is None
    c.put("k", HITS)
    assert c.get("k") == HITS  # the process's own copy answers while Redis fails
    assert c.stats()["errors"] == 3
    assert QueryCache(redis_url="redis://127.0.0.1:1/0", fallback_entries=0).get("k") is None


def test_the_fallback_copy_answers_only_while_redis_fails(tmp_path):
    """A private redis-server, stopped mid-test: while it answers, Redis alone decides (a key
    deleted there is a miss although the process kept a copy); once it is down, the copy answers."""
    import socket
    import subprocess
    import time

    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        other = redis.Redis(port=port, socket_timeout=2)
        deadline = time.monotonic() + 30
        while True:
            try:
                other.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.05)  # polling the server's own answer, bounded
        c = QueryCache(redis_url=f"redis://127.0.0.1:{port}/0", prefix="rp:fallback:")
        c.put("a", HITS)
        c.put("b", HITS)
        other.delete("rp:fallback:a")
        assert c.get("a") is None and c.get("b") == HITS and c.stats()["errors"] == 0
    finally:
        proc.terminate()
        proc.wait(30)
    assert c.get("a") == HITS and c.get("b") == HITS  # Redis is down: the copies answer
    assert c.get("c") is None
    assert c.stats()["errors"] == 3


def test_query_log_buffers_flushes_on_close_and_ranks(engine):
    qlog = QueryLog(engine, flush_interval_s=60)  # the test's close(), not the timer, must flush
    threads = [
        threading.Thread(
            target=lambda i=i: [
                qlog.log("confusion matrix", None, 5.0 + i, "gen-1", 3, cache_hit=bool(j % 2)) for j in range(5)
            ]
        )
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    qlog.log("dark matter", {"year_min": 2020}, 7.0, "gen-1", 2)
    qlog.log("dark matter", {"year_min": 2020}, 9.0, "gen-1", 2)
    qlog.log("nothing found", None, 1.0, "gen-1", 0)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.query_log)).scalar() == 0
    qlog.close()
    assert qlog.written == 23
    top = top_queries(engine, 10)
    assert [t["query"] for t in top] == ["confusion matrix", "dark matter"]
    assert top[0]["count"] == 20
    assert top[1]["filters"] == {"year_min": 2020}
    summary = latency_summary(engine, "gen-1")
    assert summary["searches"] == 23 and summary["cache_hits"] == 8
    assert summary["p50"] <= summary["p95"] <= summary["max"] == 9.0


def test_query_log_background_thread_flushes(engine):
    with QueryLog(engine, flush_interval_s=0.05) as qlog:
        qlog.log("graph reordering", None, 3.0, "g", 1)
        done = threading.Event()
        for _ in range(200):
            with engine.connect() as conn:
                if conn.execute(sa.select(sa.func.count()).select_from(store.query_log)).scalar() == 1:
                    done.set()
                    break
            done.wait(0.05)
        assert done.is_set(), "the flush thread did not write the buffered row"
