"""The capacity plan against measured runs: calibrated on the other measured corpora, it predicts
each run's measured reindex time and disk (docs/bench/embed-*-cpu.json) within +-30%; its search
latency is bench_search's curve levelled by machine, and misses the loaded runs' (xfail, measured)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from research_pipeline import cli
from research_pipeline.lib.capacity.plan import BENCH_DIR, Measurements, Shape, plan, render

TOLERANCE = 0.30


RUNS = sorted(BENCH_DIR.glob("embed-*-cpu.json"))


def measured(path) -> dict:
    return json.loads(path.read_text())


def within(predicted: float, actual: float) -> bool:
    return abs(predicted - actual) <= TOLERANCE * actual


def test_two_measured_corpora():
    corpora = {measured(p)["reindex"]["corpus"].split("-")[0] for p in RUNS}
    assert {"demo", "shared"} <= corpora, f"run bench_embed on both corpora; found {[p.name for p in RUNS]}"


def _predicted(path) -> tuple[dict, dict]:
    """The plan's figures for a measured run, computed from the other runs only, and the run."""
    run = measured(path)
    r = run["reindex"]
    m = Measurements.from_dir(BENCH_DIR, exclude_corpora=[r["corpus"]])
    assert all(p["reindex"]["corpus"] != r["corpus"] for p in m.profiles)
    # The corpus's shape (chunks, pages, bytes per paper) is an input; the rates are not.
    result = plan(r["papers"], qps=1, measurements=m, shape=Shape.of(run))
    return {k: v["value"] for k, v in result["figures"].items()}, r


@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_plan_predicts_reindex_time_and_disk_of_a_run_it_was_not_computed_from(path):
    f, r = _predicted(path)
    assert f["chunks"] == r["chunks"]
    checks = {
        "reindex_s": (f["reindex_s"], r["reindex_s"]),
        "disk_bytes": (f["storage_one_generation_gib"] * 2**30, r["db_bytes"] + r["vector_bytes"]),
    }
    off = {k: round(p / a, 2) for k, (p, a) in checks.items() if not within(p, a)}
    assert not off, f"predicted/measured outside +-{TOLERANCE:.0%} for {r['corpus']}: {off}"


@pytest.mark.xfail(
    strict=True,
    reason="issue 15 open, measured miss: the plan gives bench_search's idle curve (16.8 ms p50 at <=10k chunks, "
    "load 0.8) and the runs measured p50 48.3 ms (demo, 1,024 chunks; 0.35x) and 25.6 ms (shared-8, 553 chunks; "
    "0.66x) at load average 7.4 and 7.2 on 2 cores. The two loaded runs also disagree with each other by 1.9x at "
    "near-equal sizes. Re-measured idle on 2026-12-08 (another 2-core machine, AMD EPYC without native bf16, load "
    "1.0): 25.5 ms (demo, 0.66x) and 21.1 ms (shared-8, 0.80x), so half of the miss was load; the demo run stays "
    "outside +-30% because the plan's curve comes from one bench_search machine and is not levelled for a CPU "
    "without bf16. The committed runs are the bf16 machine's; re-run bench_search and bench_embed on one idle "
    "machine and this passes or names the remaining miss",
)
@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_plan_predicts_search_latency_of_a_measured_run(path):
    f, r = _predicted(path)
    assert within(f["search_p50_ms"], r["search_p50_ms"]), (
        f"p50 predicted/measured {f['search_p50_ms'] / r['search_p50_ms']:.2f} for {r['corpus']}"
    )


def test_search_latency_is_bench_search_levelled_by_machine():
    m = Measurements.from_dir(BENCH_DIR)
    shape = Shape.of(m.reference("cpu"))
    same = plan(600, qps=1, measurements=m, shape=shape)["figures"]
    # On the machine bench_search ran on, the plan is its measured curve.
    point = next(p for p in m.search_points if p["backend"] == "sqlite" and p["chunks"] == 10_000)
    small = plan(200, qps=1, measurements=m)["figures"]
    assert small["chunks"]["value"] <= 10_000 and small["search_p50_ms"]["value"] == point["p50_ms"]
    # A CPU measured at half the per-core embedding rate runs each search twice as long.
    ref = m.reference("cpu")
    slower = {**ref, "machine": {**ref["machine"], "cpu_model": "Slower CPU"},
              "pipeline_chunks_per_s": max(p["pipeline_chunks_per_s"] for p in m.profiles) / 2,
              "reindex": {**ref["reindex"], "chunks": ref["reindex"]["chunks"] * 10}}
    m2 = Measurements(profiles=[*m.profiles, slower], search_points=m.search_points,
                      search_machine=m.search_machine, sources=m.sources)
    assert m2.reference("cpu") is slower
    other = plan(600, qps=1, measurements=m2, shape=shape)["figures"]
    assert other["chunks"] == same["chunks"] and 10_000 < same["chunks"]["value"] < 20_000  # one index shard
    assert other["search_p50_ms"]["value"] == pytest.approx(2 * same["search_p50_ms"]["value"], rel=0.01)
    assert "Slower CPU" in other["search_p50_ms"]["formula"]


