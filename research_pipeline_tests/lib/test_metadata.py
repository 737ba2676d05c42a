"""Metadata extraction against a hand-checked sample: titles and years of 50 real papers."""

from __future__ import annotations

import csv
import re

import pytest

from research_pipeline.lib.ingest import metadata as md
from research_pipeline.lib.ingest.pdf import parse_pdf
from research_pipeline_tests.conftest import PAPERS, REPO, require_shared

FIXTURE = REPO / "research_pipeline_tests" / "fixtures" / "metadata_sample.tsv"


def _resolve(name: str):
    if name.startswith("shared:papers/"):
        return require_shared(PAPERS) / name.removeprefix("shared:papers/")
    return REPO / name


def test_metadata_sample_accuracy():
    rows = list(csv.DictReader(open(FIXTURE, encoding="utf-8"), delimiter="\t"))
    assert len(rows) >= 25
    title_hits = year_hits = 0
    misses = []
    for row in rows:
        result = parse_pdf(_resolve(row["file"]), ocr=False)
        assert result.ok, (row["file"], result.reason, result.message)
        meta = result.metadata
        t_ok = md.normalize_title(meta["title"]) == md.normalize_title(row["title"])
        y_ok = meta["year"] == int(row["year"])
        title_hits += t_ok
        year_hits += y_ok
        if not (t_ok and y_ok):
            misses.append((row["file"], meta["title"], meta["year"], row["title"], row["year"]))
    title_acc, year_acc = title_hits / len(rows), year_hits / len(rows)
    print(f"\nmetadata accuracy on {len(rows)} papers: title {title_acc:.2f}, year {year_acc:.2f}")
    for miss in misses:
        print("  miss:", miss)
    assert title_acc >= 0.9
    assert year_acc >= 0.9


def test_doi_arxiv_language_and_abstract_from_first_page():
    jose = REPO / "examples" / "papers" / "jose-2018-cfd-python-12-steps-navier-stokes.pdf"
    meta = parse_pdf(jose, ocr=False).metadata
    # ATTRIBUTION.tsv records this paper's DOI.
    assert meta["doi"] == "10.21105/jose.00021"
    assert meta["language"] == "en"
    assert meta["page_count"] >= 1


def test_language_detection_by_script_and_langdetect():
    assert md.detect_language("古代玻璃最初由丝绸之路传入我国，在与本土材料和技术相结合之后，发展出铅钡和高钾两类玻璃。") == "zh"
    english = "The present free storage control program has a severe limitation in that it can handle only list structure."
    assert md.detect_language(english) == "en"
    assert md.detect_language("12 3") is None


def test_language_of_short_first_pages_reads_on():
    # A title page and a table of contents are too few words for the English check; the pages
    # after them decide it, without langdetect. Other languages still go to langdetect.
    first = "Paxos Made Simple\nLeslie Lamport\nContents\n1 Introduction 1\n2 The Consensus Algorithm 1"
    more = " The Paxos algorithm for implementing a fault-tolerant distributed system has been regarded as " \
           "difficult to understand, perhaps because the original presentation was Greek to many readers. " \
           "In fact, it is among the simplest and most obvious of distributed algorithms. At its heart is a " \
           "consensus algorithm, the synod algorithm of the paper. The next section shows that this " \
           "consensus algorithm follows almost unavoidably from the properties we want it to satisfy."
    assert md.detect_language(first, more) == "en"
    dutch = "Factuur Lenze Postbus Kamer van Koophandel Verkoopkantoor Pagina " * 3
    assert md.detect_language(dutch, " " + dutch) == md.detect_language(dutch) == "nl"


def test_dated_years_are_found_on_the_lines_that_hold_a_year():
    text = ("Journal of Things, Vol. 12\nReceived 3 May 2019; accepted 2020\nno year here\n"
            "(c) ACM 1999 and 2049 but not 20191 or 2050\nDraft\n2003 alone\nunpublished 2018")
    years, lines = md._years_and_their_lines(text)
    assert years == md.YEAR_RE.findall(text)
    assert md._DATED_RE.findall(lines) == md._DATED_RE.findall(text) == ["2019", "2020", "2018"]


def test_doi_pattern_needs_a_word_boundary():
    for text in ["doi:10.1145/3183713.3196909.", "see 10.21105/jose.00021 here", "x10.1000/abc", "110.1000/abc",
                 "10.1000/abc", "https://doi.org/10.48550/arXiv.1706.03762", "_10.1000/a", "\u00e910.1000/a"]:
        old = re.search(r"\b(10\.\d{4,9}/[^\s\"<>]+)", text, re.IGNORECASE)
        new = md.DOI_RE.search(text)
        assert (old and (old.span(), old.group(1))) == (new and (new.span(), new.group(1))), text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("see arXiv:1706.03762v5 [cs.CL] for details", "1706.03762"),
        ("arXiv:math/0411343v1 [math.DS] 15 Nov 2004", "math/0411343"),
        ("no identifier here", None),
    ],
)
def test_arxiv_pattern(text, expected):
    m = md.ARXIV_RE.search(text)
    assert (m.group(1) if m else None) == expected


def test_record_metadata_reads_beir_fields():
    meta = md.record_metadata({"_id": "7", "title": " A title ", "text": "body", "metadata": {"year": "2019"}})
    assert meta["title"] == "A title"
    assert meta["year"] == 2019
    assert md.record_metadata({"_id": "8", "title": "", "text": "x"})["title"] is None
