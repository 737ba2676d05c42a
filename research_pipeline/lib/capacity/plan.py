"""A capacity plan computed from the project's own benchmark results (docs/bench/*.json).

Every figure is a measured rate or size scaled by a stated formula; `Figure.formula` carries
it. The inputs are the bench_embed results (`embed-<corpus>-<device>.json`: a reindex profile of
a real corpus with the machine it ran on) and the bench_search points (`search.json`: hybrid
latency, build times and database size at 10k, 100k and 1M chunks). Assumptions the plan makes,
and which the benchmarks do not prove: throughput scales linearly with cores (ingest and
embedding run one worker or thread per core; the measured 2-worker ingest reached 1.80x of one);
a new corpus has the reference corpus's chunks, pages and PDF bytes per paper unless told;
search latency is bench_search's measured curve over size (straight lines on log-log axes
between measured sizes, linear in chunks beyond the largest, where full-text scoring dominates,
flat below the smallest),
levelled by machine: 1.0 on the machine bench_search ran on (same CPU model and architecture),
else the ratio of the two machines' measured per-core embedding rates (a query is one forward
pass plus the full-text stage, both single-threaded), assumed 1.0 where no embedding run was
measured on both. The curve is one query on one thread of an idle machine (bench_search's load
average is printed): it is a replica's service time, not what a saturated machine shows.

All other rates come from one reference run (the largest corpus measured on the device), so a
plan is as loaded or idle as that run was: its load average is printed with the plan, and
re-running `make bench BENCH=embed` on the target machine re-calibrates it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Where `make bench` writes its JSON results, relative to the repository root.
BENCH_DIR = Path(__file__).resolve().parents[3] / "docs" / "bench"
#: Generations kept by retention (publish keep=3): the storage figure counts their indexes.
KEEP_GENERATIONS = 3
#: HNSW graph bytes per vector above the flat threshold: M=32 links x 2 (level 0) x 4 bytes.
HNSW_LINK_BYTES = 32 * 2 * 4
#: Below this many vectors the index is exact (lib/embed/vectors.py EXACT_THRESHOLD).
EXACT_THRESHOLD = 20_000
#: Plan each search replica and database server to this share of its cores (headroom for bursts).
UTILISATION = 0.5
#: A replica keeps this share of memory for its indexes; the rest is headroom and the OS.
MEMORY_SHARE = 0.8
#: The embedding partitions (document shards '0'..'f'): at most this many workers in parallel.
SHARDS = 16


@dataclass(frozen=True)
class Figure:
    """One number of the plan, its unit, and how it was computed (with the inputs filled in)."""

    value: float | int | str | None
    unit: str
    formula: str


@dataclass
class Measurements:
    """The benchmark results a plan is computed from."""

    profiles: list[dict[str, Any]] = field(default_factory=list)  # bench_embed reindex profiles
    gpu_runs: list[dict[str, Any]] = field(default_factory=list)  # embedding rates measured on a GPU
    search_points: list[dict[str, Any]] = field(default_factory=list)  # bench_search points
    search_machine: dict[str, Any] = field(default_factory=dict)  # the machine bench_search ran on
    sources: list[str] = field(default_factory=list)

    @classmethod
    def from_dir(cls, path: Path | str = BENCH_DIR, exclude_corpora: Iterable[str] = ()) -> Measurements:
        """Read every bench JSON under `path` (skipping the profiles of `exclude_corpora`)."""
        path = Path(path)
        out = cls()
        skip = set(exclude_corpora)
        for f in sorted(path.glob("*.json")):
            data = json.loads(f.read_text())
            corpus = (data.get("reindex") or {}).get("corpus", data.get("corpus"))
            if data.get("bench") == "embed" and corpus in skip:
                continue
            if data.get("bench") == "embed" and data.get("machine", {}).get("device", "").startswith("cuda"):
                out.gpu_runs.append(data)  # bench_embed_gpu: a rate, no reindex profile
            elif data.get("bench") == "embed" and "reindex" in data:
                out.profiles.append(data)
            elif data.get("bench") == "search":
                out.search_points.extend(data["points"])
                out.search_machine = dict(data.get("machine") or {})
            else:
                continue
            out.sources.append(f.name)
        if not any(p["machine"]["device"] == "cpu" for p in out.profiles):
            raise FileNotFoundError(
                f"no CPU bench_embed result under {path}: run `make bench BENCH=embed` "
                "(or .venv/bin/python -m bench.bench_embed) to measure this machine first"
            )
        return out

    def reference(self, device: str = "cpu") -> dict[str, Any]:
        """The profile rates come from: the largest corpus measured on `device`."""
        runs = [p for p in self.profiles if p["machine"]["device"].startswith(device)]
        if not runs:
            raise LookupError(f"no bench_embed result for device {device!r}")
        return max(runs, key=lambda p: p["reindex"]["chunks"])

    def latency_points(self, backend: str) -> list[tuple[int, float, float]]:
        """(chunks, p50 ms, p95 ms) of every bench_search hybrid search on `backend`, by size."""
        return sorted((int(p["chunks"]), float(p["p50_ms"]), float(p["p95_ms"])) for p in self.search_points if p["backend"] == backend)


@dataclass(frozen=True)
class Shape:
    """What one paper of the corpus amounts to."""

    chunks_per_paper: float
    pages_per_paper: float
    pdf_bytes_per_paper: float
    source: str

    @classmethod
    def of(cls, profile: Mapping[str, Any]) -> Shape:
        r = profile["reindex"]
        n = r["papers"]
        return cls(r["chunks"] / n, r["pages"] / n, r["pdf_bytes"] / n, f"{r['corpus']} corpus ({n} papers)")


def _curve(points: list[tuple[int, float, float]], chunks: float, col: int) -> float:
    """Latency at `chunks` on the measured curve: straight lines on log-log axes between sizes,
    linear in chunks beyond the largest, and the smallest size's figure below it (a smaller index
    is no slower, and the floor, one query's encoding, does not shrink with the index)."""
    if len(points) == 1 or chunks <= points[0][0]:
        return points[0][col]
    if chunks >= points[-1][0]:
        return points[-1][col] * chunks / points[-1][0]
    lo, hi = points[0], points[1]
    for a, b in zip(points, points[1:], strict=False):
        if a[0] <= chunks <= b[0]:
            lo, hi = a, b
            break
    t = (math.log(chunks) - math.log(lo[0])) / (math.log(hi[0]) - math.log(lo[0]))
    return math.exp(math.log(lo[col]) + t * (math.log(hi[col]) - math.log(lo[col])))


