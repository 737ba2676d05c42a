"""The `research-pipeline` command: run the demo, inspect the store, search, evaluate, manage indexes."""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from research_pipeline import logs, runtime
from research_pipeline.config import ConfigError, Settings, export_dagster_home
from research_pipeline.lib.core import store
from research_pipeline.lib.core.util import redact_url

NO_GENERATION = (
    "no index generation is published yet: run `make demo` or materialize reindex_job "
    "(then `research-pipeline index list` shows it)"
)


#: The local Dagster instance settings shipped with the repository (telemetry off, run queue, retries).
LOCAL_INSTANCE_FILE = Path(__file__).resolve().parents[1] / "dagster.yaml"


class CliError(Exception):
    """A failure the user can fix; printed without a traceback."""


def _require(module: str, command: str) -> Any:
    """Import a library module a subcommand needs, or explain that it has not landed yet."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            raise CliError(
                f"`research-pipeline {command}` is not available in this build: {module} is missing"
            ) from None
        raise


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as exc:
        raise CliError(str(exc)) from None


def _engine(settings: Settings):  # noqa: ANN202
    try:
        return runtime.make_engine(settings.database_url)
    except runtime.DependencyError as exc:
        raise CliError(str(exc)) from None


def _embedder(settings: Settings):  # noqa: ANN202
    try:
        return runtime.embedder(settings.model, settings.device, settings.embed_precision)
    except runtime.DependencyError as exc:
        raise CliError(str(exc)) from None


def _object_store(settings: Settings):  # noqa: ANN202
    return runtime.make_object_store(settings.object_store_url, settings.s3_endpoint_url)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


# --- status ------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    settings = _settings()
    engine = _engine(settings)
    try:
        counts = store.counts(engine)
    finally:
        engine.dispose()
    if args.json:
        _print_json(counts)
        return 0
    print(f"database:        {redact_url(settings.database_url)}")
    print(f"inbox:           {settings.inbox}")
    print(f"documents:       {counts['documents']} ({counts['pages']} pages, {counts['sources']} source files)")
    print(f"chunks:          {counts['chunks']}")
    print(f"embeddings:      {counts['embeddings']}")
    reasons = ", ".join(f"{r}={n}" for r, n in counts["quarantine"].items()) or "none"
    print(f"quarantined:     {counts['quarantined']} ({reasons})")
    print(f"live generation: {counts['live_generation'] or '(none published)'}")
    return 0


# --- search ------------------------------------------------------------------------------------


def open_live_searcher(settings: Settings, engine, command: str = "search"):  # noqa: ANN001, ANN201
    """The Searcher over the live generation, or a CliError telling how to publish one."""
    searchers = _require("research_pipeline.lib.release.searchers", command)
    if store.live_generation(engine) is None:
        raise CliError(NO_GENERATION)
    return searchers.open_searcher(engine, _object_store(settings), _embedder(settings))


def _filters(args: argparse.Namespace):  # noqa: ANN202
    search_lib = _require("research_pipeline.lib.search.searcher", "search")
    if args.year_min is None and args.year_max is None and args.author is None:
        return None
    return search_lib.SearchFilters(year_min=args.year_min, year_max=args.year_max, author=args.author)


def cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise CliError("--k must be at least 1")
    settings = _settings()
    engine = _engine(settings)
    try:
        filters = _filters(args)
        searcher = open_live_searcher(settings, engine)
        cache_lib = _require("research_pipeline.lib.search.cache", "search")
        querylog_lib = _require("research_pipeline.lib.search.querylog", "search")
        # A one-shot process has no use for an in-process cache; Redis is shared with the search API.
        cache = cache_lib.QueryCache(redis_url=settings.redis_url) if settings.redis_url else None
        with querylog_lib.QueryLog(engine) as query_log:
            hits, _ = cache_lib.cached_search(
                searcher, args.query, k=args.k, filters=filters, mode=args.mode, cache=cache, query_log=query_log
            )
        if cache is not None:
            cache.close()
        files = _files_by_doc(engine, [h["doc_id"] for h in hits])
    finally:
        engine.dispose()
    if args.json:
        _print_json({"query": args.query, "results": [dict(h, files=files.get(h["doc_id"], [])) for h in hits]})
        return 0
    if not hits:
        print("no results")
        return 0
    for rank, hit in enumerate(hits, 1):
        year = f" ({hit['year']})" if hit.get("year") else ""
        print(f"{rank:>2}. {hit.get('title') or '(untitled)'}{year}  score={hit['score']:.3f}")
        where = f"p.{hit['page_start']}" if hit.get("page_start") is not None else ""
        print(f"    {', '.join(files.get(hit['doc_id'], [])) or hit['doc_id'][:12]} {hit.get('section') or ''} {where}".rstrip())
        if hit.get("snippet"):
            print(f"    {' '.join(hit['snippet'].split())[:240]}")
    return 0


def _files_by_doc(engine, doc_ids: Sequence[str]) -> dict[str, list[str]]:  # noqa: ANN001
    """The file names (last path component of each source URI) of each document."""
    import sqlalchemy as sa

    if not doc_ids:
        return {}
    src = store.document_sources
    out: dict[str, list[str]] = {}
    with engine.connect() as conn:
        for doc_id, uri in conn.execute(
            sa.select(src.c.doc_id, src.c.uri).where(src.c.doc_id.in_(list(set(doc_ids)))).order_by(src.c.uri)
        ):
            out.setdefault(doc_id, []).append(uri.rstrip("/").rsplit("/", 1)[-1])
    return out


# --- eval --------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    beir_dir = Path(args.dir)
    if not (beir_dir / "corpus.jsonl").is_file():
        raise CliError(f"{beir_dir} is not a BEIR folder: expected corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    if not (beir_dir / "qrels" / f"{args.split}.tsv").is_file():
        raise CliError(f"{beir_dir} has no qrels/{args.split}.tsv: pick another --split")
    evaluate_lib = _require("research_pipeline.lib.release.evaluate", "eval")
    settings = _settings()
    work_dir = Path(args.work_dir) if args.work_dir else settings.home / "eval" / beir_dir.resolve().name
    work_dir.mkdir(parents=True, exist_ok=True)
    # Anything the pipeline prints while it runs goes to stderr, so --json stays one object on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        result = evaluate_lib.evaluate(
            beir_dir, split=args.split, mode=args.mode, work_dir=work_dir, embedder=_embedder(settings)
        )
    if args.json:
        keys = ("ndcg@10", "recall@100", "mrr@10", "queries", "latency_ms_p50", "latency_ms_p95")
        print(json.dumps({k: result[k] for k in keys}, sort_keys=True))
        return 0
    print(f"{beir_dir.name} ({args.split}, {args.mode}, {result['queries']} queries)")
    for key in ("ndcg@10", "recall@100", "mrr@10"):
        print(f"  {key:<11} {result[key]:.4f}")
    print(f"  latency p50 {result['latency_ms_p50']:.1f} ms, p95 {result['latency_ms_p95']:.1f} ms")
    return 0


# --- index -------------------------------------------------------------------------------------


def cmd_index(args: argparse.Namespace) -> int:
    registry = _require("research_pipeline.lib.release.registry", f"index {args.index_command}")
    settings = _settings()
    engine = _engine(settings)
    try:
        if args.index_command == "list":
            rows = registry.list_generations(engine)
            live = (store.live_generation(engine) or {}).get("gen_id")
            if args.json:
                _print_json({"live": live, "generations": rows})
                return 0
            if not rows:
                print(NO_GENERATION)
                return 0
            for row in rows:
                mark = "*" if row.get("gen_id") == live else " "
                print(
                    f"{mark} {row.get('gen_id')}  {row.get('status', ''):<9}  docs={row.get('n_documents', '')} "
                    f"chunks={row.get('n_chunks', '')}  created={row.get('created_at', '')}"
                )
            return 0
        try:
            now_live = _require("research_pipeline.lib.release.publish", "index rollback").rollback(engine, args.gen_id)
        except (LookupError, ValueError, registry.GenerationError) as exc:
            raise CliError(f"rollback failed: {exc}") from None
        print(f"live generation is now {now_live}")
        _record_rollback(settings, engine)
        return 0
    finally:
        engine.dispose()


# --- remove ------------------------------------------------------------------------------------


def cmd_remove(args: argparse.Namespace) -> int:
    lifecycle = _require("research_pipeline.lib.ingest.lifecycle", "remove")
    settings = _settings()
    engine = _engine(settings)
    try:
        change = lifecycle.restore if args.undo else lifecycle.remove
        try:
            docs = change(engine, args.target, inbox=settings.inbox)
        except LookupError as exc:
            raise CliError(str(exc).strip("'\"")) from None
    finally:
        engine.dispose()
    if args.json:
        _print_json(docs)
        return 0
    for doc in docs:
        state = doc["retired_reason"] or "live"
        print(f"{doc['doc_id'][:12]}  {state:<9}  {doc['title'] or '(no title)'}")
    print(f"{len(docs)} document(s) {'restored' if args.undo else 'removed'}; the next reindex publishes the change")
    return 0


def _record_rollback(settings: Settings, engine) -> None:  # noqa: ANN001
    """Record the rollback on `published_index` in Dagster, so the UI shows which generation is live."""
    import dagster as dg

    from research_pipeline.defs.search.assets import record_live_generation

    prepare_dagster_home(settings)
    try:
        with dg.DagsterInstance.get() as instance:
            record_live_generation(instance, engine, "rollback")
    except Exception as exc:  # noqa: BLE001 - the pointer already moved; the UI record is secondary
        print(f"research-pipeline: rolled back, but could not record it in Dagster ({exc}); "
              "the UI shows the change after the next publish", file=sys.stderr)


# --- serve -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from research_pipeline.api import app

    app.serve(_settings(), host=args.host, port=args.port, workers=args.workers)
    return 0


def cmd_exporter(args: argparse.Namespace) -> int:
    from research_pipeline.ops import exporter

    exporter.serve(_settings(), host=args.host, port=args.port)
    return 0


# --- demo --------------------------------------------------------------------------------------


def demo_jobs(defs) -> list:  # noqa: ANN001
    """The jobs `demo` runs, in order: the full reindex when it exists, else the ingest."""
    names = {job.name for job in defs.resolve_all_job_defs()}
    if "reindex_job" in names:
        return [defs.resolve_job_def("reindex_job")]
    return [defs.resolve_job_def("ingest_job")]


def read_queries(path: Path) -> list[tuple[str, list[str]]]:
    """(query, expected file names) from a TSV with columns query and files (';'-separated)."""
    with path.open(newline="", encoding="utf-8") as fh:
        return [
            (row["query"], [f for f in row["files"].split(";") if f])
            for row in csv.DictReader(fh, delimiter="\t")
        ]


def prepare_dagster_home(settings: Settings) -> Path:
    """DAGSTER_HOME (default $RP_HOME/dagster), created, with the repository's dagster.yaml if it has none."""
    dagster_home = settings.dagster_home
    dagster_home.mkdir(parents=True, exist_ok=True)
    instance_file = dagster_home / "dagster.yaml"
    if not instance_file.exists() and LOCAL_INSTANCE_FILE.is_file():
        shutil.copyfile(LOCAL_INSTANCE_FILE, instance_file)
    export_dagster_home(dagster_home)
    return dagster_home


