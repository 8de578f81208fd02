"""audit trail of changes: client certificate subject and the object acted on

audit_events recorded reads of patient data only; it now also records every action that changes
state (reprocess, retry, discard, match, accept, mapping reload, token change, start, stop). Each row
names the client certificate's subject (mutual TLS) and what was acted on: the study (its Study
Instance UID), the message, the delivery, and a short detail. No foreign keys: the trail outlives
the rows it names (message retention is shorter than audit retention).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 02:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cert_subject', sa.String(256), nullable=True))
        batch_op.add_column(sa.Column('study_uid', sa.String(64), nullable=True))
        batch_op.add_column(sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                                      nullable=True))
        batch_op.add_column(sa.Column('delivery_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'),
                                      nullable=True))
        batch_op.add_column(sa.Column('detail', sa.Text(), nullable=True))
        batch_op.create_index('ix_audit_events_agent', ['agent'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_agent')
        batch_op.drop_column('detail')
        batch_op.drop_column('delivery_id')
        batch_op.drop_column('message_id')
        batch_op.drop_column('study_uid')
        batch_op.drop_column('cert_subject')
