"""Tests of the search service (research_pipeline/api)."""
