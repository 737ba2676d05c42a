"""The migration to production: SQLite + local files -> PostgreSQL + S3, verified per shard."""
