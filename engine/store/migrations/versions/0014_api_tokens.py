"""api_tokens: named bearer tokens with roles, stored hashed

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 02:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import engine.store.types

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_tokens',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('secret_sha256', sa.String(length=64), nullable=False),
    sa.Column('roles', sa.String(length=128), nullable=False),
    sa.Column('created_at', engine.store.types.UTCDateTime(), nullable=False),
    sa.Column('last_used_at', engine.store.types.UTCDateTime(), nullable=True),
    sa.Column('revoked_at', engine.store.types.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    sa.UniqueConstraint('secret_sha256')
    )


def downgrade() -> None:
    op.drop_table('api_tokens')
