"""message_minutes (the overview's per-minute figures) and indexes for the console's message search

message_minutes: per channel and minute, messages received, ACKs by code and the ACK latency in
buckets; the console's overview reads 1,440 rows per channel for a day instead of the messages
table. Message search: (status, id) replaces (status), and (message_type, id), so a filtered
"newest first" page is an index range read backwards on PostgreSQL as on SQLite; patients by
merged_into_id (only the merged ones), so a search by identifier finds a merged patient's messages.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-07 05:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import engine.store.types

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None

BUCKETS = [f"l{i}" for i in range(11)]


def upgrade() -> None:
    op.create_table('message_minutes',
    sa.Column('channel', sa.String(length=64), nullable=False),
    sa.Column('minute', engine.store.types.UTCDateTime(), nullable=False),
    sa.Column('received', sa.Integer(), nullable=False),
    sa.Column('aa', sa.Integer(), nullable=False),
    sa.Column('ae', sa.Integer(), nullable=False),
    sa.Column('ar', sa.Integer(), nullable=False),
    sa.Column('other', sa.Integer(), nullable=False),
    sa.Column('latency_sum_ms', sa.BigInteger(), nullable=False),
    *[sa.Column(b, sa.Integer(), nullable=False) for b in BUCKETS],
    sa.PrimaryKeyConstraint('channel', 'minute')
    )
    op.create_index('ix_message_minutes_minute', 'message_minutes', ['minute'])
    op.create_index('ix_messages_status_id', 'messages', ['status', 'id'])
    op.create_index('ix_messages_type_id', 'messages', ['message_type', 'id'])
    op.drop_index('ix_messages_status', table_name='messages')
    op.create_index('ix_patients_merged_into', 'patients', ['merged_into_id'],
                    sqlite_where=sa.text('merged_into_id IS NOT NULL'),
                    postgresql_where=sa.text('merged_into_id IS NOT NULL'))


def downgrade() -> None:
    op.drop_index('ix_patients_merged_into', table_name='patients')
    op.create_index('ix_messages_status', 'messages', ['status'])
    op.drop_index('ix_messages_type_id', table_name='messages')
    op.drop_index('ix_messages_status_id', table_name='messages')
    op.drop_index('ix_message_minutes_minute', table_name='message_minutes')
    op.drop_table('message_minutes')