def describe_failure(job_name: str, result) -> str:  # noqa: ANN001
    """Why a demo run failed: the blocking release gates that did not pass, else the failed steps."""
    gates = [
        f"{e.check_name}: {e.description}"
        for e in result.get_asset_check_evaluations()
        if not e.passed and e.blocking
    ]
    if gates:
        return (
            f"{job_name} built an index generation but did not publish it; blocking release gates failed:\n  "
            + "\n  ".join(gates)
        )
    failed = [e.step_key for e in result.all_events if e.is_step_failure]
    return (
        f"{job_name} failed in step(s) {', '.join(failed) or '?'} (run {result.run_id}); "
        "see `make dev` -> Runs for the step logs"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings()
    dagster_home = prepare_dagster_home(settings)
    if not settings.inbox.is_dir():
        raise CliError(f"inbox {settings.inbox} is not a folder: set RP_INBOX to a folder of PDFs")

    import dagster as dg

    from research_pipeline.definitions import defs

    print(f"demo: ingesting {settings.inbox} into {redact_url(settings.database_url)} (Dagster home {dagster_home})")
    with dg.DagsterInstance.get() as instance:
        for job in demo_jobs(defs):
            print(f"demo: running {job.name} ...", flush=True)
            result = job.execute_in_process(
                instance=instance,
                raise_on_error=False,
                # Step progress at INFO; the per-event DEBUG lines are in the UI (`make dev`).
                run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
            )
            if not result.success:
                raise CliError(describe_failure(job.name, result))
    print()
    cmd_status(argparse.Namespace(json=False))

    queries_path = Path(args.queries)
    engine = _engine(settings)
    try:
        try:
            searcher = open_live_searcher(settings, engine, command="demo")
        except CliError as exc:
            print(f"\ndemo: skipping the example queries: {exc}")
            return 0
        queries = read_queries(queries_path)
        found = 0
        expected_total = 0
        print(f"\nexample queries ({queries_path}): top 3 papers, expected files found in the top 5")
        for query, expected in queries:
            hits = searcher.search(query, k=5)
            files = _files_by_doc(engine, [h.doc_id for h in hits])
            top5 = {f for h in hits for f in files.get(h.doc_id, [])}
            n = sum(1 for f in expected if f in top5)
            found += n
            expected_total += len(expected)
            print(f"\n[{n}/{len(expected)}] {query}")
            for rank, hit in enumerate(hits[:3], 1):
                print(f"   {rank}. {hit.title or '(untitled)'}  ({', '.join(files.get(hit.doc_id, []))})")
        print(f"\ndemo: {found}/{expected_total} expected papers in the top 5 over {len(queries)} queries")
    finally:
        engine.dispose()
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The capacity plan computed from the measured benchmark results (docs/bench/*.json)."""
    from research_pipeline.lib.capacity import options
    from research_pipeline.lib.capacity.plan import render

    try:
        result = options.plan_of(args)
    except (FileNotFoundError, ValueError, LookupError) as exc:
        raise CliError(f"plan: {exc}") from None
    print(json.dumps(result) if args.json else render(result))
    return 0


# --- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="research-pipeline",
        description="Research papers -> searchable literature index. Configured by RP_* environment variables.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="ingest the inbox, build and publish the index, run the example queries")
    p.add_argument(
        "--queries",
        default=str(Path(__file__).resolve().parents[1] / "examples" / "queries.tsv"),
        help="TSV of example queries (columns query, files)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="row counts of the configured store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("search", help="search the live index generation")
    p.add_argument("query")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--mode", choices=("hybrid", "bm25", "dense"), default="hybrid")
    p.add_argument("--year-min", type=int)
    p.add_argument("--year-max", type=int)
    p.add_argument("--author")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("eval", help="retrieval quality on a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("dir")
    p.add_argument("--split", default="test")
    p.add_argument("--mode", choices=("hybrid", "bm25", "dense"), default="hybrid")
    p.add_argument("--work-dir", help="cache of the ingested corpus (default $RP_HOME/eval/<name>)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("index", help="index generations")
    isub = p.add_subparsers(dest="index_command", required=True)
    q = isub.add_parser("list", help="all generations; * marks the live one")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_index)
    q = isub.add_parser("rollback", help="make GEN (default: the previous live generation) live again")
    q.add_argument("gen_id", nargs="?", metavar="GEN")
    q.set_defaults(func=cmd_index)

    p = sub.add_parser("remove", help="keep papers out of new generations: PATH (a file or folder), DOC_ID or DOI")
    p.add_argument("target", metavar="PATH|DOC_ID|DOI")
    p.add_argument("--undo", action="store_true", help="restore papers removed before")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("serve", help="HTTP: /healthz, /readyz, /metrics and /search?q=...")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes on the port (default: one per core, at most 4)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("exporter", help="Prometheus /metrics of the pipeline: failed runs, gate verdicts, replica lag")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9108)
    p.set_defaults(func=cmd_exporter)

    from research_pipeline.lib.capacity.options import add_arguments as plan_arguments

    p = sub.add_parser("plan", help="capacity plan for N papers at Q queries/s, from the measured benchmarks")
    plan_arguments(p)
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `research-pipeline` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings()
        logs.configure(settings.log_format, settings.log_level)
        return args.func(args)
    except CliError as exc:
        print(f"research-pipeline: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
