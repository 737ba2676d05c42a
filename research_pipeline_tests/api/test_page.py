"""The search page and the PDF route: escaping, highlighting, pagination, filters, path safety."""

from __future__ import annotations

import hashlib
import html.parser
import os
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa

from research_pipeline.lib.core import store
from research_pipeline_tests.shared import (
    API_GROUP,
    HOSTILE_TITLE,
    HOSTILE_WORD,
    SAMPLE,
    running_service,
)

pytestmark = [API_GROUP, pytest.mark.slow]


class Elements(html.parser.HTMLParser):
    """The tags of a page and the text inside <mark>, <li class=paper> titles, as a browser parses them."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.marks: list[str] = []
        self.text: list[str] = []
        self._in_mark = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_mark = tag == "mark"

    def handle_endtag(self, tag):
        if tag == "mark":
            self._in_mark = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_mark:
            self.marks.append(data)


def test_page_shows_results_per_paper_escaped_and_highlighted(deployment):
    settings, facts = deployment
    with running_service(settings) as svc:
        status, headers, body = svc.get("/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in headers["content-security-policy"]
        page = Elements(body.decode())
        assert ("input", {"type": "search", "name": "q", "id": "q", "value": "", "autofocus": None}) in page.tags

        status, _, body = svc.get("/", {"q": f"{HOSTILE_WORD} confusion matrix"})
        text = body.decode()
        page = Elements(text)
        papers = [a["data-doc-id"] for t, a in page.tags if t == "li"]
        assert status == 200 and papers[0] == facts["pycm"] and len(papers) == len(set(papers))
        # The hostile title, authors and chunk text are shown as text: no element came from them.
        assert not [t for t, _ in page.tags if t in ("script", "img", "b")]
        shown = "".join(page.text)
        assert HOSTILE_TITLE in shown and "<b>Haghighi</b>" in shown and "<img src=x onerror=alert(2)>" in shown
        assert "&lt;script&gt;" in text
        assert {m.lower() for m in page.marks} >= {HOSTILE_WORD, "confusion", "matrix"}
        links = [a["href"] for t, a in page.tags if t == "a" and a.get("class") == "pdf"]
        assert f"/papers/{facts['pycm']}.pdf#page=1" in links[0]

        years = svc.get("/", {"q": "python", "year_min": 2100})[2].decode()
        assert 'id="no-results"' in years
        status, _, body = svc.get("/", {"q": "python", "year_min": "99999999999999999999"})
        assert status == 400 and "year_min must be a year" in body.decode()
        status, _, body = svc.get("/", {"q": "<script>alert(9)</script>"})
        assert status == 200 and "<script>alert(9)" not in body.decode()


def test_pagination_walks_disjoint_pages(deployment):
    settings, facts = deployment
    if facts["backend"] != "sqlite":
        pytest.skip("pagination does not depend on the database backend")
    from research_pipeline.api import page as page_module

    with running_service(settings) as svc:
        page_module.PER_PAGE, saved = 1, page_module.PER_PAGE
        try:
            first = Elements(svc.get("/", {"q": "python"})[2].decode())
            next_links = [a["href"] for t, a in first.tags if t == "a" and a.get("rel") == "next"]
            assert next_links, "four python papers, one per page: there is a next page"
            second = Elements(svc.get(next_links[0])[2].decode())
        finally:
            page_module.PER_PAGE = saved
    ids = [[a["data-doc-id"] for t, a in p.tags if t == "li"] for p in (first, second)]
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]
    assert [a["href"] for t, a in second.tags if t == "a" and a.get("rel") == "prev"]


def _add_source(settings, uri: str, doc_id: str) -> None:
    engine = store.make_engine(settings.database_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(store.document_sources).values(
            uri=uri, doc_id=doc_id, size=1, mtime=0.0, seen_at=datetime.now(UTC)))
    engine.dispose()


def test_pdfs_are_served_by_document_id_only(deployment, tmp_path):
    settings, facts = deployment
    pycm, inbox = facts["pycm"], settings.inbox
    with running_service(settings) as svc:
        status, headers, body = svc.get(f"/papers/{pycm}.pdf")
        assert status == 200 and headers["content-type"] == "application/pdf"
        assert hashlib.sha256(body).hexdigest() == pycm

        assert svc.get("/papers/" + "0" * 64 + ".pdf")[0] == 404
        for probe in ("/papers/../../etc/passwd", "/papers/..%2f..%2fetc%2fpasswd.pdf",
                      "/papers/%2e%2e/rp.db.pdf", f"/papers/{pycm.upper()}.pdf", "/papers/etc/passwd.pdf",
                      f"/papers/{pycm[:-1]}.pdf", "/papers/" + "a" * 5000 + ".pdf"):
            status, _, body = svc.get(probe)
            assert status == 404, probe
            assert b"root:" not in body

        # A document whose only recorded places are a symlink leading out of the inbox, a file
        # outside the inbox and a path climbing out of it: none is served.
        game = facts["doc_ids"][SAMPLE[3]]
        os.remove(inbox / SAMPLE[3])
        outside = tmp_path / "outside.pdf"
        outside.write_bytes((settings.home / "inbox" / SAMPLE[0]).read_bytes())
        (inbox / "link.pdf").symlink_to(outside)
        (inbox / "passwd.pdf").symlink_to("/etc/passwd")
        _add_source(settings, str(inbox / "link.pdf"), game)
        _add_source(settings, str(outside), game)
        _add_source(settings, str(inbox / ".." / ".." / "etc" / "passwd.pdf"), game)
        _add_source(settings, str(inbox / "passwd.pdf"), game)
        assert svc.get(f"/papers/{game}.pdf")[0] == 404

        # A file edited after ingestion no longer hashes to its id: not served.
        cfd = facts["doc_ids"][SAMPLE[2]]
        with open(inbox / SAMPLE[2], "ab") as fh:
            fh.write(b"%% appended\n")
        assert svc.get(f"/papers/{cfd}.pdf")[0] == 404
