"""The search page at `/`: a server-rendered HTML form and result list (no JavaScript at all).

The page runs the same validated, bounded search as `/search`. Everything it shows goes
through Jinja2's autoescaping, so a title or text holding HTML is rendered as text; matched
query words are wrapped in <mark> by splitting the snippet, never by inserting markup into it.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from research_pipeline.api import papers

PER_PAGE = 10
TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


def highlight(snippet: str, words: list[str]) -> list[tuple[str, bool]]:
    """`snippet` cut into (text, matched) pieces at the query words (case-insensitive)."""
    words = sorted({w for w in words if len(w) > 1}, key=len, reverse=True)
    if not words or not snippet:
        return [(snippet or "", False)]
    pattern = re.compile("(" + "|".join(re.escape(w) for w in words) + ")", re.IGNORECASE)
    pieces = pattern.split(snippet)
    return [(piece, i % 2 == 1) for i, piece in enumerate(pieces) if piece]


def _page_number(raw: str) -> int:
    last = -(-100 // PER_PAGE)  # the service returns at most MAX_K (100) papers
    return min(int(raw), last) if raw.isdigit() and 0 < len(raw) < 4 and int(raw) >= 1 else 1


async def search_page(request: Request) -> Response:
    """The search page: query box, year and author filters, results per paper, pagination.
    ---
    responses: {200: {description: HTML}, 400: {description: HTML with the error}}
    """
    from research_pipeline.api import app as api
    from research_pipeline.lib.search.analyzer import query_words

    service = request.app.state.service
    qp = request.query_params
    form = {name: qp.get(name, "") for name in ("q", "year_min", "year_max", "author")}
    page = _page_number(qp.get("page", "1"))
    context: dict[str, Any] = {"form": form, "error": None, "results": [], "page": page,
                               "prev_url": None, "next_url": None, "generation": None, "total_shown": 0}
    status = 200
    if form["q"].strip():
        try:
            parsed = api.parse_search_params(qp)
            # One more than the page needs: whether a next page exists.
            params = api.SearchParams(parsed.q, min(api.MAX_K, page * PER_PAGE + 1), "hybrid",
                                      parsed.year_min, parsed.year_max, parsed.author)
            answer = await api.search_answer(request, params)
        except api.BadRequest as exc:
            context["error"], status = str(exc), 400
        except api.NotReady as exc:
            context["error"], status = f"The index is not ready: {exc}", 503
        except api.Busy:
            context["error"], status = "The service is busy; try again in a moment.", 503
        except TimeoutError:
            context["error"], status = "The search took too long; try a shorter query.", 504
        else:
            hits = answer["results"]
            shown = hits[(page - 1) * PER_PAGE : page * PER_PAGE]
            loop = asyncio.get_running_loop()
            pdfs = await loop.run_in_executor(
                service.side_pool, papers.servable, service.engine, service.settings.inbox,
                [h["doc_id"] for h in shown],
            )
            words = query_words(params.q)
            context["results"] = [
                {**h, "pieces": highlight(h["snippet"], words), "pdf": h["doc_id"] in pdfs,
                 "rank": (page - 1) * PER_PAGE + i + 1}
                for i, h in enumerate(shown)
            ]
            context["generation"] = answer["generation"]
            base = {k: v for k, v in form.items() if v}
            if page > 1:
                context["prev_url"] = "/?" + urlencode({**base, "page": page - 1})
            if len(hits) > page * PER_PAGE and page * PER_PAGE < api.MAX_K:
                context["next_url"] = "/?" + urlencode({**base, "page": page + 1})
    html = TEMPLATES.get_template("search.html").render(**context)
    return HTMLResponse(
        html,
        status_code=status,
        headers={
            # Nothing is fetched from elsewhere and no script runs: say so to the browser.
            "Content-Security-Policy": "default-src 'none'; style-src 'self' 'unsafe-inline'; "
                                       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )
