"""Benchmark: paper metadata (title, authors, year, arXiv id, DOI) against the hand-written truth table.

Each paper in `research_pipeline_tests/fixtures/metadata_truth.tsv` is parsed with `parse_pdf`
(no OCR) and scored on all papers and on each split (`tune`, `held_out`, `fresh`), with the
metadata step's time per paper. `--rev REV` scores the extractor (`lib/ingest/page_lines.py`,
`authors.py`, `metadata.py`; `metadata.py` alone before they were split) as it was at a git
revision instead (e.g. the extractor before a change), with today's `pdf.py` around it.

    .venv/bin/python -m bench.bench_metadata [--rev REV] [--misses all|tune|held_out|fresh]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPERS = Path(os.environ.get("RP_SHARED_DATA", REPO.parent / "shared" / "data")) / "papers"
TRUTH = REPO / "research_pipeline_tests" / "fixtures" / "metadata_truth.tsv"
PACKAGE = "research_pipeline.lib.ingest"
#: The extractor's modules at a revision, in import order; before they were split out of
#: metadata.py (in the commit that added page_lines.py), metadata.py alone.
EXTRACTOR = ("page_lines", "authors", "metadata")


def _load_extractor_at(rev: str) -> None:
    """Put the extractor's modules as of `rev` in place of today's, for `parse_pdf` to import.

    A revision from before the split has metadata.py only; it held `first_page_lines`, so it
    also stands in for page_lines.
    """
    import research_pipeline.lib.ingest as package

    loaded: dict[str, types.ModuleType] = {}
    for name in EXTRACTOR:
        path = f"research_pipeline/lib/ingest/{name}.py"
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=REPO, capture_output=True, text=True,
                               check=False)
        if shown.returncode:
            if name == "metadata":
                sys.exit(f"git show {rev}:{path} failed: {shown.stderr.strip()}; pass a revision that has the file")
            continue
        module = types.ModuleType(f"{PACKAGE}.{name}")
        module.__file__ = f"{rev}:{path}"
        # Registered before it runs: the next module imports it from there.
        sys.modules[module.__name__] = module
        setattr(package, name, module)
        exec(compile(shown.stdout, module.__file__, "exec"), module.__dict__)  # noqa: S102 - our own file from git
        loaded[name] = module
    if "page_lines" not in loaded:
        sys.modules[f"{PACKAGE}.page_lines"] = package.page_lines = loaded["metadata"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", help="score the metadata extractor as of this git revision")
    parser.add_argument("--misses", choices=("all", "tune", "held_out", "fresh"),
                        help="print every disagreement on these papers")
    args = parser.parse_args(argv)
    if not PAPERS.is_dir():
        sys.exit(f"shared papers missing: {PAPERS} (expected ../shared/data/papers beside the repo, "
                 "or set RP_SHARED_DATA)")
    if args.rev:
        _load_extractor_at(args.rev)
    from research_pipeline.lib.ingest import metadata as md
    from research_pipeline.lib.ingest import metadata_eval, page_lines
    from research_pipeline.lib.ingest.pdf import parse_pdf

    # langdetect loads its profiles on first use (~1.5 s): not a cost per paper.
    md.detect_language("Dies ist ein kurzer deutscher Satz, der nur die Spracherkennung aufwärmt, sonst nichts.")
    truth = metadata_eval.load_truth(TRUTH)
    results = []
    extract_s = 0.0
    for row in truth:
        result = parse_pdf(PAPERS / row.file.removeprefix("shared:papers/"), ocr=False)
        if not result.ok:
            sys.exit(f"{row.file} did not parse ({result.reason}: {result.message})")
        results.append((row, result.metadata))
        # The metadata step alone, on the pages parse_pdf extracted: what ingestion pays for it.
        import pypdfium2 as pdfium

        doc = pdfium.PdfDocument(str(PAPERS / row.file.removeprefix("shared:papers/")))
        try:
            page = doc[0]
            textpage = page.get_textpage()
            started = time.perf_counter()  # loading page 1 is the parser's cost, not metadata's
            lines = page_lines.first_page_lines(textpage)
            md.pdf_metadata(doc, result.pages, Path(row.file).name, lines)
            extract_s += time.perf_counter() - started
            textpage.close()
            page.close()
        finally:
            doc.close()
    label = f"metadata.py at {args.rev}" if args.rev else "metadata.py in the working tree"
    print(f"{label}; truth {TRUTH.relative_to(REPO)}")
    for name in ("all", "tune", "held_out", "fresh"):
        subset = [r for r in results if name in ("all", r[0].split)]
        print(f"  {name:9s}", metadata_eval.score(subset).summary())
    print(f"  metadata step: {1000 * extract_s / len(results):.2f} ms per paper (page-1 lines + pdf_metadata)")
    if args.misses:
        chosen = [r for r in results if args.misses in ("all", r[0].split)]
        for miss in metadata_eval.score(chosen).misses:
            print("  miss:", miss)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
