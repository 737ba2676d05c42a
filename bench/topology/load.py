"""Offered load at a fixed rate through the front (open loop), the rehearsal's 1x and 10x steps.

bench/loadgen.py is a closed loop (N clients, each waiting for its answer): it finds the most a
tier can do, but cannot offer "5 searches a second". This step fires requests on a fixed
schedule for a bounded time (at most `max_in_flight` outstanding; a request that cannot start
on time is counted late), draws queries with bench/loadgen.py's query loader, and makes half of
them repeats of a query already asked. Users come from many addresses: requests are spread over
`sources` client addresses (127.0.1.x), so nginx's per-client rate limit sees many users, as in
production, instead of one client at 50 requests a second. Latency is measured from the
scheduled send time, so a stalled front shows up in the percentiles.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import httpx

from bench.loadgen import load_queries, percentile


class HalfRepeats:
    """Queries where each draw is, with probability `repeat`, one asked before (uniformly)."""

    def __init__(self, queries: list[str], repeat: float = 0.5, seed: int = 0):
        self.rng = random.Random(seed)
        self.fresh = queries[:]
        self.rng.shuffle(self.fresh)
        self.asked: list[str] = []
        self.repeat = repeat
        self.repeats = 0

    def draw(self) -> str:
        if self.asked and (self.rng.random() < self.repeat or not self.fresh):
            self.repeats += 1
            return self.rng.choice(self.asked)
        q = self.fresh.pop()
        self.asked.append(q)
        return q


def source_addresses(n: int) -> list[str]:
    return [f"127.0.1.{i + 1}" for i in range(n)]


async def _step(url: str, rate: float, seconds: float, queries: HalfRepeats, sources: list[str],
                timeout: float, max_in_flight: int) -> dict:
    clients = [httpx.AsyncClient(base_url=url, timeout=timeout,
                                 transport=httpx.AsyncHTTPTransport(local_address=s)) for s in sources]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    cache_hits = late = 0
    in_flight = asyncio.Semaphore(max_in_flight)
    tasks = []

    async def one(client: httpx.AsyncClient, q: str, scheduled: float) -> None:
        nonlocal cache_hits
        try:
            resp = await client.get("/search", params={"q": q, "k": 10})
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return
        finally:
            in_flight.release()
        if resp.status_code == 200:
            latencies.append((time.perf_counter() - scheduled) * 1000)
            cache_hits += bool(resp.json().get("cache_hit"))
        else:
            errors[str(resp.status_code)] = errors.get(str(resp.status_code), 0) + 1

    try:
        n = int(rate * seconds)
        start = time.perf_counter()
        for i in range(n):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing of an open-loop generator, not synchronisation
            if in_flight.locked():
                late += 1
            await in_flight.acquire()
            tasks.append(asyncio.create_task(one(clients[i % len(clients)], queries.draw(), scheduled)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    finally:
        for client in clients:
            await client.aclose()
    return {
        "offered_rps": rate,
        "sent": n,
        "seconds": round(wall, 2),
        "ok": len(latencies),
        "rps": round(len(latencies) / wall, 2) if wall else 0.0,
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "errors": errors,
        "late": late,
        "cache_hit_ratio": round(cache_hits / len(latencies), 3) if latencies else None,
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


def offered_load(url: str, rate: float, seconds: float, queries: HalfRepeats, sources: int = 10,
                 timeout: float = 15.0, max_in_flight: int = 256) -> dict:
    """One step: `rate` searches/s for `seconds` through `url` (bounded in count and time)."""
    return asyncio.run(_step(url, rate, seconds, queries, source_addresses(sources), timeout, max_in_flight))


def query_stream(path, seed: int = 0) -> HalfRepeats:
    return HalfRepeats(load_queries(path), 0.5, seed)
