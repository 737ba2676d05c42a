"""Release gates: plain functions that decide whether a candidate index generation may go live.

Blocking gates (a failure keeps the live generation):
- volume: enough documents, not too many lost against the live generation, and every chunk
  is in the full-text table, the vector index and the embedding cache;
- latency: p95 of the bundled probe queries within the SLA;
- quality: on every corpus, known-item probes drawn from the candidate itself (lib/release/probes.py)
  found in every search mode (success@10, MRR@10) and agreeing with the live generation (rank-biased
  overlap, success@10 not dropped); where the demo papers are present, also nDCG@10 on the bundled
  probe eval set above a floor and not regressed against live.
Advisory gates (warnings): quarantine share, parse-quality distribution, freshness.

Each gate returns a GateResult (passed, metadata of plain numbers, description): the
description says what was measured and, on failure, what to do.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from research_pipeline.lib.core import store, util
from research_pipeline.lib.release import probes, registry, searchers
from research_pipeline.lib.release.ir_metrics import mean_ndcg, percentiles
from research_pipeline.lib.release.thresholds import GateThresholds

logger = logging.getLogger(__name__)

BLOCKING_GATES: tuple[str, ...] = ("volume", "latency", "quality")
ADVISORY_GATES: tuple[str, ...] = ("parse_quality", "freshness")

#: The bundled probe eval set (package data), built from the demo corpus.
PROBE_EVAL_DIR = Path(__file__).resolve().parents[2] / "data" / "probe_eval"


class GateResult(NamedTuple):
    """The outcome of one gate: passed, figures (plain numbers) and a description for operators."""

    passed: bool
    metadata: dict[str, float | int | str]
    description: str


@dataclass(frozen=True)
class ProbeSet:
    """Queries and binary relevance judgements by doc_id (BEIR-style qrels)."""

    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]

    @property
    def doc_ids(self) -> set[str]:
        return {d for rel in self.qrels.values() for d in rel}

    def limited(self, n: int, present_doc_ids: set[str]) -> ProbeSet:
        """At most `n` queries (all when n <= 0), those the corpus can answer first."""
        if n <= 0 or n >= len(self.queries):
            return self
        ordered = sorted(self.queries, key=lambda q: (not (set(self.qrels.get(q, {})) & present_doc_ids), q))
        keep = set(ordered[:n])
        return ProbeSet(
            queries={q: t for q, t in self.queries.items() if q in keep},
            qrels={q: r for q, r in self.qrels.items() if q in keep},
        )


def load_probe_set(path: str | Path | None = None) -> ProbeSet:
    """The probe eval set in `path` (queries.jsonl + qrels.tsv), by default the bundled one."""
    base = Path(path) if path is not None else PROBE_EVAL_DIR
    qfile, rfile = base / "queries.jsonl", base / "qrels.tsv"
    if not qfile.is_file() or not rfile.is_file():
        raise FileNotFoundError(f"probe eval set {base} needs queries.jsonl and qrels.tsv (BEIR layout)")
    queries = {}
    for line in qfile.read_text("utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            queries[str(rec["_id"])] = str(rec["text"])
    qrels: dict[str, dict[str, int]] = {}
    with rfile.open(encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if int(row["score"]) > 0:
                qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return ProbeSet(queries={q: t for q, t in queries.items() if q in qrels}, qrels=qrels)


def _count(conn: sa.Connection, stmt: Any) -> int:
    return int(conn.execute(stmt).scalar() or 0)


def fts_row_count(engine: Engine, table: str) -> int:
    """Rows in a generation's full-text table (0 if it does not exist)."""
    from research_pipeline.lib.search.fts_tables import check_table_name

    check_table_name(table)
    if not sa.inspect(engine).has_table(table):
        return 0
    with engine.connect() as conn:
        return _count(conn, sa.text(f'SELECT count(*) FROM "{table}"'))


