"""domain_events: index only the studies' events

Every HL7 and FHIR message now writes domain events (patient.created, order.placed ...), so every
index on domain_events adds pages to each durable commit. Only a study's events are ever looked
up (GET /api/studies, radbridge studies show): ix_domain_events_kind (never used) is dropped and
ix_domain_events_study_id covers only rows with a study.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 21:25:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

STUDY_ROWS = sa.text("study_id IS NOT NULL")


def upgrade() -> None:
    with op.batch_alter_table('domain_events', schema=None) as batch_op:
        batch_op.drop_index('ix_domain_events_kind')
        batch_op.drop_index('ix_domain_events_study_id')
        batch_op.create_index('ix_domain_events_study_id', ['study_id'], unique=False,
                              sqlite_where=STUDY_ROWS, postgresql_where=STUDY_ROWS)


def downgrade() -> None:
    with op.batch_alter_table('domain_events', schema=None) as batch_op:
        batch_op.drop_index('ix_domain_events_study_id')
        batch_op.create_index('ix_domain_events_study_id', ['study_id'], unique=False)
        batch_op.create_index('ix_domain_events_kind', ['kind', 'id'], unique=False)
