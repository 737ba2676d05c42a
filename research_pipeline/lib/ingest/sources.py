"""Where papers come from: an inbox folder of PDFs, or BEIR-style corpus.jsonl records.

A `Source` is an iterable of `SourceItem`s. An item names its content (`uri`), says how big
and how new it is without reading it (`size`, `mtime`, so unchanged inputs are skipped), and
reads its bytes on demand. A PDF item has a local `path` that the parse workers open; a
future object-store source would download into a temporary file to provide it. An item a
source must not or cannot read (a path leaving the inbox, a broken or looping link, something
that is not a regular file) arrives with `problem` set instead, which ingest turns into a
quarantine row: nothing in the inbox is skipped without a trace.

`inbox_files` is the one listing of an inbox: FolderSource, `sources_for` and the new-papers
sensor all read the inbox through it, so they agree on what is in it (hidden files and
folders, whose names start with ".", are not).

A source whose listing is complete (`complete`) says which recorded uris it speaks for
(`covers`); ingest marks those it did not list as gone, which retires their documents.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from research_pipeline.lib.core.util import pg_safe_text


@dataclass
class SourceItem:
    """One input: a PDF file, or one JSONL record (`record` set, `path` None)."""

    uri: str
    kind: str  # "pdf" | "record"
    size: int | None
    mtime: float | None
    path: Path | None = None
    record: dict[str, Any] | None = None
    problem: str | None = None  # a quarantine reason decided without reading (outside_inbox, broken_link...)
    problem_message: str = ""
    doc_id: str | None = None  # set by ingest once the bytes are hashed

    def read_bytes(self) -> bytes:
        if self.problem:
            raise PermissionError(f"{self.uri}: {self.problem_message}")
        if self.record is not None:
            return record_bytes(self.record)
        assert self.path is not None
        return self.path.read_bytes()


class Source(Protocol):
    """Anything that yields `SourceItem`s in a deterministic order."""

    def __iter__(self) -> Iterator[SourceItem]: ...


def canonical_json(record: dict[str, Any]) -> str:
    """The canonical JSON of a record: sorted keys, no spaces, UTF-8 text (its doc_id is its sha256)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def path_uri(path: str | os.PathLike) -> str:
    """The uri of a local path: its text, with bytes that are not UTF-8 as `\\xNN` escapes.

    Linux file names are bytes; Python shows the undecodable ones as lone surrogates, which no
    database can store. The escapes keep the uri unique and readable.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return text


@dataclass(frozen=True)
class InboxFile:
    """One entry of the inbox listing.

    kind: "pdf" (a *.pdf of any case, possibly a link), "jsonl" (a BEIR corpus.jsonl),
    "folder_link" (a symlinked folder, never descended into) or "unreadable_folder" (a folder
    the listing could not open; its `error` says why).
    """

    path: Path
    kind: str
    error: str = ""

    def rel(self, root: Path) -> str:
        return self.path.relative_to(root).as_posix()


def _hidden(name: str) -> bool:
    return name.startswith(".")


def inbox_files(root: str | os.PathLike) -> list[InboxFile]:
    """Everything under `root` that ingest reads or must report, sorted by path.

    PDFs at any depth and `corpus.jsonl` files; names starting with "." (files and folders:
    drafts, editor and OS files) are not part of the inbox. Symlinked folders are listed but
    not descended into (loops, the same paper twice), and folders that cannot be opened are
    listed too, so that neither disappears silently.
    """
    root = Path(root)
    out: list[InboxFile] = []

    def unreadable(exc: OSError) -> None:
        if exc.filename is not None:
            out.append(InboxFile(Path(exc.filename), "unreadable_folder", f"{exc.strerror or exc}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for d in list(dirnames):
            if (here / d).is_symlink():
                out.append(InboxFile(here / d, "folder_link"))
        for name in filenames:
            if _hidden(name):
                continue
            if name.lower().endswith(".pdf"):
                out.append(InboxFile(here / name, "pdf"))
            elif name == "corpus.jsonl":
                out.append(InboxFile(here / name, "jsonl"))
    out.sort(key=lambda f: f.path)
    return out


def _record_file(uri: str) -> str | None:
    """The .jsonl path part of a record's uri (`<path>#<id>`), if it is one."""
    at = uri.find(".jsonl#")
    return uri[: at + len(".jsonl")] if at >= 0 else None


def record_bytes(record: dict[str, Any]) -> bytes:
    """The bytes a record's doc_id hashes: its canonical JSON in UTF-8 (lone surrogates kept as they came)."""
    return canonical_json(record).encode("utf-8", "surrogatepass")


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