def volume_gate(
    engine: Engine,
    gen: Mapping[str, Any],
    live: Mapping[str, Any] | None,
    thresholds: GateThresholds,
    vector_index: Any,
) -> GateResult:
    """Documents >= minimum, drop against live <= max share, chunks == fts rows == vectors == embeddings."""
    docs = int(gen.get("n_documents") or 0)
    n_chunks = int(gen.get("n_chunks") or 0)
    fts_rows = fts_row_count(engine, gen["fts_table"]) if gen.get("fts_table") else 0
    n_vectors = int(vector_index.ntotal) if vector_index is not None else 0
    ids = list(vector_index.chunk_ids) if vector_index is not None else []
    c, e = store.chunks, store.embeddings
    with engine.connect() as conn:
        embedded_ids = {
            r[0]
            for r in conn.execute(
                sa.select(c.c.chunk_id).join(e, e.c.content_hash == c.c.content_hash).where(e.c.model_id == gen["model_id"])
            )
        }
    n_embedded = sum(1 for i in ids if i in embedded_ids)
    live_docs = int(live["n_documents"] or 0) if live else 0
    drop = max(0.0, (live_docs - docs) / live_docs) if live_docs else 0.0
    meta: dict[str, float | int] = {
        "documents": docs,
        "chunks": n_chunks,
        "fts_rows": fts_rows,
        "vectors": n_vectors,
        "embeddings": n_embedded,
        "min_documents": thresholds.min_documents,
        "max_document_drop_share": thresholds.max_document_drop_share,
    }
    if live:
        # Compared with a live generation only: without one there is no drop to report.
        meta["live_documents"] = live_docs
        meta["document_drop_share"] = round(drop, 4)
    problems = []
    if docs < thresholds.min_documents:
        problems.append(
            f"only {docs} documents, the minimum is {thresholds.min_documents}: check the inbox (RP_INBOX) and "
            "the quarantine table, or lower RP_GATE_MIN_DOCUMENTS"
        )
    if drop > thresholds.max_document_drop_share:
        problems.append(
            f"{docs} documents vs {live_docs} live: {drop:.1%} dropped, more than "
            f"{thresholds.max_document_drop_share:.0%}: find out where the papers went (quarantine, inbox) "
            "before publishing, or raise RP_GATE_MAX_DOCUMENT_DROP for an intended removal"
        )
    if not (n_chunks == fts_rows == n_vectors == n_embedded):
        problems.append(
            f"index is incomplete: {n_chunks} chunks, {fts_rows} full-text rows, {n_vectors} vectors, "
            f"{n_embedded} with embeddings (must all be equal): rerun reindex_job (chunks may have changed "
            "while it built)"
        )
    if problems:
        return GateResult(False, meta, "volume gate failed: " + "; ".join(problems))
    return GateResult(
        True, meta, f"{docs} documents ({drop:.1%} drop vs live), {n_chunks} chunks fully indexed"
    )


class RecordingEmbedder:
    """An embedder proxy that remembers query vectors: the live generation is judged on the very
    vectors the candidate used, without encoding each probe query twice."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        self.vectors: dict[str, Any] = {}

    def encode_query(self, query: str) -> Any:
        vec = self.vectors.get(query)
        if vec is None:
            vec = self.vectors[query] = self.inner.encode_query(query)
        return vec

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


#: Searched once, untimed, before the probes: the first search pays for lazy loading.
WARM_UP_QUERY = "release gate warm-up query"


def run_probes(
    searcher: Any, queries: Mapping[str, str], k: int = 10, warm_up: bool = True
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Search every probe query once (hybrid, top k): (milliseconds, ranked doc_ids) by query id."""
    if warm_up:
        searcher.search(WARM_UP_QUERY, k=k)
    latencies: dict[str, float] = {}
    rankings: dict[str, list[str]] = {}
    for qid, text in queries.items():
        started = time.perf_counter()
        hits = searcher.search(text, k=k)
        latencies[qid] = (time.perf_counter() - started) * 1000.0
        rankings[qid] = [h.doc_id for h in hits]
    return latencies, rankings


def latency_gate(latencies_ms: Sequence[float], sla_p95_ms: float) -> GateResult:
    """p50/p95/p99 of the probe searches' wall-clock latency against the p95 SLA."""
    lat = list(latencies_ms)
    if not lat:
        # Nothing was measured: no figures (a p95 of 0 would plot as a fast index), and no pass.
        return GateResult(
            False,
            {"probe_queries": 0, "sla_p95_ms": float(sla_p95_ms)},
            "latency gate failed: no probe query was searched, so latency was not measured: check the "
            "bundled probe set (lib/release/gates.PROBE_EVAL_DIR) and max_probe_queries",
        )
    pct = percentiles(lat)
    meta: dict[str, float | int] = {
        "probe_queries": len(lat),
        "latency_ms_p50": round(pct["p50"], 3),
        "latency_ms_p95": round(pct["p95"], 3),
        "latency_ms_p99": round(pct["p99"], 3),
        "latency_ms_max": round(pct["max"], 3),
        "sla_p95_ms": float(sla_p95_ms),
    }
    if pct["p95"] > sla_p95_ms:
        return GateResult(
            False,
            meta,
            f"latency gate failed: p95 {pct['p95']:.1f} ms over {len(lat)} probe queries exceeds the SLA of "
            f"{sla_p95_ms:g} ms: check machine load and index type (vector_index build_params), or raise "
            "RP_GATE_LATENCY_P95_MS if the SLA changed",
        )
    return GateResult(True, meta, f"p95 {pct['p95']:.1f} ms <= {sla_p95_ms:g} ms over {len(lat)} probe queries")


