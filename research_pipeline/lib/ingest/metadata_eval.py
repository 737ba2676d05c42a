"""Scoring extracted paper metadata against a hand-written truth table (title, authors, year, ids).

The truth table is a TSV with columns file, title, family_names (";"-separated, in page order),
year (empty when page 1 prints none), arxiv_id, doi, split (`tune`, `held_out` or `fresh`) and note.
Plain Python; the caller supplies the extracted metadata, so any extractor can be scored.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from research_pipeline.lib.ingest.metadata import normalize_title


@dataclass(frozen=True)
class TruthRow:
    """The expected metadata of one paper, as read from its first page."""

    file: str
    title: str
    family_names: tuple[str, ...]
    year: int | None
    arxiv_id: str | None
    doi: str | None
    split: str


def load_truth(path: str | Path) -> list[TruthRow]:
    """The rows of a metadata truth table; a malformed row names its line."""
    rows: list[TruthRow] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh, delimiter="\t"), start=2):
            try:
                year = row["year"].strip()
                rows.append(TruthRow(
                    file=row["file"],
                    title=row["title"],
                    family_names=tuple(f.strip() for f in row["family_names"].split(";") if f.strip()),
                    year=int(year) if year else None,
                    arxiv_id=row["arxiv_id"].strip() or None,
                    doi=row["doi"].strip() or None,
                    split=row["split"].strip(),
                ))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}:{n}: bad truth row ({exc}); expected columns file, title, "
                                 "family_names, year, arxiv_id, doi, split, note") from exc
    return rows


def family_key(name: str) -> str:
    """A comparison key for a family name: its last word, accents stripped, casefolded.

    "van Renesse" and "Renesse", "Pérez" and "Perez", "PEYTON JONES" and "Jones" agree.
    """
    text = unicodedata.normalize("NFKD", name)
    text = "".join(c for c in text if not unicodedata.combining(c)).casefold()
    words = re.findall(r"[\w'\-]+", text.replace("ı", "i"))
    return words[-1].strip("-'") if words else ""


def family_of(author: str) -> str:
    """The family name in an author string: before the comma of "Family, Given", else the last word."""
    if "," in author:
        return author.split(",", 1)[0]
    return author


@dataclass
class Score:
    """Title accuracy, author family-name precision/recall/F1, year and identifier accuracy."""

    papers: int = 0
    titles_right: int = 0
    authors_found: int = 0
    authors_true: int = 0
    authors_matched: int = 0
    printed_years: int = 0
    printed_years_right: int = 0
    unprinted_years: int = 0
    years_invented: int = 0
    ids_right: int = 0
    misses: list[str] = field(default_factory=list)

    @property
    def title_accuracy(self) -> float:
        return self.titles_right / self.papers if self.papers else 0.0

    @property
    def author_precision(self) -> float:
        return self.authors_matched / self.authors_found if self.authors_found else 0.0

    @property
    def author_recall(self) -> float:
        return self.authors_matched / self.authors_true if self.authors_true else 0.0

    @property
    def author_f1(self) -> float:
        p, r = self.author_precision, self.author_recall
        return 2 * p * r / (p + r) if p + r else 0.0

    @property
    def year_accuracy(self) -> float:
        """Share of the papers that print a year whose year was found."""
        return self.printed_years_right / self.printed_years if self.printed_years else 0.0

    @property
    def invented_year_rate(self) -> float:
        """Share of the papers that print no year that were given one anyway."""
        return self.years_invented / self.unprinted_years if self.unprinted_years else 0.0

    @property
    def id_accuracy(self) -> float:
        """Share of papers whose arXiv id and DOI (each possibly none) both match."""
        return self.ids_right / self.papers if self.papers else 0.0

    def summary(self) -> str:
        return (f"{self.papers} papers: title {self.title_accuracy:.2f}, authors P {self.author_precision:.2f} "
                f"R {self.author_recall:.2f} F1 {self.author_f1:.2f}, printed year {self.year_accuracy:.2f} "
                f"({self.printed_years_right}/{self.printed_years}), years invented "
                f"{self.years_invented}/{self.unprinted_years}, arXiv+DOI {self.id_accuracy:.2f}")


def _norm_id(value: str | None) -> str | None:
    return value.strip().rstrip(".").casefold() if value else None


def score(pairs: Iterable[tuple[TruthRow, dict[str, Any]]]) -> Score:
    """Score (truth, extracted metadata) pairs; `misses` lists each disagreement in words."""
    s = Score()
    for truth, meta in pairs:
        s.papers += 1
        name = truth.file.rsplit("/", 1)[-1]
        if normalize_title(meta.get("title")) == normalize_title(truth.title):
            s.titles_right += 1
        else:
            s.misses.append(f"{name}: title {meta.get('title')!r}, expected {truth.title!r}")
        found = Counter(k for k in (family_key(family_of(a)) for a in meta.get("authors") or []) if k)
        expected = Counter(family_key(f) for f in truth.family_names)
        matched = sum((found & expected).values())
        s.authors_found += sum(found.values())
        s.authors_true += sum(expected.values())
        s.authors_matched += matched
        if found != expected:
            s.misses.append(f"{name}: authors {meta.get('authors')!r}, expected {list(truth.family_names)!r}")
        year = meta.get("year")
        if truth.year is not None:
            s.printed_years += 1
            s.printed_years_right += year == truth.year
        else:
            s.unprinted_years += 1
            s.years_invented += year is not None
        if year != truth.year:
            s.misses.append(f"{name}: year {year!r}, expected {truth.year!r}")
        found_ids = (_norm_id(meta.get("arxiv_id")), _norm_id(meta.get("doi")))
        if found_ids == (_norm_id(truth.arxiv_id), _norm_id(truth.doi)):
            s.ids_right += 1
        else:
            s.misses.append(f"{name}: arXiv {meta.get('arxiv_id')!r} DOI {meta.get('doi')!r}, "
                            f"expected {truth.arxiv_id!r} {truth.doi!r}")
    return s
