"""The Embedder under concurrency: queries, batches and token counts from several threads at once
give what they give alone, and nothing changes torch's process-wide thread count."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from research_pipeline.lib.ingest.chunking import chunk_document
from research_pipeline_tests.shared import SHORT


def test_encode_query_leaves_the_process_thread_count_alone(embedder):
    import torch

    before = torch.get_num_threads()
    try:
        # A search service sets one thread once at start; a query must not undo it.
        torch.set_num_threads(1)
        embedder.encode_query("graphene thermal conductivity")
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        embedder.encode_query("graphene thermal conductivity")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_concurrent_queries_batches_and_counts_equal_sequential(embedder, papers):
    chunks = [r["text"] for p in SHORT for r in chunk_document(papers[p], embedder.count_tokens, 48, 6)]
    batches = [chunks[i : i + 16] for i in range(0, min(len(chunks), 96), 16)]
    queries = [c[:60] for c in chunks[:24]]
    assert len(batches) >= 4 and len(queries) == 24

    # Sequential reference, in this thread.
    want_batches = [embedder.encode(b, batch_size=8) for b in batches]
    want_queries = [embedder.encode_query(q) for q in queries]
    want_counts = [embedder.count_tokens(c) for c in chunks]

    # The same work from 6 threads at once, all released together by a barrier: queries,
    # batch encodes and token counts (which use other tokenizer settings) interleave.
    start = threading.Barrier(6)

    def queries_job(part):
        start.wait(timeout=60)
        return [embedder.encode_query(q) for q in part]

    def batches_job(part):
        start.wait(timeout=60)
        return [embedder.encode(b, batch_size=8) for b in part]

    def counts_job():
        start.wait(timeout=60)
        return [embedder.count_tokens(c) for c in chunks]

    with ThreadPoolExecutor(max_workers=6) as pool:
        q = [pool.submit(queries_job, queries[i::3]) for i in range(3)]
        b = [pool.submit(batches_job, batches[i::2]) for i in range(2)]
        n = pool.submit(counts_job)
        got_queries = [f.result(timeout=600) for f in q]
        got_batches = [f.result(timeout=600) for f in b]
        got_counts = n.result(timeout=600)

    for i, part in enumerate(got_queries):
        for want, got in zip(want_queries[i::3], part, strict=True):
            np.testing.assert_array_equal(got, want)
    for i, part in enumerate(got_batches):
        for want, got in zip(want_batches[i::2], part, strict=True):
            np.testing.assert_array_equal(got, want)
    assert got_counts == want_counts