def answerable_qrels(probe: ProbeSet, present_doc_ids: set[str]) -> dict[str, dict[str, int]]:
    """The probe judgements restricted to papers in the corpus, for queries with at least one left."""
    out = {}
    for qid, rel in sorted(probe.qrels.items()):
        kept = {d: r for d, r in rel.items() if d in present_doc_ids}
        if kept and qid in probe.queries:
            out[qid] = kept
    return out


def indexed_doc_ids(engine: Engine, doc_ids: Iterable[str]) -> set[str]:
    """Which of `doc_ids` have chunks (are searchable)."""
    wanted = list(set(doc_ids))
    found: set[str] = set()
    c = store.chunks
    with engine.connect() as conn:
        for i in range(0, len(wanted), 500):
            batch = wanted[i : i + 500]
            found.update(r[0] for r in conn.execute(sa.select(c.c.doc_id).where(c.c.doc_id.in_(batch)).distinct()))
    return found


def _known_item_figures(run: probes.ProbeRun, th: GateThresholds) -> tuple[dict[str, float | int | str], list[str]]:
    """The known-item probes' figures and the problems they show (empty when they pass)."""
    meta: dict[str, float | int | str] = {
        "n_probes": len(run.probes),
        "n_probe_documents": len({p.target for p in run.probes}),
        "n_title_probes": sum(1 for p in run.probes if p.kind == "title"),
        "n_sentence_probes": sum(1 for p in run.probes if p.kind == "sentence"),
        "probe_min_success_at_10": th.probe_min_success_at_10,
        "probe_min_mrr_at_10": th.probe_min_mrr_at_10,
        "probe_min_rbo": th.probe_min_rbo,
        "probe_max_success_drop": th.probe_max_success_drop,
        "live_status": run.live_status,
    }
    if not run.probes:
        problem = (
            "no known-item probe could be drawn: no searchable paper has a title of "
            f"{probes.MIN_TITLE_WORDS}+ words that no other paper shares; check documents.title (metadata "
            "extraction) and that the corpus was chunked"
        )
        return meta, [problem]
    problems = []
    for mode in probes.PROBE_MODES:
        figures = probes.scores(run.rankings.get(mode, {}), run.probes)
        prefix = "" if mode == "hybrid" else f"{mode}_"
        meta[f"{prefix}success_at_10"] = round(figures["success"], 4)
        meta[f"{prefix}mrr_at_10"] = round(figures["mrr"], 4)
        if figures["success"] < th.probe_min_success_at_10:
            problems.append(
                f"{mode} search finds {figures['success']:.1%} of {len(run.probes)} known-item probes in its top 10, "
                f"below {th.probe_min_success_at_10:.0%}: the {_MODE_PART[mode]} of this generation is broken"
            )
    sentences = [p for p in run.probes if p.kind == "sentence"]
    meta["sentence_success_at_10"] = round(probes.scores(run.rankings.get("hybrid", {}), sentences)["success"], 4)
    if meta["mrr_at_10"] < th.probe_min_mrr_at_10:
        problems.append(
            f"hybrid MRR@10 {meta['mrr_at_10']:.3f} on the known-item probes is below {th.probe_min_mrr_at_10:.3f}: "
            "papers are found but ranked low (fusion tuning, chunking or model change?)"
        )
    if run.live_rankings is not None:
        shared = [p for p in run.probes if p.qid in run.live_rankings]
        cand = probes.scores(run.rankings.get("hybrid", {}), shared)
        live = probes.scores(run.live_rankings, shared)
        rbo = probes.mean_rbo(run.rankings.get("hybrid", {}), run.live_rankings, [p.qid for p in shared])
        # Rounded as reported: 1.0 - 0.95 is 0.0500...04 in floats, not over a 0.05 margin.
        drop = round(live["success"] - cand["success"], 4)
        meta.update(
            {
                "n_live_probes": len(shared),
                "live_success_at_10": round(live["success"], 4),
                "live_mrr_at_10": round(live["mrr"], 4),
                "success_at_10_drop_vs_live": drop,
                "rbo_vs_live": round(rbo, 4),
            }
        )
        if shared and drop > th.probe_max_success_drop:
            problems.append(
                f"hybrid success@10 fell from {live['success']:.1%} on the live generation to {cand['success']:.1%} "
                f"on the same {len(shared)} known-item probes, more than {th.probe_max_success_drop:.0%}"
            )
        if shared and rbo < th.probe_min_rbo:
            problems.append(
                f"the candidate's rankings agree with the live generation's by rank-biased overlap {rbo:.3f} on "
                f"{len(shared)} known-item probes, below {th.probe_min_rbo:.3f}: find out what changed the rankings, "
                "or lower RP_GATE_PROBE_MIN_RBO for a deliberate change"
            )
    return meta, problems


