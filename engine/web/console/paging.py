"""Keyset paging for the console's record lists (patients, orders, studies): newest first, each page
the rows whose id is below the last one shown (``before``), never OFFSET, never a count."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from aiohttp import web

PAGE = 50  # rows per page
NEWEST = 2 ** 62  # "before" of the first page: every id is below it


def before_of(request: web.Request) -> int:
    """The page's ``before`` (the first page: NEWEST)."""
    raw = request.query.get("before", "")
    return int(raw) if raw.isdigit() and len(raw) < 19 else NEWEST


def _kept(request: web.Request) -> dict[str, str]:
    return {k: v for k, v in request.query.items() if k != "before" and v}


def older_page(request: web.Request, rows: list[dict[str, Any]]) -> str | None:
    """The query string of the next (older) page, or None when ``rows`` (fetched PAGE + 1) is the last."""
    return urlencode({**_kept(request), "before": rows[PAGE - 1]["id"]}) if len(rows) > PAGE else None


def first_page(request: web.Request) -> str | None:
    """The query string of the first page, when this is not it."""
    return (urlencode(_kept(request)) or "page=1") if "before" in request.query else None
