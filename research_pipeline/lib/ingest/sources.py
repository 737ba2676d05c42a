"""Where papers come from: an inbox folder of PDFs, or BEIR-style corpus.jsonl records.

A `Source` is an iterable of `SourceItem`s. An item names its content (`uri`), says how big
and how new it is without reading it (`size`, `mtime`, so unchanged inputs are skipped), and
reads its bytes on demand. A PDF item has a local `path` that the parse workers open; a
future object-store source would download into a temporary file to provide it. An item a
source must not read (a path leaving the inbox) arrives with `problem` set instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


@dataclass
class SourceItem:
    """One input: a PDF file, or one JSONL record (`record` set, `path` None)."""

    uri: str
    kind: str  # "pdf" | "record"
    size: int | None
    mtime: float | None
    path: Path | None = None
    record: dict[str, Any] | None = None
    problem: str | None = None  # a quarantine reason decided without reading (outside_inbox)
    problem_message: str = ""
    doc_id: str | None = None  # set by ingest once the bytes are hashed

    def read_bytes(self) -> bytes:
        if self.problem:
            raise PermissionError(f"{self.uri}: {self.problem_message}")
        if self.record is not None:
            return canonical_json(self.record).encode("utf-8")
        assert self.path is not None
        return self.path.read_bytes()


class Source(Protocol):
    """Anything that yields `SourceItem`s in a deterministic order."""

    def __iter__(self) -> Iterator[SourceItem]: ...


def canonical_json(record: dict[str, Any]) -> str:
    """The canonical JSON of a record: sorted keys, no spaces, UTF-8 text (its doc_id is its sha256)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


@dataclass
class FolderSource:
    """Every *.pdf (any case) under `root`, recursively, in sorted order.

    `paths` restricts the scan to the given files (relative to root or absolute), as a
    sensor or CLI would pass them. A path that resolves outside the inbox (`..`, a symlink
    leaving it) becomes an `outside_inbox` item and is never opened.
    """

    root: Path
    paths: list[str | os.PathLike] | None = None
    _resolved_root: Path = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(os.path.normpath(Path(self.root).absolute()))
        if not self.root.is_dir():
            raise NotADirectoryError(f"inbox {self.root} is not a folder; set RP_INBOX to a folder of PDFs")
        self._resolved_root = self.root.resolve()

    def _outside(self, shown: Path, why: str) -> SourceItem:
        return SourceItem(
            uri=str(shown), kind="pdf", size=None, mtime=None, problem="outside_inbox",
            problem_message=f"{shown} {why} outside the inbox {self.root}; move the file into the inbox",
        )

    def _item(self, shown: Path) -> SourceItem | None:
        lexical = Path(os.path.normpath(shown.absolute()))
        if not _is_within(lexical, self.root):
            return self._outside(shown, "points")
        try:
            real = shown.resolve(strict=True)
        except (FileNotFoundError, RuntimeError):
            return None  # a dangling or looping link is nothing to ingest
        if not _is_within(real, self._resolved_root):
            return self._outside(shown, "resolves to a path")
        if not real.is_file():
            return None
        st = real.stat()
        return SourceItem(uri=str(shown), kind="pdf", size=st.st_size, mtime=st.st_mtime, path=real)

    def __iter__(self) -> Iterator[SourceItem]:
        if self.paths is not None:
            for p in self.paths:
                p = Path(p)
                item = self._item(p if p.is_absolute() else self.root / p)
                if item is not None:
                    yield item
            return
        found: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            here = Path(dirpath)
            for d in list(dirnames):
                link = here / d
                # A symlinked folder is not descended into (loops, double counting); one that
                # leaves the inbox is reported so the user knows why its papers are missing.
                if link.is_symlink() and not _is_within(link.resolve(), self._resolved_root):
                    found.append(link)
            dirnames.sort()
            for name in filenames:
                if name.lower().endswith(".pdf"):
                    found.append(here / name)
        for shown in sorted(found):
            if shown.is_symlink() and shown.is_dir():
                yield self._outside(shown, "is a symlinked folder that resolves to a path")
                continue
            item = self._item(shown)
            if item is not None:
                yield item


@dataclass
class JsonlSource:
    """The records of a BEIR corpus.jsonl (`_id`, `title`, `text`, optional `metadata`)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    def __iter__(self) -> Iterator[SourceItem]:
        st = self.path.stat()
        with open(self.path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                uri_base = f"{self.path}#line{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield SourceItem(uri=uri_base, kind="record", size=len(line), mtime=st.st_mtime,
                                     problem="corrupt", problem_message=f"line {lineno} is not JSON: {exc}")
                    continue
                if not isinstance(record, dict):
                    yield SourceItem(uri=uri_base, kind="record", size=len(line), mtime=st.st_mtime,
                                     problem="corrupt", problem_message=f"line {lineno} is not a JSON object")
                    continue
                rid = record.get("_id", f"line{lineno}")
                yield SourceItem(
                    uri=f"{self.path}#{rid}", kind="record", size=len(line.encode("utf-8")),
                    mtime=st.st_mtime, record=record,
                )


def sources_for(path: str | os.PathLike) -> list[Any]:
    """The sources of a path: a folder is a FolderSource plus a JsonlSource per corpus.jsonl
    found under it; a .jsonl file is a JsonlSource; a .pdf file is a one-file FolderSource."""
    p = Path(path)
    if p.is_dir():
        out: list[Any] = [FolderSource(p)]
        out.extend(JsonlSource(j) for j in sorted(p.rglob("corpus.jsonl")))
        return out
    if p.is_file() and p.suffix.lower() == ".jsonl":
        return [JsonlSource(p)]
    if p.is_file() and p.suffix.lower() == ".pdf":
        return [FolderSource(p.parent, paths=[p.name])]
    raise FileNotFoundError(f"{p} is neither a folder, a .pdf nor a .jsonl; point RP_INBOX at a folder of PDFs")


def iter_items(sources: Iterable[Any]) -> Iterator[SourceItem]:
    for s in sources:
        yield from s
