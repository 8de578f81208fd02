"""Console logins (the ``console_sessions`` table): opened with a token on the login form, carried
by a cookie, ended by logout, by expiry, or by revoking the token they were opened with.

The cookie holds a random secret; only its SHA-256 is kept, as for tokens. Each session has its own
CSRF secret, the hidden field of every console form (and the ``X-CSRF-Token`` header of its scripts).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, Table, delete, insert, select

from engine.store.models import ConsoleSession
from engine.store.types import utcnow

SESSIONS: Table = ConsoleSession.__table__  # type: ignore[assignment]


@dataclass(frozen=True)
class OpenSession:
    """A session found by its cookie: who opened it, with which token (its SHA-256), its CSRF secret."""

    id: int
    token_name: str
    token_digest: bytes
    csrf: str
    expires_at: datetime


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def open_session(conn: Connection, token_name: str, token_digest: bytes, hours: float) -> str:
    """A new session for the token named ``token_name``; returns the cookie's secret (kept only hashed).
    Expired sessions are swept on the way."""
    now = utcnow()
    conn.execute(delete(SESSIONS).where(SESSIONS.c.expires_at < now))
    secret = secrets.token_urlsafe(32)
    conn.execute(insert(SESSIONS).values(secret_sha256=_digest(secret), token_name=token_name,
                                         token_sha256=token_digest.hex(), csrf=secrets.token_urlsafe(24),
                                         created_at=now, expires_at=now + timedelta(hours=hours)))
    return secret


def find_session(conn: Connection, secret: str) -> OpenSession | None:
    """The unexpired session whose cookie secret is ``secret``, or None."""
    row = conn.execute(select(SESSIONS).where(SESSIONS.c.secret_sha256 == _digest(secret),
                                              SESSIONS.c.expires_at > utcnow())).first()
    if row is None:
        return None
    return OpenSession(row.id, row.token_name, bytes.fromhex(row.token_sha256), row.csrf, row.expires_at)


def close_session(conn: Connection, secret: str) -> bool:
    """End the session of this cookie secret (logout); False when there was none."""
    return conn.execute(delete(SESSIONS).where(SESSIONS.c.secret_sha256 == _digest(secret))).rowcount > 0
