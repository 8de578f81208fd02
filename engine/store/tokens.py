"""Named bearer tokens and their roles (the ``api_tokens`` table), shared by the HTTP layer (which
checks them) and ``radbridge tokens`` (which creates, lists and revokes them).

A token's secret is 32 random bytes (URL-safe base64, prefixed ``rb_``); only its SHA-256 is kept.
A high-entropy secret needs no slow hash: SHA-256 cannot be reversed, and comparing digests with
``hmac.compare_digest`` keeps the check constant time. Tokens from the configuration (``[http]
tokens``, ``RADBRIDGE_API_TOKEN``) and the generated ``<storage dir>/api-token`` are not rows: they
hold every role and are named here (``config:<digest prefix>``, ``generated``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TypedDict

from sqlalchemy import Connection, Table, insert, select, update

from engine.errors import RadBridgeError
from engine.store.models import ApiToken
from engine.store.types import utcnow

TOKENS: Table = ApiToken.__table__  # type: ignore[assignment]
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
GENERATED = "generated"  # the name of <storage dir>/api-token
CONFIG_PREFIX = "config:"  # + the first 12 hex digits of the SHA-256 of a configured token
RESERVED = (GENERATED, "anonymous")
LAST_USED_STEP_SECONDS = 60  # last_used_at is written at most once a minute per token


class Role(StrEnum):
    """What a token may do. Each HTTP route declares the one it needs (engine/web/auth.py)."""

    READ = "read"  # view messages, patients, orders, studies, deliveries, channels, the audit trail; FHIR reads
    OPERATE = "operate"  # reprocess, retry, discard, match, accept a finding, reconcile
    ADMIN = "admin"  # mappings, channels, tokens
    FHIR_WRITE = "fhir-write"  # FHIR creates, updates, transaction and batch Bundles
    METRICS = "metrics"  # GET /metrics
    STORE = "store"  # STOW-RS: images stored over HTTP, as a modality stores them by C-STORE


ALL_ROLES = frozenset(Role)


class TokenError(RadBridgeError):
    """A token cannot be created or revoked as asked (the message says why)."""


@dataclass(frozen=True)
class Principal:
    """Who a request is: the token's name and its roles."""

    name: str
    roles: frozenset[Role]

    def may(self, role: Role) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class ActiveToken:
    """A row that is not revoked, as the HTTP layer checks it."""

    id: int
    principal: Principal
    digest: bytes  # SHA-256 of the secret
    last_used_at: datetime | None


class TokenRow(TypedDict):
    name: str
    roles: list[str]
    created_at: str
    last_used_at: str | None
    revoked_at: str | None


def digest_of(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def config_token_name(secret: str) -> str:
    """How a configured token is named (audit trail, logs): never the token itself."""
    return CONFIG_PREFIX + hashlib.sha256(secret.encode()).hexdigest()[:12]


def parse_roles(values: Iterable[str]) -> frozenset[Role]:
    roles = set()
    for v in values:
        try:
            roles.add(Role(v))
        except ValueError:
            raise TokenError(f"unknown role {v!r}: roles are {', '.join(Role)}") from None
    return frozenset(roles)


def _roles_text(roles: Iterable[Role]) -> str:
    return ",".join(sorted(r.value for r in roles))


def _roles_of(text: str) -> frozenset[Role]:
    names = set(text.split(","))
    return frozenset(r for r in Role if r.value in names)


def create(conn: Connection, name: str, roles: Iterable[Role]) -> str:
    """A new token named ``name``; returns its secret (kept nowhere: show it once)."""
    wanted = frozenset(roles)
    if not NAME_PATTERN.fullmatch(name):
        raise TokenError(f"token name {name!r}: 1 to 64 letters, digits, '.', '_', '@' or '-', "
                         "starting with a letter or digit")
    if name in RESERVED:
        raise TokenError(f"token name {name!r} is reserved")
    if not wanted:
        raise TokenError("give at least one --role (" + ", ".join(Role) + ")")
    old = conn.execute(select(TOKENS.c.revoked_at).where(TOKENS.c.name == name)).first()
    if old is not None:
        why = "was revoked; names are not reused, so the audit trail's names stay unique" if old.revoked_at \
            else "exists (revoke it first, or pick another name)"
        raise TokenError(f"a token named {name!r} {why}")
    secret = "rb_" + secrets.token_urlsafe(32)
    conn.execute(insert(TOKENS).values(name=name, secret_sha256=digest_of(secret).hex(), roles=_roles_text(wanted),
                                       created_at=utcnow()))
    return secret


def revoke(conn: Connection, name: str) -> None:
    """Revoke the token ``name`` at once (its row stays, with revoked_at)."""
    row = conn.execute(select(TOKENS.c.id, TOKENS.c.revoked_at).where(TOKENS.c.name == name)).first()
    if row is None:
        raise TokenError(f"no token named {name!r} (radbridge tokens list)")
    if row.revoked_at is not None:
        raise TokenError(f"token {name!r} was already revoked at {row.revoked_at.isoformat(timespec='seconds')}")
    conn.execute(update(TOKENS).where(TOKENS.c.id == row.id).values(revoked_at=utcnow()))


def listing(conn: Connection) -> list[TokenRow]:
    """Every token, revoked ones too, oldest first (no secrets: they are not kept)."""
    rows = conn.execute(select(TOKENS).order_by(TOKENS.c.id))
    return [{"name": r.name, "roles": sorted(r.roles.split(",")), "created_at": r.created_at.isoformat(),
             "last_used_at": r.last_used_at.isoformat() if r.last_used_at else None,
             "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None} for r in rows]


def active(conn: Connection) -> list[ActiveToken]:
    rows = conn.execute(select(TOKENS.c.id, TOKENS.c.name, TOKENS.c.roles, TOKENS.c.secret_sha256,
                               TOKENS.c.last_used_at).where(TOKENS.c.revoked_at.is_(None)))
    return [ActiveToken(r.id, Principal(r.name, _roles_of(r.roles)), bytes.fromhex(r.secret_sha256), r.last_used_at)
            for r in rows]


def find(given: str, candidates: Iterable[tuple[Principal, bytes]]) -> Principal | None:
    """The principal whose secret digest matches ``given``'s, comparing every candidate in constant time."""
    return find_digest(digest_of(given), candidates)


def find_digest(wanted: bytes, candidates: Iterable[tuple[Principal, bytes]]) -> Principal | None:
    """The principal whose secret's SHA-256 is ``wanted`` (a console session keeps only that)."""
    found: Principal | None = None
    for principal, digest in candidates:
        if hmac.compare_digest(digest, wanted):
            found = principal  # no early exit: the time taken does not depend on which one matched
    return found


def touch(conn: Connection, token_id: int) -> None:
    conn.execute(update(TOKENS).where(TOKENS.c.id == token_id).values(last_used_at=utcnow()))