_MODE_PART = {
    "hybrid": "search as a whole",
    "bm25": "full-text index",
    "dense": "vector index (or its alignment with the chunks)",
}


def quality_gate(
    run: probes.ProbeRun,
    thresholds: GateThresholds,
    rankings: Mapping[str, Sequence[str]] | None = None,
    qrels: Mapping[str, Mapping[str, int]] | None = None,
    live_rankings: Mapping[str, Sequence[str]] | None = None,
    probe_queries_total: int = 0,
) -> GateResult:
    """Known-item probes of the candidate corpus (every corpus), and nDCG@10 on the bundled probe set
    where its papers are present, each vs thresholds and vs the live generation.

    `qrels` holds only the answerable bundled queries, each judged against the papers present
    (see `answerable_qrels`); `live_rankings` (bundled queries on live) is given only when the
    live generation was compared, so no live score is reported for one that was not.
    """
    th = thresholds
    meta, problems = _known_item_figures(run, th)
    qrels = qrels or {}
    meta.update(
        {
            "probe_queries": len(qrels),
            "probe_queries_total": int(probe_queries_total),
            "ndcg_floor": float(th.ndcg_floor),
            "ndcg_max_regression": float(th.ndcg_max_regression),
        }
    )
    ndcg = live = None
    if qrels:
        ndcg = mean_ndcg(rankings or {}, qrels)
        meta["ndcg_at_10"] = round(ndcg, 4)
        if ndcg < th.ndcg_floor:
            problems.append(
                f"nDCG@10 {ndcg:.3f} on {len(qrels)} bundled probe queries is below the floor {th.ndcg_floor:.3f}: "
                "search quality broke (parser, chunking, model or index change?); compare with `research-pipeline eval`"
            )
        if live_rankings is not None:
            live = mean_ndcg(live_rankings, qrels)
            meta["live_ndcg_at_10"] = round(live, 4)
            if ndcg < live - th.ndcg_max_regression:
                problems.append(
                    f"nDCG@10 {ndcg:.3f} regressed by {live - ndcg:.3f} against the live generation ({live:.3f}), "
                    f"more than the allowed {th.ndcg_max_regression:.3f}"
                )
    if problems:
        return GateResult(False, meta, "quality gate failed: " + "; ".join(problems))
    parts = [
        (
            f"known-item probes: success@10 {meta['success_at_10']:.1%} (bm25 {meta['bm25_success_at_10']:.1%}, "
            f"dense {meta['dense_success_at_10']:.1%}), MRR@10 {meta['mrr_at_10']:.3f} on {len(run.probes)} probes"
        )
    ]
    if "rbo_vs_live" in meta:
        parts.append(f"rank-biased overlap with live {meta['rbo_vs_live']:.3f}")
    else:
        parts.append(f"live generation {run.live_status}")
    if ndcg is not None:
        vs = f", live {live:.3f}" if live is not None else ""
        parts.append(f"bundled nDCG@10 {ndcg:.3f} on {len(qrels)} queries (floor {th.ndcg_floor:.3f}{vs})")
    return GateResult(True, meta, "; ".join(parts))


