"""Search: the index-generation assets (fts_index, vector_index, published_index), their release
gates, reindex_job with its nightly schedule, and cache warming after each publication."""
