"""Backups of the PostgreSQL cluster (pgBackRest): is the newest fresh, does the repository verify."""