def parse_quality_gate(engine: Engine, thresholds: GateThresholds) -> GateResult:
    """Advisory: share of inputs in quarantine and the distribution of documents.quality."""
    d, q = store.documents, store.quarantine
    with engine.connect() as conn:
        quality = sorted(float(r[0]) for r in conn.execute(sa.select(d.c.quality)))
        quarantined = _count(conn, sa.select(sa.func.count()).select_from(q))
        ocr_docs = _count(conn, sa.select(sa.func.count()).select_from(d).where(d.c.ocr_pages > 0))
    total = len(quality) + quarantined
    low = sum(1 for v in quality if v < 0.5)
    meta: dict[str, float | int] = {
        "documents": len(quality),
        "quarantined": quarantined,
        "low_quality_documents": low,
        "ocr_documents": ocr_docs,
    }
    # Shares and quantiles exist only over something: none is written as 0 for an empty corpus.
    if total:
        meta["quarantine_share"] = round(quarantined / total, 4)
    if quality:
        meta["quality_p10"] = round(quality[int(0.1 * (len(quality) - 1))], 4)
        meta["quality_p50"] = round(percentiles(quality)["p50"], 4)
        meta["quality_min"] = round(quality[0], 4)
    if not total:
        return GateResult(False, meta, "advisory: nothing has been ingested or quarantined: check the inbox (RP_INBOX)")
    share = meta["quarantine_share"]
    warnings = []
    if share > thresholds.max_quarantine_share:
        warnings.append(
            f"{share:.1%} of inputs are quarantined (> {thresholds.max_quarantine_share:.0%}): see the quarantine "
            "table reasons"
        )
    if quality and meta["quality_p50"] < thresholds.min_median_quality:
        warnings.append(f"median parse quality {meta['quality_p50']:.2f} < {thresholds.min_median_quality:.2f}")
    if warnings:
        return GateResult(False, meta, "advisory: " + "; ".join(warnings))
    median = f"median parse quality {meta['quality_p50']:.2f}" if quality else "no parsed document"
    return GateResult(True, meta, f"{share:.1%} quarantined, {median}")


def freshness_gate(engine: Engine, live: Mapping[str, Any] | None, thresholds: GateThresholds) -> GateResult:
    """Advisory: hours since the newest ingested document and since the live generation was published."""
    now = util.utcnow()
    with engine.connect() as conn:
        newest = conn.execute(sa.select(sa.func.max(store.documents.c.ingested_at))).scalar()

    def hours_since(ts: Any) -> float:
        if ts.tzinfo is None:  # SQLite returns naive datetimes; they were written in UTC
            ts = ts.replace(tzinfo=now.tzinfo)
        return round((now - ts).total_seconds() / 3600.0, 3)

    # An age that does not exist (no document, no live generation) is left out, not written as -1.
    meta: dict[str, float | int] = {"max_staleness_hours": thresholds.max_staleness_hours}
    if live and live.get("published_at") is not None:
        meta["hours_since_live_published"] = hours_since(live["published_at"])
    if newest is None:
        return GateResult(False, meta, "advisory: no document has been ingested yet: is the inbox (RP_INBOX) empty?")
    newest_h = meta["hours_since_newest_document"] = hours_since(newest)
    if newest_h > thresholds.max_staleness_hours:
        return GateResult(
            False,
            meta,
            f"advisory: no new document for {newest_h:.0f} h (> {thresholds.max_staleness_hours:.0f} h): is the "
            "inbox sensor running?",
        )
    return GateResult(True, meta, f"newest document {newest_h:.1f} h old")


def _live_comparison(
    engine: Engine, object_store: Any, embedder: Any, live: Mapping[str, Any] | None, run: probes.ProbeRun,
    bundled: Mapping[str, str],
) -> dict[str, list[str]] | None:
    """Search the probes on the live generation: sets `run.live_rankings` and `run.live_status`;
    returns the bundled queries' rankings on live (None when live was not compared)."""
    if live is None:
        run.live_status = "no live generation"
        return None
    if live["model_id"] != embedder.model_id:
        run.live_status = (
            f"not compared: live generation {live['gen_id']} was built with {live['model_id']}, "
            f"the candidate with {embedder.model_id}"
        )
        return None
    try:
        searcher = searchers.open_searcher(engine, object_store, embedder, gen_id=live["gen_id"])
        held = probes.doc_ids_in_index(engine, searcher.vector_index, (p.target for p in run.probes))
        shared = [p for p in run.probes if p.target in held]
        run.live_rankings = probes.search_probes(searcher, shared, modes=("hybrid",))["hybrid"]
        _, live_bundled = run_probes(searcher, bundled, warm_up=False)
    except Exception as exc:  # noqa: BLE001 - a broken live generation must not block its replacement
        run.live_rankings = None
        run.live_status = f"unreadable: {type(exc).__name__}: {exc}"
        logger.warning("live generation %s could not be searched; the candidate is judged without it: %s",
                       live["gen_id"], run.live_status)
        return None
    run.live_status = "compared"
    return live_bundled


