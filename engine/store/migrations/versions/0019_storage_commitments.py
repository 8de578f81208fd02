"""storage_commitments: Storage Commitment (Push Model) transactions asked of DICOM destinations

A row per N-ACTION sent (its Transaction UID is the key): the destination, the delivery and study it
is about, how many instances were asked for, and what the destination's N-EVENT-REPORT said (how
many committed, which failed and why, when and from which calling AE title). state: requested ->
committed | failed (engine.store.states.CommitmentState). (state, requested_at) finds the outstanding ones.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-08 09:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import engine.store.types

revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('storage_commitments',
    sa.Column('transaction_uid', sa.String(length=64), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('delivery_id', sa.BigInteger(), nullable=True),
    sa.Column('study_id', sa.BigInteger(), nullable=True),
    sa.Column('requested_at', engine.store.types.UTCDateTime(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('instances', sa.Integer(), nullable=False),
    sa.Column('committed', sa.Integer(), nullable=False),
    sa.Column('failed', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'),
              nullable=True),
    sa.Column('answered_at', engine.store.types.UTCDateTime(), nullable=True),
    sa.Column('answered_by', sa.String(length=16), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('transaction_uid')
    )
    op.create_index('ix_storage_commitments_delivery_id', 'storage_commitments', ['delivery_id'])
    op.create_index('ix_storage_commitments_state', 'storage_commitments', ['state', 'requested_at'])


def downgrade() -> None:
    op.drop_index('ix_storage_commitments_state', table_name='storage_commitments')
    op.drop_index('ix_storage_commitments_delivery_id', table_name='storage_commitments')
    op.drop_table('storage_commitments')
