"""The whole migration of a real demo deployment to PostgreSQL + S3 (moto's server over HTTP).

The source is built by the pipeline's own code (ingest, chunk, embed, index, publish) from
demo papers; the target is a fresh PostgreSQL database and bucket per test. S3 faults are
injected into the real HTTP client with a botocore `before-send` hook.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid

import boto3
import dagster as dg
import pytest
import sqlalchemy as sa
from boto3.exceptions import S3UploadFailedError
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError
from dagster_aws.s3 import S3Resource

from research_pipeline.defs.migration.assets import (
    migrated_objects,
    migrated_rows,
    migration,
    migration_cutover,
)
from research_pipeline.defs.migration.checks import migration_verified
from research_pipeline.defs.migration.resources import MigrationTargetResource
from research_pipeline.defs.resources import (
    DatabaseResource,
    InboxResource,
    ObjectStoreResource,
)
from research_pipeline.lib.core import store, util
from research_pipeline.lib.core.objectstore import LocalObjectStore, S3ObjectStore
from research_pipeline.lib.migration import s3 as s3_module
from research_pipeline.lib.migration.cutover import CUTOVER_KEY, cutover, republish
from research_pipeline.lib.migration.endpoints import (
    MigrationSource,
    MigrationTarget,
    open_target_engine,
)
from research_pipeline.lib.migration.errors import MigrationError
from research_pipeline.lib.migration.objects import migrate_objects
from research_pipeline.lib.migration.report import MigrationNotVerified
from research_pipeline.lib.migration.rows import migrate_rows
from research_pipeline.lib.migration.tables import TABLE_SPECS
from research_pipeline.lib.migration.verify import verify
from research_pipeline.lib.release import searchers
from research_pipeline_tests.shared import (
    DEMO_PAPERS,
    REPO,
    drop_pg_database,
    make_pg_database,
)

# Kept on one worker where loadgroup honours it (then the moto server starts once); the demo
# source is shared across workers either way (see conftest.demo_source).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("migration_s3")]


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_kwargs):
        yield self.body


class Faults:
    """Answers a share of S3 calls with 503 before they are sent (the rest go over HTTP)."""

    def __init__(self, share: float = 0.0, first: int = 0, seed: int = 1):
        self.share, self.first, self.rng = share, first, random.Random(seed)
        self.calls = self.injected = 0

    def __call__(self, request, **_kwargs):  # noqa: ANN001
        self.calls += 1
        if self.calls <= self.first or self.rng.random() < self.share:
            self.injected += 1
            body = b"<Error><Code>ServiceUnavailable</Code><Message>injected by the test</Message></Error>"
            return AWSResponse(request.url, 503, {"Content-Type": "application/xml"}, _Raw(body))
        return None

    def attach(self, client):  # noqa: ANN001
        client.meta.events.register("before-send.s3", self)
        return client


def _client(endpoint: str, attempts: int = 10):
    return boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1",
        config=Config(retries={"max_attempts": attempts, "mode": "standard"}),
    )


@pytest.fixture
def target_url(pg_server):
    url = make_pg_database("rp_migration")
    yield url
    drop_pg_database(url)


@pytest.fixture
def bucket() -> str:
    return f"rp-migration-{uuid.uuid4().hex[:10]}"


def _target(engine, s3, bucket: str, prefix: str = "rp") -> MigrationTarget:  # noqa: ANN001
    return MigrationTarget(engine, s3, bucket, prefix)


def _migrate_everything(source: MigrationSource, target: MigrationTarget) -> tuple[int, int]:
    rows = sent = 0
    for shard in store.SHARDS:
        rows += migrate_rows(source, target, shard).rows
        sent += migrate_objects(source, target, shard).bytes
    return rows, sent


@pytest.fixture
def source(demo_source):
    src = MigrationSource.open(demo_source.url, demo_source.store, demo_source.inbox)
    yield src
    src.engine.dispose()


def _rerun_on_s3_errors(fn, runs: int = 5):  # noqa: ANN001, ANN202
    """(fn(), how many runs it took): `fn` is run again after an S3 error, as a failed job is."""
    for run in range(1, runs):
        try:
            return fn(), run
        except (ClientError, S3UploadFailedError):
            pass
    return fn(), runs


def _results(searcher, queries: list[str], mode: str) -> list[list[tuple[str, str, float]]]:  # noqa: ANN001
    return [[(h.doc_id, h.chunk_id, h.score) for h in searcher.search(q, k=10, mode=mode)] for q in queries]


def test_migrated_deployment_verifies_under_faults_and_searches_the_same(
    demo_source, source, target_url, bucket, s3_endpoint, embedder
):
    faults = Faults(share=0.3, seed=11)
    engine = open_target_engine(target_url, demo_source.url)
    # With 30% of calls failing, botocore's retry quota runs dry and a shard can still fail
    # after the pipeline's own retries; the job is then run again (Dagster's retry policy, or
    # the user), with a fresh client, and resumes where it stopped.
    _, runs = _rerun_on_s3_errors(
        lambda: _migrate_everything(source, _target(engine, faults.attach(_client(s3_endpoint)), bucket))
    )
    assert faults.injected > 0, "the fault hook never fired"

    report, _ = _rerun_on_s3_errors(
        lambda: verify(source, _target(engine, faults.attach(_client(s3_endpoint)), bucket), deep=True)
    )
    assert report.ok, report.summary()
    print(f"{faults.injected} of {faults.calls} S3 calls failed; migrated in {runs} run(s)")
    with demo_source.engine.connect() as conn:
        total = sum(conn.execute(sa.select(sa.func.count()).select_from(t.table)).scalar_one() for t in TABLE_SPECS)
    assert report.rows == total

    s3_store = S3ObjectStore(bucket, "rp", client=_client(s3_endpoint))
    keys = set(s3_store.list())
    with demo_source.engine.connect() as conn:
        doc_ids = conn.execute(sa.select(store.documents.c.doc_id)).scalars().all()
    assert {f"papers/{d}.pdf" for d in doc_ids} <= keys
    assert set(demo_source.store.list("indexes/")) <= keys

    republished = republish(_target(engine, _client(s3_endpoint), bucket))
    live = store.live_generation(demo_source.engine)
    assert republished.live_generation == live["gen_id"]
    assert republished.vectors == live["n_vectors"]

    before = searchers.open_searcher(demo_source.engine, demo_source.store, embedder)
    after = searchers.open_searcher(engine, s3_store, embedder)
    assert after.gen_id == before.gen_id
    assert demo_source.queries
    # Same vectors and FAISS files; the same analyzed terms and BM25 on FTS5 and PostgreSQL:
    # every mode returns the same papers, chunks and scores on both sides.
    for mode in ("dense", "bm25", "hybrid"):
        got, want = _results(after, demo_source.queries, mode), _results(before, demo_source.queries, mode)
        assert all(want), f"{mode}: a demo query found nothing on the source"
        assert got == want, mode

    rows, sent = _migrate_everything(source, _target(engine, _client(s3_endpoint), bucket))
    assert (rows, sent) == (0, 0), "a second run must copy nothing"
    engine.dispose()


def _same_size_other_bytes(data: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in data[:64]) + data[64:]


def test_tampered_target_is_named_and_the_cutover_refused(demo_source, source, target_url, bucket, s3_endpoint):
    s3 = _client(s3_endpoint)
    engine = open_target_engine(target_url, demo_source.url)
    target = _target(engine, s3, bucket)
    _migrate_everything(source, target)
    with engine.begin() as conn:
        chunk_id = conn.execute(sa.select(store.chunks.c.chunk_id).order_by(store.chunks.c.chunk_id).limit(1)).scalar_one()
        conn.execute(sa.update(store.chunks).where(store.chunks.c.chunk_id == chunk_id).values(n_tokens=-1))
    index_key = sorted(demo_source.store.list("indexes/"))[0]
    s3.delete_object(Bucket=bucket, Key=f"rp/{index_key}")
    # Two papers overwritten behind the migration's back: other bytes of the same size under the
    # same sha256 tag, one with S3 computing its own SHA256, one without (S3 keeps another checksum).
    papers = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="rp/papers/")["Contents"])[:2]
    for key, checksum in zip(papers, ({"ChecksumAlgorithm": "SHA256"}, {})):
        stored = s3.get_object(Bucket=bucket, Key=key)
        tag = stored["Metadata"]["sha256"]
        s3.put_object(Bucket=bucket, Key=key, Body=_same_size_other_bytes(stored["Body"].read()),
                      Metadata={"sha256": tag}, **checksum)
    checksummed, unchecksummed = (k.removeprefix("rp/") for k in papers)

    with pytest.raises(MigrationNotVerified) as err:
        cutover(source, target)
    found = {(d.kind, d.key): d.problem for d in err.value.report.differences}
    assert set(found) == {("row", chunk_id), ("object", index_key), ("object", checksummed),
                          ("object", unchecksummed)}
    assert found[("row", chunk_id)] == "differs from source"
    assert found[("object", index_key)] == "missing on target"
    assert "S3's SHA256 checksum" in found[("object", checksummed)]
    assert "bytes read back" in found[("object", unchecksummed)]
    for key in (chunk_id, index_key, checksummed, unchecksummed):
        assert key in str(err.value)
    assert s3_module.head(target, CUTOVER_KEY) is None
    engine.dispose()


#: Shared by every client FlakyS3 makes, so the failures are spread over step attempts.
_STEP_FAULTS = Faults()


class FlakyS3(S3Resource):
    """dagster-aws's S3 resource whose clients answer the first calls of `_STEP_FAULTS` with 503."""

    def get_client(self):
        return _STEP_FAULTS.attach(super().get_client())