def evaluate_generation(
    engine: Engine,
    object_store: Any,
    embedder: Any,
    gen_id: str,
    thresholds: GateThresholds | None = None,
    probe: ProbeSet | None = None,
    record: bool = True,
    max_probe_queries: int = 0,
    only: Collection[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the gates on candidate `gen_id` (against the live generation) and record the results on it.

    Returns gate name -> {"passed", "blocking", "metadata", "description"}. A blocking failure
    marks the generation rejected; a re-run in which every blocking gate passes makes a rejected
    generation a candidate again (see registry.record_gates). `only` runs (and records) just
    those gates, e.g. the one a user re-runs from the UI; the others keep their recorded result.
    `max_probe_queries` > 0 limits the probe set (answerable queries first) to keep small test
    runs fast.
    """
    wanted = set(only) if only is not None else {*BLOCKING_GATES, *ADVISORY_GATES}
    unknown = wanted - {*BLOCKING_GATES, *ADVISORY_GATES}
    if unknown:
        raise ValueError(f"unknown release gates {sorted(unknown)}: the gates are {[*BLOCKING_GATES, *ADVISORY_GATES]}")
    thresholds = thresholds or GateThresholds()
    probe = probe or load_probe_set()
    gen = registry.get_generation(engine, gen_id)
    live = store.live_generation(engine)
    if live is not None and live["gen_id"] == gen_id:
        live = None
    results: dict[str, dict[str, Any]] = {}

    def put(name: str, res: GateResult, blocking: bool) -> None:
        results[name] = {"passed": res.passed, "blocking": blocking, **res._asdict()}

    blocking = wanted & set(BLOCKING_GATES)
    complete = gen["status"] in registry.JUDGEABLE and gen["vector_key"] and gen["fts_table"]
    if blocking and not complete:
        reason = (
            f"generation {gen_id} is {gen['status']}, not a complete candidate (full-text table "
            f"{gen['fts_table'] or 'missing'}, vectors {gen['vector_key'] or 'missing'}): rerun reindex_job"
        )
        for name in blocking:
            put(name, GateResult(False, {}, reason), True)
    elif blocking:
        recorder = RecordingEmbedder(embedder)
        searcher = searchers.open_searcher(engine, object_store, recorder, gen_id=gen_id)
        if "volume" in wanted:
            put("volume", volume_gate(engine, gen, live, thresholds, searcher.vector_index), True)
        if wanted & {"latency", "quality"}:
            present = indexed_doc_ids(engine, probe.doc_ids)
            probe = probe.limited(max_probe_queries, present)
            latencies, rankings = run_probes(searcher, probe.queries)
        if "latency" in wanted:
            put("latency", latency_gate(list(latencies.values()), thresholds.latency_p95_ms), True)
        if "quality" in wanted:
            qrels = answerable_qrels(probe, present)
            run = probes.ProbeRun(probes.draw_probes(engine, thresholds.probe_documents, thresholds.probe_seed))
            run.rankings = probes.search_probes(searcher, run.probes)
            live_rankings = _live_comparison(
                engine, object_store, recorder, live, run, {q: probe.queries[q] for q in qrels}
            )
            quality = quality_gate(
                run, thresholds, rankings, qrels, live_rankings, probe_queries_total=len(probe.queries)
            )
            logger.info("generation %s quality gate: %s", gen_id, quality.description)
            put("quality", quality, True)
    if "parse_quality" in wanted:
        put("parse_quality", parse_quality_gate(engine, thresholds), False)
    if "freshness" in wanted:
        put("freshness", freshness_gate(engine, live, thresholds), False)
    results = {name: results[name] for name in (*BLOCKING_GATES, *ADVISORY_GATES) if name in results}
    if record:
        registry.record_gates(engine, gen_id, results)
    return results
