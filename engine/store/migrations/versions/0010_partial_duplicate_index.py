"""messages: index only the duplicates in ix_messages_duplicate_of

Each message wrote an entry into ix_messages_duplicate_of, although only resends (status
duplicate) have duplicate_of set: on SQLite a NULL is indexed like any value, so that was one more
page in every durable commit. Retention's lookups (duplicate_of IN (...), and the foreign key's
ON DELETE SET NULL) compare with =, which the planner proves implies IS NOT NULL, so they still
use the smaller index.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 23:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

DUPLICATES = sa.text("duplicate_of IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_duplicate_of')
        batch_op.create_index('ix_messages_duplicate_of', ['duplicate_of'], unique=False,
                              sqlite_where=DUPLICATES, postgresql_where=DUPLICATES)


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_duplicate_of')
        batch_op.create_index('ix_messages_duplicate_of', ['duplicate_of'], unique=False)