def test_every_figure_has_its_formula_and_scale_moves_the_limits():
    small = plan(100, qps=0.1)
    big = plan(1_000_000, qps=500)
    for result in (small, big):
        for name, fig in result["figures"].items():
            assert fig["formula"], name
            if isinstance(fig["value"], (int, float)):
                assert fig["value"] >= 0, name
    s, b = small["figures"], big["figures"]
    assert b["reindex_embed_s"]["value"] / s["reindex_embed_s"]["value"] == pytest.approx(10_000, rel=0.01)
    assert b["search_replicas"]["value"] > s["search_replicas"]["value"] == 1
    assert (s["database"]["value"], b["database"]["value"]) == ("sqlite", "postgresql")
    assert s["embedding_workers"]["value"] == 1 < b["embedding_workers"]["value"]
    assert big["limits"]["reindex_window"]["exceeded"] and not small["limits"]["reindex_window"]["exceeded"]
    assert big["limits"]["memory"]["papers"] == small["limits"]["memory"]["papers"]  # a property of the machine
    assert "one machine stops at (memory)" in render(big)


def test_gpus_use_the_measured_gpu_run_and_say_so_without_one():
    m = Measurements.from_dir(BENCH_DIR)
    assert m.gpu_runs, "docs/bench/embed-demo-cuda.json (bench_embed_gpu) is the measured GPU run"
    gpu = max(m.gpu_runs, key=lambda p: p["pipeline_chunks_per_s"])
    cpu_only = plan(100_000, qps=10, measurements=m)["figures"]
    two = plan(100_000, qps=10, gpus=2, measurements=m)["figures"]
    chunks = two["chunks"]["value"]
    assert two["reindex_embed_s"]["value"] == pytest.approx(chunks / (2 * gpu["pipeline_chunks_per_s"]), rel=0.01)
    assert two["reindex_embed_s"]["value"] < cpu_only["reindex_embed_s"]["value"] / 100
    assert "measured GPU run" in two["reindex_embed_s"]["formula"] and "database" in two["reindex_embed_s"]["formula"]
    # Without a GPU run under the bench folder, the plan says what to measure instead of guessing.
    none = Measurements(profiles=m.profiles, search_points=m.search_points, search_machine=m.search_machine)
    fig = plan(100_000, qps=10, gpus=2, measurements=none)["figures"]["reindex_embed_gpu_s"]
    assert fig["value"] is None and "RP_DEVICE=cuda" in fig["formula"]


def test_plan_command_of_the_main_cli(capsys, tmp_path):
    assert cli.main(["plan", "--documents", "10000", "--qps", "5", "--gpus", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["inputs"]["documents"] == 10_000 and out["inputs"]["qps"] == 5
    assert out["figures"]["chunks"]["value"] > 0 and "reindex_s" in out["figures"]
    assert cli.main(["plan", "--documents", "10000", "--qps", "5", "--bench-dir", str(tmp_path)]) == 2
    assert "make bench BENCH=embed" in capsys.readouterr().err
    assert cli.main(["plan", "--documents", "0", "--qps", "1"]) == 2
    assert "documents must be > 0" in capsys.readouterr().err


def test_plan_through_the_console_script():
    script = Path(sys.executable).with_name("research-pipeline")
    assert script.exists(), f"the package is not installed in {sys.executable}'s environment (pip install -e .)"
    done = subprocess.run(
        [str(script), "plan", "--documents", "100000", "--qps", "20"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Capacity plan: 100,000 papers, 20 qps")
    assert "one machine stops at (memory)" in done.stdout and "search_replicas" in done.stdout