def _same_cpu(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("cpu_model", "arch"))


def machine_level(m: Measurements, target: Mapping[str, Any]) -> tuple[float, str]:
    """How many times longer one search takes on `target` than on the machine bench_search ran on."""
    bench = m.search_machine
    if not bench or _same_cpu(bench, target):
        return 1.0, f"x 1.00 (bench_search ran on this machine: {target.get('cpu_model')}, {target.get('arch')})"

    def per_core(machine: Mapping[str, Any]) -> float | None:
        runs = [p for p in m.profiles if p["machine"]["device"] == "cpu" and _same_cpu(p["machine"], machine)]
        # The fastest run of a machine is the least loaded one: the nearest to its idle speed.
        return max((p["pipeline_chunks_per_s"] / p["machine"]["cores"] for p in runs), default=None)

    there, here = per_core(bench), per_core(target)
    if there is None or here is None:
        return 1.0, (f"x 1.00 (assumed: bench_search ran on {bench.get('cpu_model')}, no embedding run measured on "
                     "both machines to compare them)")
    return there / here, (f"x {there / here:.2f} (per-core embedding rate {there:.2f} chunks/s on bench_search's "
                          f"{bench.get('cpu_model')} / {here:.2f} on {target.get('cpu_model')})")


def _latency(points: list[tuple[int, float, float]], level: tuple[float, str], chunks: float, col: int) -> tuple[float, str]:
    """Search latency at `chunks`: bench_search's curve (idle machine, one query thread) x the machine level."""
    if not points:
        raise LookupError("no bench_search result (docs/bench/search.json): run bench/bench_search.py and record it")
    value = _curve(points, chunks, col) * level[0]
    sizes = ", ".join(f"{p[col]:.1f} ms at {p[0]:,}" for p in points)
    return value, f"bench_search curve ({sizes} chunks; log-log between sizes, linear beyond) {level[1]}"


def _gib(b: float) -> float:
    return round(b / 2**30, 3)


