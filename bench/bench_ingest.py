"""Benchmark: ingestion pages/s against bare pypdfium2 on the same shared papers, in one run.

The pipeline (child-process parsing, cleanup, quality scoring, metadata, SQLite writes) runs
with 1 and 2 workers over the papers whose manifest text layer is `text`; the primitive is
pypdfium2 opening each file and extracting every page's text in this process. Image-only
papers (OCR) are measured separately with `--ocr`, since OCR costs ~100x a text page.

    .venv/bin/python -m bench.bench_ingest [--limit N] [--ocr]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from research_pipeline.lib.core import store
from research_pipeline.lib.ingest.pipeline import ingest
from research_pipeline.lib.ingest.sources import FolderSource

REPO = Path(__file__).resolve().parents[1]
PAPERS = Path(os.environ.get("RP_SHARED_DATA", REPO.parent / "shared" / "data")) / "papers"


def manifest_files(layer: str, limit: int | None) -> list[str]:
    with open(PAPERS / "MANIFEST.tsv", encoding="utf-8") as fh:
        rows = [r["file"] for r in csv.DictReader(fh, delimiter="\t") if r["text_layer"] == layer]
    return rows[:limit] if limit else rows


def raw_pypdfium2(files: list[str]) -> tuple[int, float, float]:
    """Bare pypdfium2: open, extract every page's text, close. Returns (pages, seconds, CPU seconds)."""
    import pypdfium2 as pdfium

    started = time.perf_counter()
    cpu0 = time.process_time()
    pages = 0
    for rel in files:
        doc = pdfium.PdfDocument(str(PAPERS / rel))
        try:
            for i in range(len(doc)):
                page = doc[i]
                textpage = page.get_textpage()
                textpage.get_text_range()
                textpage.close()
                page.close()
                pages += 1
        finally:
            doc.close()
    return pages, time.perf_counter() - started, time.process_time() - cpu0


def pipeline(files: list[str], workers: int, ocr: bool = False) -> tuple[int, float, float]:
    """The ingest pipeline into a fresh SQLite store. Returns (document pages, wall s, CPU s).

    CPU seconds include the workers (reaped children) and their tesseract processes."""
    with tempfile.TemporaryDirectory() as tmp:
        engine = store.make_engine(f"sqlite:///{tmp}/rp.db")
        store.create_schema(engine)
        cpu0 = _cpu()
        report = ingest(engine, [FolderSource(PAPERS, paths=files)], workers=workers, timeout_s=300, ocr=ocr)
        cpu = _cpu() - cpu0
        engine.dispose()
    return report.pages, report.seconds, cpu


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N text papers")
    ap.add_argument("--ocr", action="store_true", help="also time the image-only papers (OCR)")
    args = ap.parse_args(argv)
    files = manifest_files("text", args.limit)
    if not files:
        sys.exit(f"no papers found under {PAPERS}; expected ../shared/data/papers beside the repo")

    raw_pages, raw_s, raw_cpu = raw_pypdfium2(files)
    _, p1_s, p1_cpu = pipeline(files, workers=1)
    _, p2_s, p2_cpu = pipeline(files, workers=2)
    # Pages/s over the same pages for every row: the pipeline parses the garbled papers too
    # before it quarantines them, so their pages count as work done.
    raw_rate = raw_pages / raw_s
    rows = [
        ("bare pypdfium2, 1 process", raw_s, raw_cpu),
        ("pipeline, 1 worker", p1_s, p1_cpu),
        ("pipeline, 2 workers", p2_s, p2_cpu),
    ]
    print(f"\n{len(files)} text papers, {raw_pages} pages, from {PAPERS} "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end)\n")
    print("| run | seconds | pages/s | ratio (wall) | CPU seconds | pages per CPU s | ratio (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, secs, cpu in rows:
        rate = raw_pages / secs
        print(f"| {name} | {secs:.1f} | {rate:.0f} | {rate / raw_rate:.2f}x | {cpu:.1f} | "
              f"{raw_pages / cpu:.0f} | {raw_cpu / cpu:.2f}x |")
    print(f"\n2 workers / 1 worker: {p1_s / p2_s:.2f}x")
    if args.ocr:
        scans = manifest_files("image_only", None)
        o_pages, o_s, o_cpu = pipeline(scans, workers=2, ocr=True)
        print(f"\nOCR (image-only papers, 2 workers): {len(scans)} files, {o_pages} pages in {o_s:.1f} s "
              f"= {o_pages / o_s:.2f} pages/s ({o_cpu:.0f} CPU s)")


if __name__ == "__main__":
    main()