@dataclass
class FolderSource:
    """Every *.pdf (any case) that `inbox_files` lists under `root`, in sorted order.

    `paths` restricts the scan to the given files (relative to root or absolute), as a
    sensor or CLI would pass them. A path that resolves outside the inbox (`..`, a symlink
    leaving it) becomes an `outside_inbox` item and is never opened; a dangling link a
    `broken_link` item, a link loop a `link_loop` item, and a FIFO, device or a file or
    folder that cannot be opened an `unreadable` item.
    """

    root: Path
    paths: list[str | os.PathLike] | None = None
    _resolved_root: Path = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(os.path.normpath(Path(self.root).absolute()))
        if not self.root.is_dir():
            raise NotADirectoryError(f"inbox {self.root} is not a folder; set RP_INBOX to a folder of PDFs")
        self._resolved_root = self.root.resolve()

    @property
    def complete(self) -> bool:
        """Whether this source lists the whole inbox (so what it did not list is gone)."""
        return self.paths is None

    def covers(self, uri: str, kind: str | None) -> bool:
        """Whether a recorded uri is this inbox's to list: its PDFs, and the records of a
        corpus.jsonl under it that no longer exists (a present one is its JsonlSource's)."""
        record_file = _record_file(uri)
        if kind == "record" or (kind is None and record_file):
            # Record uris keep the corpus path as it was given (perhaps relative).
            return (record_file is not None and not os.path.exists(record_file)
                    and (path_uri(os.path.abspath(record_file)) + os.sep).startswith(path_uri(self.root) + os.sep))
        return uri.startswith(path_uri(self.root) + os.sep)

    def _problem(self, shown: Path, reason: str, message: str) -> SourceItem:
        return SourceItem(uri=path_uri(shown), kind="pdf", size=None, mtime=None, problem=reason,
                          problem_message=pg_safe_text(message))

    def _outside(self, shown: Path, why: str) -> SourceItem:
        return self._problem(shown, "outside_inbox",
                             f"{shown} {why} outside the inbox {self.root}; move the file into the inbox")

    def _item(self, shown: Path) -> SourceItem | None:
        lexical = Path(os.path.normpath(shown.absolute()))
        if not _is_within(lexical, self.root):
            return self._outside(shown, "points")
        try:
            real = shown.resolve(strict=True)
        except RuntimeError:  # Python 3.11 reports a loop this way, later versions as ELOOP
            return self._problem(shown, "link_loop", f"{shown} is a symlink loop; replace the link with the file")
        except FileNotFoundError:
            if not shown.is_symlink() and not os.path.lexists(shown):
                return None  # named by a caller but not there (or removed since the listing)
            target = os.readlink(shown) if shown.is_symlink() else "a path"
            return self._problem(shown, "broken_link", f"{shown} is a symlink to {target}, which "
                                 "does not exist; fix or delete the link")
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return self._problem(shown, "link_loop", f"{shown} is a symlink loop; replace the link with the file")
            return self._problem(shown, "unreadable", f"{shown} cannot be resolved ({exc.strerror or exc}); "
                                 "check the permissions of the file and its folders")
        if not _is_within(real, self._resolved_root):
            return self._outside(shown, "resolves to a path")
        try:
            st = real.stat()
        except OSError as exc:
            return self._problem(shown, "unreadable", f"{shown} cannot be read ({exc.strerror or exc}); "
                                 "check the permissions of the file and its folders")
        if real.is_dir():
            return None  # a folder named *.pdf: its contents are listed on their own
        if not real.is_file():
            return self._problem(shown, "unreadable", f"{shown} is not a regular file (a pipe, socket or "
                                 "device); put the PDF itself in the inbox")
        return SourceItem(uri=path_uri(shown), kind="pdf", size=st.st_size, mtime=st.st_mtime, path=real)

    def __iter__(self) -> Iterator[SourceItem]:
        if self.paths is not None:
            for p in self.paths:
                p = Path(p)
                item = self._item(p if p.is_absolute() else self.root / p)
                if item is not None:
                    yield item
            return
        for entry in inbox_files(self.root):
            shown = entry.path
            if entry.kind == "unreadable_folder":
                yield self._problem(shown, "unreadable", f"folder {shown} cannot be listed ({entry.error}); "
                                    "its papers are not ingested until its permissions allow reading")
            elif entry.kind == "folder_link":
                # Not descended into; one that leaves the inbox is reported so the user knows
                # why its papers are missing (one inside is listed at its real place).
                try:
                    target = shown.resolve(strict=True)
                except (OSError, RuntimeError):
                    continue
                if not _is_within(target, self._resolved_root):
                    yield self._outside(shown, "is a symlinked folder that resolves to a path")
            elif entry.kind == "pdf":
                item = self._item(shown)
                if item is not None:
                    yield item


@dataclass
class JsonlSource:
    """The records of a BEIR corpus.jsonl (`_id`, `title`, `text`, optional `metadata`)."""

    path: Path
    #: The whole file is read on every run, so what it no longer holds is gone.
    complete = True

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    def covers(self, uri: str, kind: str | None) -> bool:
        """Whether a recorded uri is one of this file's records."""
        return kind != "pdf" and uri.startswith(f"{path_uri(self.path)}#")

    def __iter__(self) -> Iterator[SourceItem]:
        st = self.path.stat()
        with open(self.path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                uri_base = f"{path_uri(self.path)}#line{lineno}"
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
                    uri=pg_safe_text(f"{path_uri(self.path)}#{rid}"), kind="record", size=len(line.encode("utf-8")),
                    mtime=st.st_mtime, record=record,
                )


def sources_for(path: str | os.PathLike) -> list[Any]:
    """The sources of a path: a folder is a FolderSource plus a JsonlSource per corpus.jsonl
    found under it; a .jsonl file is a JsonlSource; a .pdf file is a one-file FolderSource."""
    p = Path(path)
    if p.is_dir():
        out: list[Any] = [FolderSource(p)]
        out.extend(JsonlSource(f.path) for f in inbox_files(p) if f.kind == "jsonl")
        return out
    if p.is_file() and p.suffix.lower() == ".jsonl":
        return [JsonlSource(p)]
    if p.is_file() and p.suffix.lower() == ".pdf":
        return [FolderSource(p.parent, paths=[p.name])]
    raise FileNotFoundError(f"{p} is neither a folder, a .pdf nor a .jsonl; point RP_INBOX at a folder of PDFs")


def iter_items(sources: Iterable[Any]) -> Iterator[SourceItem]:
    for s in sources:
        yield from s
