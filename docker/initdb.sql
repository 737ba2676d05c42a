-- Runs once, when the PostgreSQL volume is first created: Dagster's own storage gets its own
-- database beside the corpus database (POSTGRES_DB=research_pipeline).
CREATE DATABASE dagster;