def plan(
    documents: int,
    qps: float,
    gpus: int = 0,
    measurements: Measurements | None = None,
    shape: Shape | None = None,
    cores: int | None = None,
    memory_gib: float | None = None,
    reindex_window_h: float = 8.0,
    daily_papers: int | None = None,
    target_p95_ms: float = 50.0,
) -> dict[str, Any]:
    """The capacity plan for `documents` papers searched at `qps` queries per second.

    `cores`/`memory_gib` describe one machine of the deployment (default: the measured one);
    `shape` the corpus (default: the reference corpus's per-paper figures); `daily_papers` the
    daily increment (default 1% of `documents`); `target_p95_ms` the search latency one index
    must meet (the project's target, 50 ms). Returns {inputs, figures: {name: Figure}, limits}.
    """
    if documents <= 0 or qps < 0 or gpus < 0:
        raise ValueError(f"documents must be > 0 and qps, gpus >= 0; got {documents}, {qps}, {gpus}")
    m = measurements or Measurements.from_dir()
    ref = m.reference("cpu")
    r, host = ref["reindex"], ref["machine"]
    shape = shape or Shape.of(ref)
    ref_cores = int(host["cores"])
    cores = int(cores or ref_cores)
    mem_bytes = (memory_gib * 2**30) if memory_gib else float(host["memory_bytes"])
    daily = int(daily_papers if daily_papers is not None else max(1, round(documents / 100)))
    fig: dict[str, Figure] = {}

    # Rates of the reference run, per core where the work runs a worker or thread per core.
    pages_per_core_s = r["pages"] / r["ingest_s"] / ref_cores
    chunk_rate = r["chunks"] / r["chunk_s"]  # one process
    embed_per_core = ref["pipeline_chunks_per_s"] / ref_cores
    embed_cpu = embed_per_core * cores
    gpu_run = max(m.gpu_runs, key=lambda p: p["pipeline_chunks_per_s"], default=None)
    gpu_rate = gpu_run["pipeline_chunks_per_s"] if gpu_run else None

    def chunks_of(n: float) -> float:
        return n * shape.chunks_per_paper

    def fts_build_s(chunks: float) -> tuple[float, str]:
        pts = [(p["chunks"], p["fts_build_s"], "bench_search") for p in m.search_points if p["backend"] == "sqlite"]
        pts.append((r["chunks"], r["fts_build_s"], f"bench_embed {r['corpus']}"))
        near = min(pts, key=lambda p: abs(math.log(max(chunks, 1)) - math.log(p[0])))
        return chunks * near[1] / near[0], f"chunks x {near[1]:.1f} s / {near[0]:,} chunks ({near[2]}, the nearest measured size)"

    def vector_build_s(chunks: float) -> tuple[float, str]:
        if chunks <= EXACT_THRESHOLD:
            return chunks * r["vector_build_s"] / r["chunks"], f"flat index: chunks x {r['vector_build_s']} s / {r['chunks']:,} chunks"
        pts = [p for p in m.search_points if p.get("vector_index") == "hnsw_flat"]
        near = min(pts, key=lambda p: abs(math.log(chunks) - math.log(p["chunks"])))
        v = chunks * near["vector_build_s"] / near["chunks"] * ref_cores / cores
        return v, f"HNSW: chunks x {near['vector_build_s']} s / {near['chunks']:,} chunks x {ref_cores}/{cores} cores"

    def embed_rate() -> tuple[float, str]:
        if gpus and gpu_rate:
            return gpus * gpu_rate, (
                f"{gpus} GPU x {gpu_rate:.0f} chunks/s (measured GPU run: {gpu_run['machine'].get('gpu')}, "
                f"{gpu_run['numeric_path']}, batch {gpu_run['batch_size']}; the model alone, embed_missing's database "
                "round trips not in it)"
            )
        return embed_cpu, f"{cores} cores x {embed_per_core:.2f} chunks/s per core ({ref['numeric_path']}, {ref['machine']['cpu_model']})"

    def reindex(n: float) -> tuple[float, dict[str, tuple[float, str]]]:
        ch = chunks_of(n)
        rate, rate_f = embed_rate()
        parts = {
            "ingest": (n * shape.pages_per_paper / (pages_per_core_s * cores),
                       f"papers x {shape.pages_per_paper:.1f} pages / ({pages_per_core_s:.1f} pages/s per core x {cores} cores)"),
            "chunk": (ch / chunk_rate, f"chunks / {chunk_rate:.0f} chunks/s (one process)"),
            "embed": (ch / rate, f"chunks / ({rate_f})"),
            "fts": fts_build_s(ch),
            "vectors": vector_build_s(ch),
        }
        return sum(v for v, _ in parts.values()), parts

    chunks = chunks_of(documents)
    fig["chunks"] = Figure(round(chunks), "chunks", f"{documents:,} papers x {shape.chunks_per_paper:.1f} chunks per paper ({shape.source})")
    total_s, parts = reindex(documents)
    for name, (v, f) in parts.items():
        fig[f"reindex_{name}_s"] = Figure(round(v, 1), "s", f)
    fig["reindex_s"] = Figure(round(total_s, 1), "s", "ingest + chunk + embed + full-text build + vector build")
    if gpus and not gpu_rate:
        fig["reindex_embed_gpu_s"] = Figure(None, "s", "no measured GPU run under docs/bench: run `python -m bench.bench_embed_gpu` (or `RP_DEVICE=cuda make bench BENCH=embed`) on the GPU machine")
    new_chunks = chunks_of(daily)
    rate, _ = embed_rate()
    inc_ingest = daily * shape.pages_per_paper / (pages_per_core_s * cores)
    inc = inc_ingest + new_chunks / chunk_rate + new_chunks / rate + parts["fts"][0] + parts["vectors"][0]
    fig["daily_increment_s"] = Figure(
        round(inc, 1), "s",
        f"{daily:,} new papers: ingest + chunk + embed {round(new_chunks):,} chunks at {rate:.1f} chunks/s, "
        "then the generation's full-text and vector indexes rebuilt over all chunks (cached vectors reused)",
    )

    # Storage.
    db_per_chunk = r["db_bytes_before_embeddings"] / r["chunks"]
    emb_per_text = r["embedding_rows_bytes"] / r["distinct_texts"]
    fts_per_chunk = r["fts_bytes"] / r["chunks"]
    vec_per_chunk = r["vector_bytes"] / r["chunks"] + (HNSW_LINK_BYTES if chunks > EXACT_THRESHOLD else 0)
    pdf = documents * shape.pdf_bytes_per_paper
    db = chunks * (db_per_chunk + emb_per_text)
    fts = chunks * fts_per_chunk
    vec = chunks * vec_per_chunk
    fig["storage_pdfs_gib"] = Figure(_gib(pdf), "GiB", f"papers x {shape.pdf_bytes_per_paper / 2**20:.2f} MiB per paper")
    fig["storage_database_gib"] = Figure(
        _gib(db), "GiB", f"chunks x ({db_per_chunk:.0f} B documents+chunks + {emb_per_text:.0f} B embedding row) per chunk ({r['corpus']} run)"
    )
    fig["storage_fts_gib"] = Figure(_gib(fts), "GiB", f"chunks x {fts_per_chunk:.0f} B per chunk per generation ({r['corpus']} run)")
    fig["storage_vectors_gib"] = Figure(
        _gib(vec), "GiB",
        f"chunks x {vec_per_chunk:.0f} B per chunk per generation (flat index files"
        + (f" + {HNSW_LINK_BYTES} B HNSW links)" if chunks > EXACT_THRESHOLD else ")"),
    )
    fig["storage_one_generation_gib"] = Figure(_gib(db + fts + vec), "GiB", "database + full-text + vectors of one live generation")
    fig["storage_total_gib"] = Figure(
        _gib(pdf + db + KEEP_GENERATIONS * (fts + vec)), "GiB", f"PDFs + database + {KEEP_GENERATIONS} kept generations x (full-text + vectors)"
    )

    # Search: one index while it meets the latency target and fits a replica's memory, else the
    # index split into document-shard ranges queried in parallel (the slowest shard bounds a query).
    pts = m.latency_points("sqlite")
    base = min(p.get("reindex", {}).get("peak_rss_bytes", 0) or 0 for p in m.profiles) or 0
    resident_per_chunk = vec_per_chunk + fts_per_chunk + db_per_chunk
    budget = mem_bytes * MEMORY_SHARE

    level = machine_level(m, host)

    def p95_at(ch: float) -> float:
        return _latency(pts, level, ch, 2)[0]

    # No shard smaller than the smallest size bench_search measured: below it the curve is a guess.
    smallest = pts[0][0] if pts else r["chunks"]
    index_shards = 1
    while chunks / (2 * index_shards) >= smallest and (
        p95_at(chunks / index_shards) > target_p95_ms or base + resident_per_chunk * chunks / index_shards > budget
    ):
        index_shards *= 2
    shard_chunks = chunks / index_shards
    p50, p50_f = _latency(pts, level, shard_chunks, 1)
    p95, p95_f = _latency(pts, level, shard_chunks, 2)
    fig["search_index_shards"] = Figure(
        index_shards, "index shards",
        f"smallest power of two S with p95(chunks / S) <= {target_p95_ms:g} ms and process + resident index of chunks / S "
        f"<= {MEMORY_SHARE} x memory, shards of at least {smallest:,} chunks" + (" (sharded fan-out is not implemented in the search service)" if index_shards > 1 else ""),
    )
    if index_shards > 1:
        fig["search_p95_ms_one_index"] = Figure(round(p95_at(chunks), 1), "ms", "the same curve at all chunks in one index")
    fig["search_p50_ms"] = Figure(round(p50, 1), "ms", p50_f)
    fig["search_p95_ms"] = Figure(round(p95, 1), "ms", p95_f + (
        f"; ABOVE the {target_p95_ms:g} ms target even at the smallest shard: this machine is too slow per query"
        if p95 > target_p95_ms else ""))
    per_replica = cores * 1000.0 / p50 * UTILISATION
    per_shard = max(1, math.ceil(qps / per_replica)) if qps else 1
    replicas = index_shards * per_shard
    fig["search_qps_per_replica"] = Figure(round(per_replica, 1), "queries/s", f"{cores} cores x 1000 / p50 {p50:.1f} ms x {UTILISATION} utilisation")
    fig["search_replicas"] = Figure(
        replicas, "replicas", f"{index_shards} index shards x ceil({qps:g} qps / {per_replica:.1f} qps per replica)"
    )
    mem = base + resident_per_chunk * shard_chunks
    fig["memory_per_replica_gib"] = Figure(
        _gib(mem), "GiB",
        f"{_gib(base)} GiB process (model, runtime; peak RSS of the smallest bench run) + {resident_per_chunk:.0f} B per chunk "
        f"x {round(shard_chunks):,} chunks (vectors, full-text index, chunk rows: resident so latency stays as measured)",
    )

    # Database.
    workers = max(1, math.ceil(parts["embed"][0] / (reindex_window_h * 3600)))
    if replicas == 1 and workers == 1:
        db_choice, db_formula = "sqlite", "one machine runs ingest, embedding and search: SQLite file + local object store"
        read_replicas = 0
    else:
        db_choice = "postgresql"
        pg = [p for p in m.search_points if p["backend"] == "postgresql"]
        if pg:
            fts_ms = pg[0]["fts_p50_ms"] * max(chunks, pg[0]["chunks"]) / pg[0]["chunks"]
            db_cores = qps * fts_ms / 1000 / UTILISATION
            read_replicas = max(0, math.ceil(db_cores / cores) - 1)
            db_formula = (
                f"{replicas} search replicas and {workers} embedding workers share one database; PostgreSQL full-text "
                f"p50 {pg[0]['fts_p50_ms']} ms at {pg[0]['chunks']:,} chunks (linear in chunks: {fts_ms:.0f} ms) x {qps:g} qps "
                f"/ {UTILISATION} = {db_cores:.1f} database cores -> primary + {read_replicas} read replicas of {cores} cores"
            )
        else:
            read_replicas, db_formula = 0, "several machines share one database; no PostgreSQL search measurement to size replicas"
    fig["database"] = Figure(db_choice, "", db_formula)
    fig["database_read_replicas"] = Figure(read_replicas, "replicas", db_formula if db_choice == "postgresql" else "SQLite: none")
    fig["embedding_workers"] = Figure(
        min(workers, SHARDS), "workers",
        f"ceil(embed {parts['embed'][0]:.0f} s / {reindex_window_h:g} h window), at most {SHARDS} (one document shard each)",
    )

    # Where one machine stops.
    # At the sizes where memory binds the vector index is HNSW: count its links whatever N is.
    flat_per_chunk = r["vector_bytes"] / r["chunks"]
    per_paper_mem = shape.chunks_per_paper * (flat_per_chunk + HNSW_LINK_BYTES + fts_per_chunk + db_per_chunk)
    mem_limit = max(0, int((mem_bytes * MEMORY_SHARE - base) / per_paper_mem))
    window = reindex_window_h * 3600
    lo, hi = 1, 10**9
    while lo < hi:  # the most papers whose full reindex fits the window on one machine (monotone)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if reindex(mid)[0] <= window else (lo, mid - 1)
    s_lo, s_hi = 1, 10**9
    while s_lo < s_hi:  # the most papers one index serves within the latency target
        mid = (s_lo + s_hi + 1) // 2
        s_lo, s_hi = (mid, s_hi) if p95_at(chunks_of(mid)) <= target_p95_ms else (s_lo, mid - 1)
    limits = {
        "memory": {
            "papers": mem_limit,
            "formula": f"({_gib(mem_bytes)} GiB x {MEMORY_SHARE} - {_gib(base)} GiB process) / {per_paper_mem / 2**20:.3f} MiB resident per paper",
            "exceeded": documents > mem_limit,
            "path": "shard the published index across replicas (each holds a range of document shards, the API fans out "
            "and merges), or a machine with more memory; vector compression (IVF-PQ) is not implemented",
        },
        "reindex_window": {
            "papers": lo,
            "formula": f"largest N with reindex_s(N) <= {reindex_window_h:g} h on one machine of {cores} cores",
            "exceeded": total_s > window,
            "path": f"embed as a backfill over up to {SHARDS} shard partitions on separate pods (embedding_workers above), "
            "or GPUs; the full-text build (one process) then bounds the rest",
        },
        "search_latency": {
            "papers": s_lo,
            "formula": f"largest N with search p95 <= {target_p95_ms:g} ms on one index (curve above)",
            "exceeded": p95_at(chunks) > target_p95_ms,
            "path": "split the index by document-shard ranges across replicas (search_index_shards) with a fan-out "
            "and merge in the API (not implemented), or cut the full-text stage's cost (docs/bench/search.md)",
        },
    }
    return {
        "inputs": {
            "documents": documents, "qps": qps, "gpus": gpus, "cores": cores, "memory_gib": _gib(mem_bytes),
            "reindex_window_h": reindex_window_h, "daily_papers": daily, "shape": asdict(shape),
            "reference_run": f"{r['corpus']} corpus, {ref['when']}, {ref['numeric_path']}, load {host['load_average'][0]}",
            "search_run": "bench_search, idle machine (load average "
            + ", ".join(f"{p['load_average']:g}" for p in m.search_points if p["backend"] == "sqlite" and "load_average" in p)
            + f" at its sqlite sizes), one query thread; machine level {level[0]:.2f}",
            "sources": m.sources,
        },
        "figures": {k: asdict(v) for k, v in fig.items()},
        "limits": limits,
    }


def render(result: Mapping[str, Any]) -> str:
    """The plan as text: one line per figure with its formula, then the limits."""
    i = result["inputs"]
    lines = [
        f"Capacity plan: {i['documents']:,} papers, {i['qps']:g} qps, {i['gpus']} GPUs; machine {i['cores']} cores, "
        f"{i['memory_gib']} GiB; reindex window {i['reindex_window_h']:g} h; daily +{i['daily_papers']:,} papers",
        f"From: {i['reference_run']} ({', '.join(i['sources'])})",
        f"Search: {i['search_run']}",
        "",
    ]
    for name, f in result["figures"].items():
        value = "n/a" if f["value"] is None else (f"{f['value']:,}" if isinstance(f["value"], (int, float)) else f["value"])
        lines.append(f"{name:28} {value} {f['unit']}".rstrip() + f"   = {f['formula']}")
    lines.append("")
    for name, lim in result["limits"].items():
        state = "EXCEEDED" if lim["exceeded"] else "ok"
        lines.append(f"one machine stops at ({name}): {lim['papers']:,} papers [{state}]   = {lim['formula']}")
        lines.append(f"  past it: {lim['path']}")
    return "\n".join(lines)
