"""Processes of the production-rehearsal topology and the drills (PostgreSQL clusters, ...)."""
