"""A bounded async load generator for the search service: Zipf repeats of real queries, stepped load.

Each step runs `clients` concurrent clients (httpx.AsyncClient, one connection pool, at most
`clients` requests in flight: a closed loop, so the offered load is the number of clients) for
`--seconds`, drawing queries from a real query set with a Zipf(s) repeat distribution over a
shuffled order (s=0: every query equally likely; s≈1: a few popular queries dominate, as in
real search logs). Prints one JSON line per step (req/s, p50/p95/p99 ms, errors by status,
cache-hit ratio reported by the service) and a final summary line.

    python bench/loadgen.py --url http://127.0.0.1:8080 --clients 1,4,16 --seconds 20 \
        --queries /work/shared/data/ir/scifact/queries.jsonl --zipf 0   # all distinct: uncached
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import httpx
import numpy as np


def load_queries(path: Path, limit: int | None = None) -> list[str]:
    """Query texts of a BEIR queries.jsonl (`text` field) or a text file with one query a line."""
    out: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            out.append(json.loads(line)["text"] if path.suffix == ".jsonl" else line)
            if limit and len(out) >= limit:
                break
    if not out:
        raise SystemExit(f"loadgen: no queries in {path}")
    return out


class ZipfQueries:
    """Queries drawn with P(rank r) ∝ 1/r^s over a seeded shuffle; s=0 walks them without repeats."""

    def __init__(self, queries: list[str], s: float, seed: int = 0):
        self.rng = random.Random(seed)
        self.queries = queries[:]
        self.rng.shuffle(self.queries)
        self.s = s
        self._next = 0
        if s > 0:
            weights = 1.0 / np.arange(1, len(queries) + 1) ** s
            self.cdf = np.cumsum(weights / weights.sum())

    def draw(self) -> str:
        if self.s <= 0:
            q = self.queries[self._next % len(self.queries)]
            self._next += 1
            return q
        return self.queries[int(np.searchsorted(self.cdf, self.rng.random()))]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


async def run_step(url: str, clients: int, seconds: float, queries: ZipfQueries, k: int, timeout: float) -> dict:
    """One step of offered load: `clients` closed-loop clients for `seconds`."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    hits = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:

        async def one_client() -> None:
            nonlocal hits
            while time.perf_counter() < deadline:
                q = queries.draw()
                start = time.perf_counter()
                try:
                    resp = await client.get("/search", params={"q": q, "k": k})
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                elapsed = (time.perf_counter() - start) * 1000
                if resp.status_code == 200:
                    latencies.append(elapsed)
                    hits += bool(resp.json().get("cache_hit"))
                else:
                    errors[str(resp.status_code)] = errors.get(str(resp.status_code), 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall = time.perf_counter() - started
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "ok": len(latencies),
        "req_per_s": round(len(latencies) / wall, 2),
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "errors": errors,
        "cache_hit_ratio": round(hits / len(latencies), 3) if latencies else None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


async def main_async(args: argparse.Namespace) -> int:
    queries = ZipfQueries(load_queries(Path(args.queries), args.limit), args.zipf, args.seed)
    steps = []
    for clients in [int(c) for c in args.clients.split(",")]:
        if args.warmup > 0:
            await run_step(args.url, clients, args.warmup, queries, args.k, args.timeout)
        step = await run_step(args.url, clients, args.seconds, queries, args.k, args.timeout)
        steps.append(step)
        print(json.dumps({"step": step}), flush=True)
    base = steps[0]["req_per_s"] or None
    summary = {
        "url": args.url, "zipf_s": args.zipf, "queries": len(queries.queries), "k": args.k,
        "req_per_s": {s["clients"]: s["req_per_s"] for s in steps},
        "speedup_vs_first": {s["clients"]: round(s["req_per_s"] / base, 2) if base else None for s in steps},
        "p95_ms": {s["clients"]: s["p95_ms"] for s in steps},
        "errors": sum(sum(s["errors"].values()) for s in steps),
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--queries", default="/work/shared/data/ir/scifact/queries.jsonl")
    p.add_argument("--limit", type=int, default=None, help="use the first N queries")
    p.add_argument("--clients", default="1,4,16", help="comma-separated steps of concurrent clients")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per step")
    p.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds before each step")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of query repeats (0: no repeats)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0)
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
