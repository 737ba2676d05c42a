"""Backups of the PostgreSQL cluster (pgBackRest): inspect, verify and take them; no Dagster here."""
