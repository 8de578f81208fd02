"""The overview (the console's home page): every channel with its state, connections and message
figures for the last hour and day, the writer's backlog, delivery queues, reconciliation
exceptions, storage and health (the same report as /health), and a 24-hour chart per channel.

Message figures come from message_minutes (engine/store/minutes.py), never from a scan of the
messages table; the live part is fetched again every 5 s (``/overview/live``), the chart every
minute (``/overview/chart``). docs/console.md says what each figure means.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from sqlalchemy import Connection, func, select

from engine.outbound import outbox
from engine.reconciliation.reconciler import EXCEPTION_STATES
from engine.store import minutes
from engine.store.models import Study
from engine.store.tokens import Role
from engine.store.types import utcnow
from engine.web.console.pages import fragment, render
from engine.web.health import health_report
from engine.web.keys import ENGINE
from engine.web.reads import on_reader
from engine.web.roles import requires

routes = web.RouteTableDef()

CHART_WIDTH, CHART_HEIGHT, DAY_MINUTES = 720, 120, 24 * 60
COUNTED = ("mllp", "file")  # the connectors whose messages message_minutes counts (engine/connectors/minute_figures.py)


def _figures(conn: Connection) -> dict[str, Any]:
    now = utcnow()
    exceptions = conn.execute(select(func.count()).select_from(Study.__table__)
                              .where(Study.recon_state.in_(EXCEPTION_STATES))).scalar_one()
    return {"hour": minutes.totals(conn, now - timedelta(hours=1)),
            "day": minutes.totals(conn, now - timedelta(days=1)),
            "deliveries": outbox.counts(conn), "exceptions": exceptions}


async def _context(request: web.Request) -> dict[str, Any]:
    ready, checks = await health_report(request)
    figures = await on_reader(request, _figures)
    return {"channels": request.app[ENGINE].channel_status(), "ready": ready, "checks": checks,
            "empty": minutes.Totals(), "now": utcnow(), "counted": COUNTED, **figures}


@dataclass(frozen=True)
class Chart:
    """One channel's last 24 hours as SVG paths and an hourly table: a bar per minute for the
    messages, a short tick per minute for p50 and p99 (dense enough to read as lines, and a lone
    minute still shows)."""

    channel: str
    messages: str  # path data: a vertical bar per minute with messages
    p50: str  # path data: a tick per minute at its ACK latency p50 (ms)
    p99: str
    peak: int  # the messages axis' top
    slowest: float  # the latency axis' top (ms)
    hours: list[tuple[datetime, int, float | None, float | None]]  # hour, messages, p50, p99


def _x(minute: datetime, start: datetime) -> str:
    return f"{(minute - start).total_seconds() / 60 * CHART_WIDTH / DAY_MINUTES:.1f}"


def _y(value: float, top: float) -> str:
    return f"{CHART_HEIGHT - value * CHART_HEIGHT / top:.1f}" if top else str(CHART_HEIGHT)


def _chart(channel: str, points: list[minutes.Point], start: datetime) -> Chart:
    peak = max((p.received for p in points), default=0)
    slowest = max((p.p99_ms or 0 for p in points), default=0.0)
    hours: dict[datetime, list[int]] = {}
    for p in points:
        acc = hours.setdefault(p.minute.replace(minute=0), [0] * (1 + len(minutes.BUCKETS)))
        acc[0] += p.received
        for i, n in enumerate(p.buckets):
            acc[1 + i] += n

    xs = [_x(p.minute, start) for p in points]  # SVG user units, one decimal
    bars = " ".join(f"M{x},{CHART_HEIGHT}V{_y(p.received, peak)}" for x, p in zip(xs, points, strict=True))
    p50 = " ".join(f"M{x},{_y(p.p50_ms, slowest)}h1.5" for x, p in zip(xs, points, strict=True) if p.p50_ms is not None)
    p99 = " ".join(f"M{x},{_y(p.p99_ms, slowest)}h1.5" for x, p in zip(xs, points, strict=True) if p.p99_ms is not None)
    return Chart(channel, bars, p50, p99, peak, slowest,
                 [(h, acc[0], minutes.percentile(acc[1:], 0.5), minutes.percentile(acc[1:], 0.99))
                  for h, acc in sorted(hours.items())])


async def _charts(request: web.Request) -> dict[str, Any]:
    start = utcnow() - timedelta(days=1)
    found = await on_reader(request, lambda c: minutes.series(c, start))
    counted = [ch["name"] for ch in request.app[ENGINE].channel_status() if ch["connector"] in COUNTED]
    names = counted + sorted(set(found) - set(counted))  # and channels gone from the configuration since
    return {"charts": [_chart(n, found.get(n, []), start) for n in names], "width": CHART_WIDTH,
            "height": CHART_HEIGHT}


@routes.get("/")
@requires(Role.READ)
async def overview(request: web.Request) -> web.Response:
    return render(request, "overview.html", {**await _context(request), **await _charts(request)})


@routes.get("/overview/live")
@requires(Role.READ)
async def overview_live(request: web.Request) -> web.Response:
    """The overview's changing part, fetched again every few seconds by static/console.js."""
    return fragment(request, "overview_live.html", await _context(request))


@routes.get("/overview/chart")
@requires(Role.READ)
async def overview_chart(request: web.Request) -> web.Response:
    """The 24-hour charts, fetched again every minute by static/console.js."""
    return fragment(request, "overview_chart.html", await _charts(request))
