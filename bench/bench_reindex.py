"""Benchmark: CPU time of reindex_job on a corpus, first run against an unchanged re-run.

Runs the code location's own reindex_job (ingest -> chunks -> chunk_embeddings over all 16
shards -> fts_index/vector_index -> release gates -> publish) twice over the same inbox, in a
fresh work dir (SQLite, local object store, a Dagster instance in the work dir). Each run is a
fresh Python process, as a run launched by the daemon is, so each pays its own imports and
model load. Prints for each run its CPU time (the process and the ingest's parser children),
its wall time, the assets it materialized and the index generations that exist after it. The unchanged
re-run should build no index and no new generation, at a small fraction of the first run's CPU.

Run from the repo root:
    .venv/bin/python -m bench.bench_reindex                 # the demo corpus (examples/papers)
    .venv/bin/python -m bench.bench_reindex --papers 4      # the 4 smallest papers (a quick check)
    .venv/bin/python -m bench.bench_reindex --json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DEMO_PAPERS = REPO / "examples" / "papers"


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have exited."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_once(work: Path) -> dict:
    """One reindex_job run in this process over the work dir; the assets it materialized and the generations."""
    import dagster as dg

    from research_pipeline.config import Settings
    from research_pipeline.defs.embeddings.assets import chunk_embeddings
    from research_pipeline.defs.ingest.assets import chunks, documents
    from research_pipeline.defs.resources import ReleaseGatesResource, build_resources
    from research_pipeline.defs.search.assets import fts_index, published_index, vector_index
    from research_pipeline.defs.search.checks import release_gates_check
    from research_pipeline.defs.search.jobs import reindex_job
    from research_pipeline.lib.release import registry

    settings = Settings(
        home=work, inbox=work / "inbox", database_url=f"sqlite:///{work / 'rp.db'}", object_store_url=str(work / "objects")
    )
    resources = build_resources(settings)
    # The bench measures what a run costs, not the latency SLA: on a busy shared machine the
    # latency gate would block the publish and the first run would not be a complete reindex.
    resources["release_gates"] = ReleaseGatesResource(latency_p95_ms=600_000.0)
    defs = dg.Definitions(
        assets=[documents, chunks, chunk_embeddings, fts_index, vector_index, published_index],
        asset_checks=[release_gates_check],
        jobs=[reindex_job],
        resources=resources,
    )
    run_config = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    instance = dg.DagsterInstance.from_config(str(work / "dagster"))
    result = defs.resolve_job_def("reindex_job").execute_in_process(
        instance=instance, run_config=run_config, raise_on_error=False
    )
    engine = resources["database"].get_engine()
    if not result.success:
        failed = [e for e in result.all_events if e.is_step_failure]
        for event in failed:
            print(f"step {event.step_key} failed: {event.step_failure_data.error.message[:2000]}", file=sys.stderr)
        gates = [e for e in result.get_asset_check_evaluations() if not e.passed]
        for gate in gates:
            print(f"gate {gate.check_name} failed: {gate.description}", file=sys.stderr)
    out = {
        "success": result.success,
        "materialized": sorted({e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}),
        "generations": len(registry.list_generations(engine)),
    }
    engine.dispose()
    return out


def timed_run(work: Path) -> dict:
    """One reindex_job run in a fresh process: its CPU and wall seconds plus what run_once reports."""
    import subprocess

    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_reindex", "--run-once", str(work)],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-5000:])
        raise SystemExit(f"the reindex run failed (exit {proc.returncode})")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if not report["success"]:
        report["errors"] = proc.stderr[-3000:]
    return {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2), **report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--papers", type=int, default=0, help="only the N smallest papers (0: all)")
    parser.add_argument("--inbox", default=str(DEMO_PAPERS), help="folder of PDFs (default: examples/papers)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--run-once", metavar="WORK_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_once:
        print(json.dumps(run_once(Path(args.run_once))))
        return 0

    papers = sorted(Path(args.inbox).glob("*.pdf"), key=lambda p: p.stat().st_size)
    if args.papers:
        papers = papers[: args.papers]
    if not papers:
        parser.error(f"no PDFs in {args.inbox}")
    with tempfile.TemporaryDirectory(prefix="bench_reindex_") as tmp:
        work = Path(tmp)
        inbox = work / "inbox"
        inbox.mkdir()
        for pdf in papers:
            shutil.copy2(pdf, inbox / pdf.name)
        (work / "dagster").mkdir()
        runs = {}
        for name in ("first", "unchanged"):
            runs[name] = timed_run(work)
            if not runs[name]["success"]:
                print(f"the {name} run failed: {runs[name].get('errors', '')}", file=sys.stderr)
                return 1
    share = runs["unchanged"]["cpu_s"] / runs["first"]["cpu_s"] if runs["first"]["cpu_s"] else float("nan")
    figures = {
        "papers": len(papers),
        "cores": os.cpu_count(),
        **{f"{name}_{k}": v for name, run in runs.items() for k, v in run.items()},
        "unchanged_cpu_share": round(share, 4),
        "new_generations_unchanged": runs["unchanged"]["generations"] - runs["first"]["generations"],
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"reindex_job on {len(papers)} papers ({os.cpu_count()} cores)")
    for name, run in runs.items():
        print(
            f"  {name:<9} CPU {run['cpu_s']:8.2f} s  wall {run['wall_s']:8.2f} s  generations {run['generations']}  "
            f"materialized: {', '.join(run['materialized'])}"
        )
    print(
        f"  unchanged / first CPU: {share:.1%}; new generations on the unchanged run: "
        f"{figures['new_generations_unchanged']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