#: Backends KillingTarget terminated, shared by every engine it makes (one kill per test).
_KILLED: list[bool] = []


class KillingTarget(MigrationTargetResource):
    """The migration target whose engine has its PostgreSQL backend terminated, once, inside the
    transaction of a shard copy: after the COPY, as the shard's `copied` state is written."""

    admin_url: str = ""

    def get_engine(self, source_url=None):  # noqa: ANN001
        engine = super().get_engine(source_url)
        if not sa.event.contains(engine, "before_cursor_execute", self._kill):
            sa.event.listen(engine, "before_cursor_execute", self._kill)
        return engine

    def _kill(self, conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if not _KILLED and "migration_state" in statement and "copied" in str(parameters):
            admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                pid = conn.connection.driver_connection.info.backend_pid
                _KILLED.append(c.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar())
            admin.dispose()


def test_dagster_partitions_check_and_cutover(demo_source, source, target_url, bucket, s3_endpoint, pg_server):
    _KILLED.clear()
    resources = {
        "database": DatabaseResource(url=demo_source.url),
        "object_store": ObjectStoreResource(url=str(demo_source.store.root)),
        "inbox": InboxResource(path=str(demo_source.inbox)),
        "migration_target": KillingTarget(database_url=target_url, bucket=bucket, prefix="rp", admin_url=pg_server),
        # Few botocore attempts per call: injected 503s fail the step, and its RetryPolicy runs it again.
        "migration_s3": FlakyS3(endpoint_url=s3_endpoint, region_name="us-east-1", max_attempts=1),
    }
    instance = dg.DagsterInstance.ephemeral()

    dry = dg.materialize([migrated_rows], partition_key="0", resources=resources, instance=instance,
                         run_config={"ops": {"migrated_rows": {"config": {"dry_run": True}}}})
    assert dry.success
    assert not dry.asset_materializations_for_node("migrated_rows")
    engine = open_target_engine(target_url, demo_source.url)
    assert not sa.inspect(engine).get_table_names(), "a dry run must not create anything on the target"

    s3 = _client(s3_endpoint)
    target = _target(engine, s3, bucket)
    dagster_shards = ["0", "1"]
    for shard in dagster_shards:
        # More failing calls in a row than botocore's attempts: the first step attempt fails.
        _STEP_FAULTS.__init__(first=2)
        result = dg.materialize([migrated_rows, migrated_objects], partition_key=shard, resources=resources,
                                instance=instance)
        assert result.success
        retried = {e.step_key for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"}
        assert "migrated_objects" in retried, "the S3 faults should force a retry"
        assert _STEP_FAULTS.injected == 2
        if shard == dagster_shards[0]:
            assert _KILLED == [True] and "migrated_rows" in retried, "the killed backend should force a retry"
    for shard in store.SHARDS:
        if shard not in dagster_shards:
            migrate_rows(source, target, shard)
            migrate_objects(source, target, shard)

    resources["migration_s3"] = S3Resource(endpoint_url=s3_endpoint, region_name="us-east-1")
    done = dg.materialize([migration, migration_cutover, migration_verified], resources=resources, instance=instance)
    assert done.success
    (check,) = done.get_asset_check_evaluations()
    assert check.passed
    assert done.asset_materializations_for_node("migration_cutover")
    assert s3_module.head(target, CUTOVER_KEY) is not None

    # Other bytes of the same size under the same tag: only what S3 itself stored tells.
    paper = s3.list_objects_v2(Bucket=bucket, Prefix="rp/papers/")["Contents"][0]["Key"]
    stored = s3.get_object(Bucket=bucket, Key=paper)
    s3.put_object(Bucket=bucket, Key=paper, Body=_same_size_other_bytes(stored["Body"].read()),
                  Metadata=stored["Metadata"], ChecksumAlgorithm="SHA256")
    refused = dg.materialize([migration, migration_cutover, migration_verified], resources=resources,
                             instance=instance, raise_on_error=False)
    (check,) = refused.get_asset_check_evaluations()
    assert not check.passed
    assert paper.removeprefix("rp/") in check.description
    assert not refused.asset_materializations_for_node("migration_cutover")
    engine.dispose()


def test_production_instance_keeps_runs_in_postgresql(tmp_path, monkeypatch, pg_server):
    url = sa.engine.make_url(make_pg_database("rp_dagster"))
    try:
        for var, value in (("HOST", url.host), ("USERNAME", url.username), ("PASSWORD", url.password or "trust"),
                           ("DB", url.database)):
            monkeypatch.setenv(f"DAGSTER_PG_{var}", value)
        (tmp_path / "dagster.yaml").write_text((REPO / "deploy" / "dagster.prod.yaml").read_text())

        @dg.asset
        def probe() -> int:
            return 1

        with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
            assert type(instance.run_storage).__name__ == "PostgresRunStorage"
            assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
            assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
            assert instance.run_retries_enabled
            assert dg.materialize([probe], instance=instance).success
            assert instance.get_runs_count() == 1
        admin = sa.create_engine(url.render_as_string(hide_password=False))
        with admin.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one() == 1
        admin.dispose()
    finally:
        drop_pg_database(url.render_as_string(hide_password=False))


def test_papers_gone_or_changed_since_ingest_are_named_and_the_rest_uploaded(tmp_path, target_url, bucket, s3_endpoint):
    """Source files are checked against their doc_id (the sha256 of the ingested bytes)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    pdfs = sorted(DEMO_PAPERS.glob("*.pdf"))[:3]
    url = f"sqlite:///{tmp_path / 'rp.db'}"
    engine = store.make_engine(url)
    store.create_schema(engine)
    now = util.utcnow()
    rows = []
    for pdf in pdfs:
        copy = inbox / pdf.name
        copy.write_bytes(pdf.read_bytes())
        rows.append((util.sha256_hex(copy.read_bytes()), copy))
    with engine.begin() as conn:
        store.upsert(conn, store.documents, [
            dict(doc_id=d, shard=d[0], source_kind="pdf", title=p.name, text="t", page_offsets="[0]", parser="p",
                 parser_version="1", quality=1.0, page_count=1, garbled_ratio=0.0, empty_pages=0, ocr_pages=0,
                 ingested_at=now) for d, p in rows
        ], ["doc_id"])
        # One source by absolute path, one relative to the inbox, one as a file:// URL.
        uris = [str(rows[0][1]), rows[1][1].name, rows[2][1].as_uri()]
        store.upsert(conn, store.document_sources, [
            dict(uri=u, doc_id=d, size=p.stat().st_size, mtime=None, seen_at=now) for u, (d, p) in zip(uris, rows)
        ], ["uri"])
    engine.dispose()
    (good, _), (gone_id, gone), (changed_id, changed) = rows
    gone.unlink()
    changed.write_bytes(changed.read_bytes() + b"%% edited after ingest\n")

    source = MigrationSource.open(url, _NoIndexes(), inbox)
    target = _target(open_target_engine(target_url, url), _client(s3_endpoint), bucket, "")
    s3 = target.s3
    problems = []
    for shard in store.SHARDS:
        try:
            migrate_objects(source, target, shard)
        except MigrationError as exc:
            problems.append(str(exc))
    text = " ".join(problems)
    assert len(problems) == len({gone_id[0], changed_id[0]})
    assert f"papers/{gone_id}.pdf" in text and f"{gone} is gone" in text
    assert f"papers/{changed_id}.pdf" in text and f"{changed} changed since it was ingested" in text
    # S3's own SHA256 of the bytes it received is the paper's doc_id.
    head = s3.head_object(Bucket=bucket, Key=f"papers/{good}.pdf", ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == good
    report = verify(source, target)
    assert {d.key for d in report.differences if d.kind == "object"} == {f"papers/{gone_id}.pdf", f"papers/{changed_id}.pdf"}
    source.engine.dispose()
    target.engine.dispose()


def test_multipart_objects_are_checked_by_the_composite_checksum(tmp_path, target_url, bucket, s3_endpoint,
                                                                monkeypatch):
    """A file above the part size goes up in parts; S3's checksum is then the composite of the
    parts' digests, recomputed from the source file, and other bytes under it are named."""
    monkeypatch.setattr(s3_module, "PART_SIZE", 5 << 20)  # S3's smallest part, to keep the file small
    url = f"sqlite:///{tmp_path / 'rp.db'}"
    store.create_schema(store.make_engine(url))
    objects = LocalObjectStore(tmp_path / "objects")
    big = random.Random(5).randbytes((11 << 20) + 123)
    objects.put_bytes("indexes/g1/vectors.faiss", big)
    objects.put_bytes("indexes/g1/manifest.json", b'{"files": 1}')
    source = MigrationSource.open(url, objects)
    target = _target(open_target_engine(target_url, url), _client(s3_endpoint), bucket)
    for shard in store.SHARDS:
        migrate_rows(source, target, shard)
        migrate_objects(source, target, shard)
    report = verify(source, target)
    assert report.ok and report.objects == 2, report.summary()
    stored = s3_module.head(target, "indexes/g1/vectors.faiss")["ChecksumSHA256"]
    whole = hashlib.sha256(big).digest()
    assert base64.b64decode(stored.split("-")[0]) != whole, "the object should have gone up in parts"

    other = tmp_path / "other.bin"
    other.write_bytes(_same_size_other_bytes(big))
    target.s3.upload_file(str(other), bucket, target.key("indexes/g1/vectors.faiss"),
                          ExtraArgs={"ChecksumAlgorithm": "SHA256"}, Config=s3_module.transfer_config())
    report = verify(source, target)
    assert [(d.key, "S3's SHA256 checksum" in d.problem) for d in report.differences] == [
        ("indexes/g1/vectors.faiss", True)
    ]
    source.engine.dispose()
    target.engine.dispose()


class _NoIndexes:
    """A local object store without index files."""

    url = "none"

    def list(self, prefix: str = ""):
        return iter(())


def test_index_files_from_a_bucket_store_are_copied_and_checked(tmp_path, target_url, bucket, s3_endpoint):
    """A source whose object store is itself a bucket (no local files): bytes are read from it,
    uploaded with S3 checksums, and a copy changed afterwards is named."""
    url = f"sqlite:///{tmp_path / 'rp.db'}"
    store.create_schema(store.make_engine(url))
    client = _client(s3_endpoint)
    client.create_bucket(Bucket=f"{bucket}-src")
    objects = S3ObjectStore(f"{bucket}-src", "old", client=client)
    payload = random.Random(9).randbytes(70_000)
    objects.put_bytes("indexes/g2/vectors.faiss", payload)
    source = MigrationSource.open(url, objects)
    target = _target(open_target_engine(target_url, url), client, bucket)
    for shard in store.SHARDS:
        migrate_rows(source, target, shard)
        migrate_objects(source, target, shard)
    assert verify(source, target).ok
    head = s3_module.head(target, "indexes/g2/vectors.faiss")
    assert base64.b64decode(head["ChecksumSHA256"]) == hashlib.sha256(payload).digest()

    client.put_object(Bucket=bucket, Key=target.key("indexes/g2/vectors.faiss"),
                      Body=_same_size_other_bytes(payload), ChecksumAlgorithm="SHA256")
    assert [d.key for d in verify(source, target).differences] == ["indexes/g2/vectors.faiss"]
    source.engine.dispose()
    target.engine.dispose()


def test_the_bucket_keeps_old_versions_and_the_owners_own_lifecycle_rules(s3_endpoint, bucket):
    s3 = _client(s3_endpoint)
    s3.create_bucket(Bucket=bucket)
    theirs = {"ID": "their-logs", "Status": "Enabled", "Filter": {"Prefix": "logs/"}, "Expiration": {"Days": 7}}
    s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [theirs]})
    target = _target(None, s3, bucket, "rp")
    for _ in range(2):  # idempotent: the second call changes nothing
        s3_module.ensure_bucket(target)
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    rules = {r["ID"]: r for r in s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]}
    assert set(rules) == {"their-logs", s3_module.RETENTION_RULE_ID}, rules
    ours = rules[s3_module.RETENTION_RULE_ID]
    assert ours["Filter"] == {"Prefix": "rp/"}
    assert ours["NoncurrentVersionExpiration"]["NoncurrentDays"] == s3_module.NONCURRENT_DAYS
    # A paper overwritten by a bad write, then deleted: the original bytes are still there.
    key = target.key("papers/ab/paper.pdf")
    s3.put_object(Bucket=bucket, Key=key, Body=b"%PDF-1.7 the original")
    s3.put_object(Bucket=bucket, Key=key, Body=b"garbage")
    s3.delete_object(Bucket=bucket, Key=key)
    listing = s3.list_object_versions(Bucket=bucket, Prefix=key)
    assert len(listing["Versions"]) == 2 and len(listing["DeleteMarkers"]) == 1
    bodies = {s3.get_object(Bucket=bucket, Key=key, VersionId=v["VersionId"])["Body"].read() for v in listing["Versions"]}
    assert bodies == {b"%PDF-1.7 the original", b"garbage"}
