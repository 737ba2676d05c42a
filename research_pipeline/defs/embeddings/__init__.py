"""Embeddings: the shard-partitioned `chunk_embeddings` asset and `embed_job`."""
