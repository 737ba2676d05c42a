"""The migration of a deployment to production: SQLite + local files -> PostgreSQL + S3.

The work is split by the static shards of the content-hash space (`store.SHARDS`), the same
keys that partition embeddings, so a migration is a 16-partition backfill that can be resumed,
re-run and verified one shard at a time. The source is only ever read.

Modules, one reason to change each:
    endpoints  the source (read-only engine, object store, inbox) and the target (PostgreSQL, S3)
    tables     how each table is split into shards, and reading one shard
    codec      the canonical form of a row, its digest and a shard's checksum (Python and SQL)
    state      migration_state: pending -> copied -> verified per (table, shard)
    rows       copying one shard of rows, verified by PostgreSQL's own checksum
    s3         retries and what S3 itself stored (its SHA256 checksums)
    objects    papers and index files uploaded and checked
    report     the differences verification found
    verify     the whole target compared with the source
    cutover    republishing the live index on the target, and the cutover record
    plan       the dry run
"""
