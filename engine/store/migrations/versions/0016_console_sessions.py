"""console_sessions: the operator console's logins (a session cookie per login, its CSRF secret)

A row per console login: the SHA-256 of the cookie's secret (never the secret), the token it was
opened with (its name and the SHA-256 of its secret, so a revoked token ends its sessions at once),
the CSRF secret of its forms, and when it expires. Rows, not signed cookies: logout ends a session
everywhere, and several engine processes sharing the database share the sessions.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-07 04:40:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import engine.store.types

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('console_sessions',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('secret_sha256', sa.String(length=64), nullable=False),
    sa.Column('token_name', sa.String(length=64), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('csrf', sa.String(length=64), nullable=False),
    sa.Column('created_at', engine.store.types.UTCDateTime(), nullable=False),
    sa.Column('expires_at', engine.store.types.UTCDateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('secret_sha256')
    )
    op.create_index('ix_console_sessions_expires_at', 'console_sessions', ['expires_at'])


def downgrade() -> None:
    op.drop_index('ix_console_sessions_expires_at', table_name='console_sessions')
    op.drop_table('console_sessions')
