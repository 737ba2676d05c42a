"""Ingest: the `documents` and `chunks` assets, `ingest_job` and the `new_papers_sensor`."""
