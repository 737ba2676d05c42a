"""A full disk while a generation is built: recognised in every shape it arrives in, cleaned up,
reported with the volume's free space, the live generation untouched.

The disks are real: a tmpfs of fixed size (mounting needs root; skipped otherwise), SQLite
stopped by its own page limit, on SQLite and PostgreSQL corpora.
"""

import errno
import os
import sqlite3

import psycopg
import pytest
import sqlalchemy as sa

from bench import faults
from bench.faults import Tmpfs
from research_pipeline.lib.core import diskspace, store
from research_pipeline.lib.core.objectstore import LocalObjectStore
from research_pipeline.lib.core.util import sha256_file
from research_pipeline.lib.release import build, fulltext, publish, registry, searchers
from research_pipeline_tests.shared import SEARCH_GROUP, gated, load_corpus_rows, sample_corpus

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs of fixed size needs root")


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs of fixed size needs root")
    with Tmpfs(tmp_path / "disk", 8) as path:
        yield path


def fill(disk, leave: int = 16 << 10) -> None:
    faults.fill(disk, leave)


def test_a_real_enospc_is_recognised(small_disk):
    fill(small_disk, leave=0)
    with pytest.raises(OSError) as info:
        with open(small_disk / "more", "wb") as fh:
            fh.write(b"x" * (1 << 20))
            fh.flush()
    assert info.value.errno == errno.ENOSPC
    assert diskspace.is_out_of_space(info.value)


def test_sqlite_full_through_sqlalchemy_is_recognised(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with engine.begin() as conn:
        conn.execute(sa.text("create table t (x text)"))
    with pytest.raises(sa.exc.OperationalError) as info:
        with engine.begin() as conn:
            conn.exec_driver_sql("pragma max_page_count = 3")
            conn.execute(sa.text("insert into t values (:x)"), [{"x": "y" * 4000}] * 10)
    assert isinstance(info.value.orig, sqlite3.OperationalError)
    assert diskspace.is_out_of_space(info.value)
    engine.dispose()


def test_other_errors_are_not_out_of_space(tmp_path):
    assert not diskspace.is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    assert not diskspace.is_out_of_space(ValueError("bad query"))
    assert diskspace.is_out_of_space(psycopg.errors.DiskFull("could not extend file"))
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with pytest.raises(sa.exc.OperationalError) as info, engine.connect() as conn:
        conn.execute(sa.text("select * from missing"))
    assert not diskspace.is_out_of_space(info.value)
    engine.dispose()


def test_describe_free_names_each_volume_once(tmp_path, small_disk):
    text = diskspace.describe_free([("object store", small_disk / "objects" / "not-yet"), ("database", small_disk),
                                    ("scratch", tmp_path), ("unset", None)])  # fmt: skip
    assert text.count("free of") == 2, text
    assert "object store, database (" in text and "free of 8.0 MiB" in text, text
    assert "unset" not in text


@pytest.mark.xdist_group(SEARCH_GROUP)
def test_a_full_disk_fails_both_halves_cleanly_and_keeps_the_live_generation(engine, small_disk, embedder,
                                                                            tmp_path_factory):  # fmt: skip
    load_corpus_rows(engine, sample_corpus(tmp_path_factory))
    obj = LocalObjectStore(small_disk / "objects")
    live = gated(engine, obj, embedder)["gen_id"]
    publish.publish(engine, live, store=obj)
    live_files = {p: sha256_file(p) for p in (obj.root / registry.vector_prefix(live)).rglob("*") if p.is_file()}
    fill(small_disk)

    gen_id = registry.new_generation_id()
    with pytest.raises(build.OutOfSpaceError) as fts_err:
        build.build_fts_part(engine, gen_id, embedder.model_id, obj)
    with pytest.raises(build.OutOfSpaceError) as vec_err:
        build.build_vector_part(engine, obj, embedder, gen_id)
    for err in (fts_err.value, vec_err.value):
        message = str(err)
        assert "free of 8.0 MiB" in message and str(small_disk) in message, message
        assert f"live generation {live} is untouched" in message and "reindex_job" in message, message
        assert diskspace.is_out_of_space(err.__cause__)
    assert "full-text index" in str(fts_err.value) and "vector index" in str(vec_err.value)
    assert not [k for k in obj.list(registry.vector_prefix(gen_id) + "/")], "partial files were left"
    assert registry.fts_table_name(gen_id) not in sa.inspect(engine).get_table_names()
    assert store.live_generation(engine)["gen_id"] == live
    assert {p: sha256_file(p) for p in live_files} == live_files
    searcher = searchers.open_searcher(engine, obj, embedder, cache_dir=tmp_path_factory.mktemp("cache"))
    assert searcher.gen_id == live and searcher.search("confusion matrix", k=3)

    (small_disk / "ballast").unlink()  # space freed: the same generation builds
    build.build_fts_part(engine, gen_id, embedder.model_id, obj)
    part = build.build_vector_part(engine, obj, embedder, gen_id)
    assert part.status == registry.GenerationStatus.CANDIDATE
    fulltext.read_manifest(obj, fulltext.manifest_key(gen_id))
