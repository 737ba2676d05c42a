"""The options of `research-pipeline plan` (the capacity plan for N papers at Q queries per second).

The command itself lives in research_pipeline/cli.py, which prints; this module only declares
the options and turns parsed ones into a plan.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from research_pipeline.lib.capacity.plan import BENCH_DIR, Measurements, plan


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The plan's options, on the `plan` subparser of the main CLI."""
    parser.add_argument("--documents", type=int, required=True, help="papers in the corpus")
    parser.add_argument("--qps", type=float, required=True, help="search queries per second at peak")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs for embedding (needs a measured GPU run)")
    parser.add_argument("--cores", type=int, default=None, help="cores per machine (default: the measured machine's)")
    parser.add_argument("--memory-gib", type=float, default=None, help="memory per machine (default: the measured machine's)")
    parser.add_argument("--reindex-window-h", type=float, default=8.0, help="hours a full reindex may take (default 8)")
    parser.add_argument("--daily-papers", type=int, default=None, help="new papers per day (default 1%% of --documents)")
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help="folder of the bench JSON results")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return parser


def plan_of(args: argparse.Namespace) -> dict[str, Any]:
    """The plan for parsed options (FileNotFoundError, ValueError or LookupError explain a bad input)."""
    return plan(
        args.documents,
        args.qps,
        gpus=args.gpus,
        measurements=Measurements.from_dir(args.bench_dir),
        cores=args.cores,
        memory_gib=args.memory_gib,
        reindex_window_h=args.reindex_window_h,
        daily_papers=args.daily_papers,
    )
